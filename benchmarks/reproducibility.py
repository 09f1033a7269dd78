"""Does a CART run give the same numbers twice, with another thread count, on another CPU?

  python benchmarks/reproducibility.py --json benchmarks/results/reproducibility.json
  python benchmarks/reproducibility.py --demo --settings default,avx2 \\
      --json benchmarks/results/reproducibility_demo.json   # the full `cart demo`, ~8 min each

Each setting runs the same pipeline in its own subprocess (fresh XLA thread pools and compile
caches): item embeddings (``api.embed``) -> identifiers (``api.build_index``) -> CART training
(``gin_bridge.train``, the demo's gin experiment) -> test recall (``api.evaluate``), on a small emoji corpus
prepared once (``--limit`` emoji; or, with ``--demo``, the whole ``cart demo``). Every artefact is
hashed: ``E.npy``, the identifier codes, CART's trained parameters, the logged losses, and the
recall figures, so the report says at which stage two settings part ways.

Settings (what differs between two machines or two runs):
  default       all cores, the CPU's best instruction set (here AVX-512)
  again         the same as ``default``: is one machine deterministic run to run?
  threads1      pinned to one core (``taskset -c 0``), XLA's Eigen thread pool off
  avx2          XLA limited to AVX2 (``--xla_cpu_max_isa=AVX2``): a CPU without AVX-512, i.e.
                another machine's vector width and so another floating-point summation order
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = {
    "default": {"env": {}, "prefix": []},
    "again": {"env": {}, "prefix": []},
    "threads1": {"env": {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false "
                                      "intra_op_parallelism_threads=1"},
                 "prefix": ["taskset", "-c", "0"]},
    "avx2": {"env": {"XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}, "prefix": []},
}
STAGES = ("embeddings", "codes", "params", "losses", "metrics")
# --tiny (the test): a 16-wide one-layer decoder
TINY = ["ModelConfig.d_model=16", "ModelConfig.d_ff=16", "ModelConfig.num_heads=2",
        "ModelConfig.head_dim=8", "ModelConfig.num_decoder_layers=1", "InputConfig.batch_size=8",
        "InputConfig.input_length=16"]


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()[:16]


def _params_hash(model_dir: Path) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cart_jax.runs.restore import load_run  # pylint: disable=g-import-not-at-top
  run = load_run(model_dir)
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(run.params):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()[:16]


def worker(args) -> dict:
  """One setting's pipeline in this process; returns hashes, losses and recall."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cart_jax import api
  from cart_jax.cli import recipes  # pylint: disable=g-import-not-at-top
  from cart_jax.cli import gin_bridge  # pylint: disable=g-import-not-at-top
  from cart_jax.data.embeddings import BuiltinEmbedOptions, embedding_files  # pylint: disable=g-import-not-at-top
  from cart_jax.index.identifiers import IdentifierConfig  # pylint: disable=g-import-not-at-top
  out = Path(args.out)
  t0 = time.perf_counter()
  if args.demo:
    summary = recipes.run_demo(recipes.IMAGE, workdir=out,
                               log=lambda m: print(m, file=sys.stderr)).summary
    model_dir, emb = Path(summary["model_dir"]), out / "emb" / "emoji.npy"
    index_dir = out / "index"
    metrics = {k: summary[k] for k in ("cart", "cart_rerank", "dual_tower")}
  else:
    emb = embedding_files(out / "emb" / "emoji.npy")
    api.embed(args.corpus, emb.embeddings, BuiltinEmbedOptions(steps=args.embed_steps), progress=False)
    index_dir = out / "index"
    ids = (IdentifierConfig(n_clusters=3, num_levels=1, codebook_size=4, rq_steps=10, rq_latent_dim=8,
                            rq_hidden_dims=(16,)) if args.tiny else
           IdentifierConfig(n_clusters=16, num_levels=2, codebook_size=16, rq_steps=100))
    api.build_index(emb.embeddings, index_dir, ids, item_ids=emb.ids)
    model_dir = out / "cart"
    gin_bridge.train([recipes.IMAGE.experiment],
              [f"MODEL_DIR='{model_dir}'", f"CORPUS_DIR='{args.corpus}'", f"INDEX_DIR='{index_dir}'",
               f"TrainConfig.num_steps={args.train_steps}",
               f"TrainConfig.log_every={1 if args.tiny else 25}",
               f"TrainConfig.warmup_steps={1 if args.tiny else 20}", "InputConfig.batch_size=64",
               f"InputConfig.state_cache_dir='{out / 'cache'}'", *(TINY if args.tiny else [])],
              progress=False)
    cart = api.evaluate(model_dir, split="test", log=lambda m: None)
    metrics = {"cart": {k: cart[k] for k in ("r@1", "r@5", "r@10", "mrr@10")}}
    emb = emb.embeddings
  losses = [json.loads(l)["train/loss"] for l in (model_dir / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in l]
  for row in metrics.values():
    if row:
      row.pop("qps", None)
  return {"hashes": {"embeddings": _sha(np.load(emb).tobytes()),
                     "codes": _sha(np.load(index_dir / "codes.npy").tobytes()),
                     "params": _params_hash(model_dir),
                     "losses": _sha(json.dumps(losses).encode()),
                     "metrics": _sha(json.dumps(metrics, sort_keys=True).encode())},
          "losses": losses, "metrics": metrics, "seconds": round(time.perf_counter() - t0, 1)}


def first_difference(a: dict, b: dict) -> str | None:
  """The first pipeline stage whose hash differs between two settings (None: identical)."""
  return next((s for s in STAGES if a["hashes"][s] != b["hashes"][s]), None)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--settings", default="default,again,threads1,avx2",
                 help=f"comma list of {list(SETTINGS)} (default: all)")
  p.add_argument("--limit", type=int, default=400, help="emoji in the small corpus (default 400)")
  p.add_argument("--embed-steps", type=int, default=60)
  p.add_argument("--train-steps", type=int, default=200)
  p.add_argument("--demo", action="store_true", help="run the whole `cart demo` per setting instead")
  p.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary directory)")
  p.add_argument("--json", default=None, help="write the report here")
  p.add_argument("--tiny", action="store_true", help="a 16-wide decoder and tiny identifiers (the test)")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--corpus", help=argparse.SUPPRESS)
  p.add_argument("--out", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(args)))
    return 0
  names = [s.strip() for s in args.settings.split(",") if s.strip()]
  bad = [s for s in names if s not in SETTINGS]
  if bad:
    p.error(f"--settings: unknown {bad}; expected names from {list(SETTINGS)}")
  work = Path(args.workdir or tempfile.mkdtemp(prefix="cart-repro-"))
  work.mkdir(parents=True, exist_ok=True)
  corpus = work / "corpus"
  if not args.demo and not (corpus / "corpus.json").exists():
    from cart_jax import api  # pylint: disable=g-import-not-at-top
    api.prepare("emoji", corpus, limit=args.limit)
  runs = {}
  for name in names:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    s = SETTINGS[name]
    cmd = [*s["prefix"], sys.executable, str(Path(__file__).resolve()), "--worker", "--out", str(out),
           "--corpus", str(corpus), "--embed-steps", str(args.embed_steps),
           "--train-steps", str(args.train_steps), *(["--demo"] if args.demo else []),
           *(["--tiny"] if args.tiny else [])]
    env = dict(os.environ, **s["env"], TF_CPP_MIN_LOG_LEVEL="3")
    print(f"[{name}] {' '.join(f'{k}={v}' for k, v in s['env'].items())} {' '.join(cmd[:len(s['prefix'])])}",
          file=sys.stderr, flush=True)
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode:
      raise SystemExit(f"{name}: worker failed ({res.returncode}):\n{res.stderr[-3000:]}")
    runs[name] = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"  {runs[name]['seconds']:.0f} s  {runs[name]['hashes']}  {runs[name]['metrics']}",
          file=sys.stderr, flush=True)
  base = names[0]
  compare = {n: {"first_difference": first_difference(runs[base], runs[n]),
                 "max_abs_loss_difference": max((abs(a - b) for a, b in
                                                 zip(runs[base]["losses"], runs[n]["losses"])), default=0.0)}
             for n in names[1:]}
  report = {"settings": {n: SETTINGS[n] for n in names}, "runs": runs, "versus": base,
            "compare": compare, "demo": args.demo, "limit": None if args.demo else args.limit,
            "train_steps": None if args.demo else args.train_steps,
            "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                        "load_avg_1m": round(os.getloadavg()[0], 2)}}
  for n, c in compare.items():
    print(f"{n} vs {base}: " + ("identical at every stage" if c["first_difference"] is None else
                                f"first differs at {c['first_difference']} (max |loss diff| "
                                f"{c['max_abs_loss_difference']:.2e})"))
  if args.json:
    from cart_jax.core.artefacts import atomic_write_json  # pylint: disable=g-import-not-at-top
    atomic_write_json(args.json, report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
