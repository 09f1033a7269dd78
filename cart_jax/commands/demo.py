"""``cart demo``: the whole system on the embedded emoji corpus, next to the dual-tower baseline.

  cart demo [--json PATH] [--full] [--workdir DIR]

Steps (each the code path of its own command):
  1. prepare the emoji corpus (``cart data prepare emoji``): 3,944 rendered emoji, English
     queries split train/val/test by wording, captions in 13 other languages;
  2. train the item encoder (``cart embed``): image tower vs frozen MiniLM text tower, InfoNCE;
  3. build identifiers (``cart build-ids``): K-Means K=64 + RQ-VAE M=2 x C=64 + counter;
  4. train CART (``cart train --gin_file=gin_configs/experiments/emoji_demo.gin``; ``--full``:
     ``emoji_cart.gin``, the full recipe with R-Drop, 4x the steps, and a longer item encoder);
  5. evaluate CART (``cart eval``) and the dual tower (``cart baseline``) on the same ``test``
     queries, print one table and one worked example (query -> generated identifier -> item).

JSON (``--json``): {"cart": {"r@1", "r@5", "r@10", "mrr@10", "qps"}, "dual_tower": {...},
"n_items", "n_test_queries", "seconds", "stage_seconds", ...}. Logs of every step go to
``WORKDIR/logs/``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

DEMO = {"experiment": "gin_configs/experiments/emoji_demo.gin", "embed_steps": 300}
FULL = {"experiment": "gin_configs/experiments/emoji_cart.gin", "embed_steps": 600}
IDS = ["--clusters", "64", "--levels", "2", "--codebook-size", "64", "--rq-steps", "300"]
SMOKE_IDS = ["--clusters", "4", "--levels", "1", "--codebook-size", "8", "--rq-steps", "50"]  # --limit


def register(sub, name: str, help_text: str) -> argparse.ArgumentParser:
  p = sub.add_parser(name, help=help_text, description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--full", action="store_true",
                 help="the full CART recipe (R-Drop, 4,000 steps) and a longer item encoder")
  p.add_argument("--workdir", default=None,
                 help="keep everything here (default: a new temporary directory); steps whose "
                      "outputs already exist there are reused")
  p.add_argument("--limit", type=int, default=None, help="only the first N emoji (smoke runs)")
  p.add_argument("--embed-steps", type=int, default=None, help="override the item encoder's steps")
  p.add_argument("--train-steps", type=int, default=None, help="override CART's training steps")
  p.add_argument("--json", default=None, metavar="PATH", help="write the JSON summary here")
  p.set_defaults(func=run)
  return p


def _sub_args(module, name: str, argv: list[str]):
  parser = argparse.ArgumentParser(prog=f"cart {name}")
  sub = parser.add_subparsers()
  module.register(sub, name, name)
  return parser.parse_args([name] + argv)


class _Stage:
  """Prints ``[i/n] title ... done in s``; the stage's own output goes to a log file."""

  def __init__(self, logs: Path, times: dict):
    self.logs, self.times, self.i = logs, times, 0

  @contextlib.contextmanager
  def __call__(self, key: str, title: str, n: int = 5):
    self.i += 1
    print(f"[{self.i}/{n}] {title} ...", flush=True)
    t0 = time.perf_counter()
    with open(self.logs / f"{self.i}_{key}.log", "w", encoding="utf-8") as f:
      with contextlib.redirect_stdout(f):
        yield
    self.times[key] = round(time.perf_counter() - t0, 1)
    print(f"      done in {self.times[key]:.0f} s (log: {self.logs / f'{self.i}_{key}.log'})", flush=True)


