"""``cart demo``: the whole system on a built-in corpus, next to the dual-tower baseline.

  cart demo [--modality image|audio|video] [--json PATH] [--full] [--workdir DIR]

``--modality`` picks the built-in data set: image -> ``emoji`` (default), audio ->
``instruments`` (General MIDI clips rendered by fluidsynth + freedesktop event sounds),
video -> ``emoji-motion`` (emoji sprites moving, zooming, rotating, fading). The steps below
are the image demo's; the audio and video demos run the same five steps with their data set's
recipe (``DEMO_RECIPE`` in its module: embed steps, identifier shape, gin experiment).

Steps (each the code path of its own command):
  1. prepare the emoji corpus (``cart data prepare emoji``): 3,944 rendered emoji, English
     queries split train/val/test by wording, captions in 13 other languages;
  2. train the item encoder (``cart embed``): image tower vs frozen MiniLM text tower, InfoNCE;
  3. build identifiers (``cart build-ids``): K-Means K=64 + RQ-VAE M=2 x C=64 + counter;
  4. train CART (``cart train --gin_file=gin_configs/experiments/emoji_demo.gin``: the frozen
     pretrained MiniLM, its states cached once per training text, + a small fused decoder;
     ``--full``: ``emoji_cart.gin``, with R-Drop, captions, 2x the steps, and a longer item
     encoder trained on the same texts);
  5. evaluate CART (``cart eval --rerank``) and the dual tower (``cart baseline``) on the same
     ``test`` queries, print one table and one worked example (query -> generated identifier ->
     item).

Re-ranking: training gets ``EMBEDDINGS`` (the item encoder's output), so with a MiniLM-encoder
model it also builds ``MODEL_DIR/rerank/`` and tunes its weight on ``val``; the table then has a
``CART + rerank`` row: CART's own beams re-sorted by ``logp + weight * cos`` (the dual tower's
query-item cosine), from the same search pass as the ``CART`` row. A model without a MiniLM
encoder has no such row (``cart_rerank`` is null and ``rerank_note`` says why).

JSON (``--json``): {"cart": {"r@1", "r@5", "r@10", "mrr@10", "qps"}, "cart_rerank": {... ,
"weight"} or null, "dual_tower": {...}, "n_items", "n_test_queries", "seconds", "stage_seconds",
...}. Logs of every step go to ``WORKDIR/logs/``.
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

IDS = ["--clusters", "64", "--levels", "2", "--codebook-size", "64", "--rq-steps", "300"]
SMOKE_IDS = ["--clusters", "4", "--levels", "1", "--codebook-size", "8", "--rq-steps", "50"]  # --limit
DEMO = {"dataset": "emoji", "items": "emoji", "experiment": "gin_configs/experiments/emoji_demo.gin",
        "embed_args": ["--steps", "300"], "ids_args": IDS, "smoke_ids_args": SMOKE_IDS}
# --full: CART trains on 10% captions, so its dual tower does too (--captions): the same texts.
FULL = dict(DEMO, experiment="gin_configs/experiments/emoji_cart.gin",
            embed_args=["--steps", "600", "--captions"])
# --modality -> the module whose DEMO_RECIPE (same keys as DEMO) the demo runs; image is DEMO itself.
RECIPE_MODULES = {"audio": "cart_jax.data.datasets.instruments", "video": "cart_jax.data.datasets.emoji_motion"}
MODALITIES = ("image", "audio", "video")
UNSEEN_CAPTION_RATE = 0.5  # --unseen-items: share of each batch drawn from the caption texts


def recipe_for(modality: str, full: bool = False) -> dict:
  """The demo recipe of a modality (``--full`` exists for images only)."""
  from cart_jax.core.errors import CartError
  if modality not in MODALITIES:
    raise CartError(f"--modality {modality!r}: expected one of {list(MODALITIES)}")
  if modality == "image":
    return FULL if full else DEMO
  if full:
    raise CartError(f"--full is the image recipe (emoji_cart.gin); not available with --modality {modality}")
  import importlib
  recipe = dict(importlib.import_module(RECIPE_MODULES[modality]).DEMO_RECIPE)
  missing = sorted({"dataset", "experiment", "embed_args", "ids_args"} - set(recipe))
  if missing:
    raise CartError(f"{RECIPE_MODULES[modality]}.DEMO_RECIPE lacks {missing}")
  recipe.setdefault("smoke_ids_args", SMOKE_IDS)
  recipe.setdefault("items", {"audio": "clips", "video": "clips"}[modality])
  return recipe


def register(sub, name: str, help_text: str) -> argparse.ArgumentParser:
  p = sub.add_parser(name, help=help_text, description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--modality", choices=MODALITIES, default="image",
                 help="built-in data set: image = emoji (default), audio = instruments, "
                      "video = emoji-motion")
  p.add_argument("--full", action="store_true",
                 help="the full CART recipe (R-Drop, captions, 2,000 steps) and a longer item "
                      "encoder trained on the same texts")
  p.add_argument("--workdir", default=None,
                 help="keep everything here (default: a new temporary directory); steps whose "
                      "outputs already exist there are reused")
  p.add_argument("--no-templates", action="store_true",
                 help="image: the strict emoji split, without templated training wordings "
                      "('<name> emoji', '<name> icon')")
  p.add_argument("--unseen-items", type=float, default=0.0, metavar="F",
                 help="image: a share F of the items has no training query, only captions (the "
                      "paper's protocol); CART and the dual tower both train on the captions, and "
                      "recall is also reported on those items' test queries")
  p.add_argument("--limit", type=int, default=None,
                 help="smoke runs: only the first N items (video: N emoji, 11 clips each)")
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
      with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):  # progress bars too
        yield
    self.times[key] = round(time.perf_counter() - t0, 1)
    print(f"      done in {self.times[key]:.0f} s (log: {self.logs / f'{self.i}_{key}.log'})", flush=True)


def run(args) -> int:
  from cart_jax.core.errors import CartError
  from cart_jax.cli.commands import baseline, build_ids, data, embed

  t_start = time.perf_counter()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow, if a step imports it, stays quiet
  recipe = recipe_for(args.modality, args.full)
  if (args.no_templates or args.unseen_items) and args.modality != "image":
    raise CartError("--no-templates and --unseen-items are emoji (--modality image) splits")
  if args.unseen_items:
    from cart_jax.data.datasets.emoji import check_unseen_fraction
    try:
      check_unseen_fraction(args.unseen_items)
    except ValueError as e:
      raise CartError(str(e)) from None
    recipe = dict(recipe, embed_args=list(recipe["embed_args"]) + ["--captions"])
  work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix=f"cart-demo-{args.modality}-"))
  work.mkdir(parents=True, exist_ok=True)
  logs = work / "logs"
  logs.mkdir(exist_ok=True)
  dataset = recipe["dataset"]
  stem = dataset.replace("-", "_")
  corpus_dir, emb, index_dir = work / "corpus", work / "emb" / f"{stem}.npy", work / "index"
  model_dir = work / ("cart_full" if args.full else "cart")
  times: dict[str, float] = {}
  stage = _Stage(logs, times)
  flags = (" --full" if args.full else "") + (f" --modality {args.modality}" if args.modality != "image" else "")
  print(f"cart demo{flags}: working in {work}")

  with stage("prepare", f"preparing the {dataset} corpus (cart data prepare {dataset})"):
    if not (corpus_dir / "corpus.json").exists():
      argv = ["prepare", dataset, "--out", str(corpus_dir)]
      if args.limit:
        argv += ["--limit", str(args.limit)]
      if args.no_templates:
        argv += ["--no-templates"]
      if args.unseen_items:
        argv += ["--unseen-items", str(args.unseen_items)]
      _check(data.run(_sub_args(data, "data", argv)), "data prepare")

  embed_args = list(recipe["embed_args"])
  if args.embed_steps:
    embed_args += ["--steps", str(args.embed_steps)]  # argparse: the last --steps wins
  embed_steps = int(_last_value(embed_args, "--steps", 600))
  with stage("embed", f"training the item encoder, {embed_steps} steps (cart embed)"):
    if not emb.exists():
      _check(embed.run(_sub_args(embed, "embed", [
          "--corpus", str(corpus_dir), "--out", str(emb), "--no-progress"] + embed_args)), "embed")

  ids_args = recipe["ids_args"] if not args.limit else recipe["smoke_ids_args"]
  with stage("build_ids", f"building identifiers K={ids_args[1]}, M={ids_args[3]} x C={ids_args[5]} "
                          f"+ counter (cart build-ids)"):
    if not (index_dir / "meta.json").exists():
      _check(build_ids.run(_sub_args(build_ids, "build-ids", [
          "--embeddings", str(emb), "--item-ids", str(emb.with_suffix(".ids.txt")), "--out",
          str(index_dir), "--quiet"] + ids_args)), "build-ids")

  with stage("train", f"training CART ({recipe['experiment']})"):
    from cart_jax.cli import gin_config as cli_gin
    bindings = [f"MODEL_DIR='{model_dir}'", f"CORPUS_DIR='{corpus_dir}'", f"INDEX_DIR='{index_dir}'",
                f"EMBEDDINGS='{emb}'", "train_job.embeddings=%EMBEDDINGS"]  # -> MODEL_DIR/rerank/
    if args.train_steps:
      bindings.append(f"TrainConfig.num_steps={args.train_steps}")
    if args.unseen_items:  # the unseen items are known only through captions
      bindings.append(f"InputConfig.caption_rate={UNSEEN_CAPTION_RATE}")
    cli_gin.parse([recipe["experiment"]], bindings)
    with contextlib.redirect_stderr(sys.stdout):
      train_summary = cli_gin.run_train(progress=False)
    print(json.dumps(train_summary, indent=2, default=str))

  with stage("eval", "evaluating CART, CART + rerank and the dual tower on the test queries "
                     "(cart eval --rerank, cart baseline)"):
    from cart_jax.inference import rerank
    from cart_jax.inference.evaluation import eval_job
    from cart_jax.inference.runs import load_run
    loaded = load_run(model_dir)
    has_rerank = rerank.exists(model_dir)
    cart = eval_job(str(model_dir), split="test", loaded=loaded, rerank=has_rerank)
    print(json.dumps(cart, indent=2))
    base_json = work / "baseline_test.json"
    _check(baseline.run(_sub_args(baseline, "baseline", [
        "--corpus", str(corpus_dir), "--embeddings", str(emb), "--split", "test",
        "--json", str(base_json)])), "baseline")
    base = json.loads(base_json.read_text(encoding="utf-8"))
    unseen = None
    ids_file = corpus_dir / "unseen_items.txt"
    if args.unseen_items and ids_file.exists() and ids_file.read_text(encoding="utf-8").strip():
      # the same three methods on the unseen items' test queries only
      from cart_jax.data.corpus import read_item_ids
      cart_u = eval_job(str(model_dir), split="test", loaded=loaded, rerank=has_rerank,
                        items=read_item_ids(ids_file, loaded.corpus))
      base_u_json = work / "baseline_test_unseen.json"
      _check(baseline.run(_sub_args(baseline, "baseline", [
          "--corpus", str(corpus_dir), "--embeddings", str(emb), "--split", "test",
          "--items", str(ids_file), "--json", str(base_u_json)])), "baseline --items")
      base_u = json.loads(base_u_json.read_text(encoding="utf-8"))
      unseen = _three_rows(cart_u, base_u)
    example = _worked_example(loaded)

  if cart["num_queries"] != base["num_queries"]:
    raise CartError(f"CART scored {cart['num_queries']} test queries, the baseline {base['num_queries']}")
  seconds = time.perf_counter() - t_start
  rows3 = _three_rows(cart, base)
  rerank_note = None
  if rows3["cart_rerank"] is None:
    skipped = (train_summary.get("rerank") or {}).get("skipped")
    rerank_note = f"no re-ranker: {skipped}" if skipped else "no re-ranker in the run"
  summary = {
      **rows3, "rerank_note": rerank_note,
      "n_items": cart["num_items"], "n_test_queries": cart["num_queries"], "seconds": seconds,
      "stage_seconds": times, "full": bool(args.full), "experiment": recipe["experiment"],
      "embed_steps": embed_steps, "train_steps": train_summary["step"],
      "modality": args.modality, "dataset": dataset, "items": recipe.get("items", "items"),
      "workdir": str(work), "model_dir": str(model_dir), "example": example,
      "cpu_seconds": _cpu_seconds(), "machine": {"cpus": os.cpu_count(), "load_avg_1m": _load()},
      "no_templates": bool(args.no_templates), "unseen_items": args.unseen_items,
  }
  if unseen is not None:
    summary["unseen"] = {**unseen, "n_test_queries": cart_u["num_queries"],
                         "caption_rate": UNSEEN_CAPTION_RATE}
  print()
  print(table(summary))
  if unseen is not None:
    print(f"\nthe {summary['unseen']['n_test_queries']} test queries of the unseen items "
          f"(known to both methods only through captions):")
    print(table({**summary, **unseen}, header=False))
  print()
  print(example_text(example))
  print(f"\ntotal {seconds:.0f} s (stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ")")
  print(f"try: cart search --model_dir {model_dir} \"{example['query']}\" -k 5")
  if args.json:
    from cart_jax.core.artefacts import atomic_write_json
    atomic_write_json(args.json, summary)
  return 0


def _three_rows(cart: dict, base: dict) -> dict:
  """CART, CART + rerank (None without a re-ranker) and dual-tower metrics, one key spelling."""
  keys = ("r@1", "r@5", "r@10", "mrr@10", "qps")
  rr = cart.get("rerank")
  return {"cart": {k: cart[k] for k in keys},
          "cart_rerank": None if rr is None else {k: rr[k] for k in keys + ("weight",)},
          "dual_tower": {"r@1": base["R@1"], "r@5": base["R@5"], "r@10": base["R@10"],
                         "mrr@10": base["MRR@10"], "qps": base["queries_per_second"]}}


def _last_value(argv: list[str], flag: str, default):
  """The value argparse would give ``flag`` in ``argv`` (the last occurrence wins)."""
  value = default
  for i, a in enumerate(argv[:-1]):
    if a == flag:
      value = argv[i + 1]
  return value


def _check(rc, what: str) -> None:
  if rc:
    from cart_jax.core.errors import CartError
    raise CartError(f"{what} failed with exit code {rc}")


def _cpu_seconds() -> float:
  t = os.times()
  return round(t.user + t.system + t.children_user + t.children_system, 1)


def _load() -> float | None:
  try:
    return round(os.getloadavg()[0], 2)
  except OSError:
    return None


def table(summary: dict, header: bool = True) -> str:
  """The demo's results table (plain text); ``header=False`` leaves out the first line and the note."""
  n, q = summary["n_items"], summary["n_test_queries"]
  lines = [f"test queries: {q} (never seen in training), candidates: {n} {summary.get('items', 'emoji')}"]
  lines = lines if header else []
  lines.append(f"{'method':<14} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'MRR@10':>7} {'queries/s':>10}")
  for name, key in (("CART", "cart"), ("CART + rerank", "cart_rerank"), ("dual tower", "dual_tower")):
    m = summary.get(key)
    if m is None:
      continue
    lines.append(f"{name:<14} {m['r@1']:>7.3f} {m['r@5']:>7.3f} {m['r@10']:>7.3f} {m['mrr@10']:>7.3f} "
                 f"{m['qps']:>10.1f}")
  if not header:
    return "\n".join(lines)
  if summary.get("cart_rerank"):
    w = summary["cart_rerank"]["weight"]
    lines.append(f"(CART + rerank: CART's beam re-sorted by log p + {w:g} x dual-tower cosine; weight "
                 f"tuned on val)" if w != "cosine" else
                 "(CART + rerank: CART's beam re-sorted by the dual-tower cosine; chosen on val)")
  elif summary.get("rerank_note"):
    lines.append(f"(CART + rerank: {summary['rerank_note']})")
  return "\n".join(lines)


def _worked_example(loaded) -> dict:
  """The first test query whose generated top identifier is its item (else the first query)."""
  from cart_jax.inference.evaluation import split_queries
  from cart_jax.inference.searcher import CartSearcher, describe
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