def run(args) -> int:
  from cart_jax.cli import CliError
  from cart_jax.commands import baseline, build_ids, data, embed

  t_start = time.perf_counter()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow, if a step imports it, stays quiet
  recipe = FULL if args.full else DEMO
  work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cart-demo-"))
  work.mkdir(parents=True, exist_ok=True)
  logs = work / "logs"
  logs.mkdir(exist_ok=True)
  corpus_dir, emb, index_dir = work / "corpus", work / "emb" / "emoji.npy", work / "index"
  model_dir = work / ("cart_full" if args.full else "cart")
  times: dict[str, float] = {}
  stage = _Stage(logs, times)
  print(f"cart demo{' --full' if args.full else ''}: working in {work}")

  with stage("prepare", "preparing the emoji corpus (cart data prepare emoji)"):
    if not (corpus_dir / "corpus.json").exists():
      argv = ["prepare", "emoji", "--out", str(corpus_dir)]
      if args.limit:
        argv += ["--limit", str(args.limit)]
      _check(data.run(_sub_args(data, "data", argv)), "data prepare")

  embed_steps = args.embed_steps or recipe["embed_steps"]
  with stage("embed", f"training the item encoder, {embed_steps} steps (cart embed)"):
    if not emb.exists():
      _check(embed.run(_sub_args(embed, "embed", [
          "--corpus", str(corpus_dir), "--out", str(emb), "--steps", str(embed_steps),
          "--no-progress"])), "embed")

  ids_args = IDS if not args.limit else SMOKE_IDS
  with stage("build_ids", f"building identifiers K={ids_args[1]}, M={ids_args[3]} x C={ids_args[5]} "
                          f"+ counter (cart build-ids)"):
    if not (index_dir / "meta.json").exists():
      _check(build_ids.run(_sub_args(build_ids, "build-ids", [
          "--embeddings", str(emb), "--item-ids", str(emb.with_suffix(".ids.txt")), "--out",
          str(index_dir), "--quiet"] + ids_args)), "build-ids")

  with stage("train", f"training CART ({recipe['experiment']})"):
    from cart_jax import cli_gin
    bindings = [f"MODEL_DIR='{model_dir}'", f"CORPUS_DIR='{corpus_dir}'", f"INDEX_DIR='{index_dir}'"]
    if args.train_steps:
      bindings.append(f"TrainConfig.num_steps={args.train_steps}")
    cli_gin.parse([recipe["experiment"]], bindings)
    with contextlib.redirect_stderr(sys.stdout):
      train_summary = cli_gin.run_train(progress=False)
    print(json.dumps(train_summary, indent=2, default=str))

  with stage("eval", "evaluating CART and the dual tower on the test queries (cart eval, cart baseline)"):
    from cart_jax.train.jobs import eval_job, load_run
    loaded = load_run(model_dir)
    cart = eval_job(str(model_dir), split="test", loaded=loaded)
    print(json.dumps(cart, indent=2))
    base_json = work / "baseline_test.json"
    _check(baseline.run(_sub_args(baseline, "baseline", [
        "--corpus", str(corpus_dir), "--embeddings", str(emb), "--split", "test",
        "--json", str(base_json)])), "baseline")
    base = json.loads(base_json.read_text(encoding="utf-8"))
    example = _worked_example(loaded)

  if cart["num_queries"] != base["num_queries"]:
    raise CliError(f"CART scored {cart['num_queries']} test queries, the baseline {base['num_queries']}")
  seconds = time.perf_counter() - t_start
  summary = {
      "cart": {"r@1": cart["r@1"], "r@5": cart["r@5"], "r@10": cart["r@10"], "mrr@10": cart["mrr@10"],
               "qps": cart["qps"]},
      "dual_tower": {"r@1": base["R@1"], "r@5": base["R@5"], "r@10": base["R@10"],
                     "mrr@10": base["MRR@10"], "qps": base["queries_per_second"]},
      "n_items": cart["num_items"], "n_test_queries": cart["num_queries"], "seconds": seconds,
      "stage_seconds": times, "full": bool(args.full), "experiment": recipe["experiment"],
      "embed_steps": embed_steps, "train_steps": train_summary["step"],
      "workdir": str(work), "model_dir": str(model_dir), "example": example,
      "cpu_seconds": _cpu_seconds(), "machine": {"cpus": os.cpu_count(), "load_avg_1m": _load()},
  }
  print()
  print(table(summary))
  print()
  print(example_text(example))
  print(f"\ntotal {seconds:.0f} s (stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ")")
  print(f"try: cart search --model_dir {model_dir} \"smiling cat\" -k 5")
  if args.json:
    from cart_jax.index.artefact import atomic_write_json
    atomic_write_json(args.json, summary)
  return 0


def _check(rc, what: str) -> None:
  if rc:
    from cart_jax.cli import CliError
    raise CliError(f"{what} failed with exit code {rc}")


def _cpu_seconds() -> float:
  t = os.times()
  return round(t.user + t.system + t.children_user + t.children_system, 1)


def _load() -> float | None:
  try:
    return round(os.getloadavg()[0], 2)
  except OSError:
    return None


def table(summary: dict) -> str:
  """The demo's results table (plain text)."""
  n, q = summary["n_items"], summary["n_test_queries"]
  lines = [f"test queries: {q} (never seen in training), candidates: {n} emoji",
           f"{'method':<12} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'MRR@10':>7} {'queries/s':>10}"]
  for name, key in (("CART", "cart"), ("dual tower", "dual_tower")):
    m = summary[key]
    lines.append(f"{name:<12} {m['r@1']:>7.3f} {m['r@5']:>7.3f} {m['r@10']:>7.3f} {m['mrr@10']:>7.3f} "
                 f"{m['qps']:>10.1f}")
  return "\n".join(lines)


def _worked_example(loaded) -> dict:
  """The first test query whose generated top identifier is its item (else the first query)."""
  from cart_jax.train.evaluation import split_queries
  from cart_jax.train.search import CartSearcher, describe
  texts, targets = split_queries(loaded.corpus, loaded.index, "test", 64)
  searcher = CartSearcher(loaded.graphdef, loaded.index, beam_size=10, n_results=3,
                          input_length=loaded.input_length, batch_size=64)
  rows, scores, _ = searcher.search_texts(loaded.params, loaded.frozen, texts)
  pick = next((i for i in range(len(texts)) if rows[i, 0] == targets[i]), 0)
  item = loaded.index.item_ids[int(targets[pick])]
  names = [t.text for t in loaded.corpus.texts(split="train", kind="query") if t.item_id == item][:2]
  return {"query": texts[pick], "target_item": item, "target_train_texts": names,
          "target_identifier": [int(c) for c in loaded.index.codes[int(targets[pick])]],
          "results": describe(loaded.index, rows[pick], scores[pick], loaded.corpus)}


def example_text(ex: dict) -> str:
  lines = [f"worked example: query \"{ex['query']}\"  (its item {ex['target_item']}, trained on "
           f"{', '.join(repr(t) for t in ex['target_train_texts']) or 'no texts'})"]
  for r in ex["results"]:
    mark = "  <- the query's item" if r["item_id"] == ex["target_item"] else ""
    lines.append(f"  #{r['rank']} generated identifier {tuple(r['identifier'])} (log p {r['score']:.2f}) "
                 f"-> item {r['item_id']}  {r.get('media', '')}{mark}")
  return "\n".join(lines)
