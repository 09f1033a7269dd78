"""Training steps/s of CART recipes, interleaved in one run: what the encoder-state cache buys.

  python benchmarks/train_speed.py --corpus corpora/emoji --index runs/emoji/index \\
      --json benchmarks/results/train_speed_cpu.json

Each configuration trains ``--steps`` steps of the emoji demo experiment (batch 128, 24 tokens) in its
own ``cart train`` subprocess (so thread pools and compile caches do not leak between methods), in
rounds whose order alternates (ABCD, DCBA, ...). Steps/s is the trainer's own figure over its last
logging window, i.e. after compilation; the cache build (once per set of texts) is reported apart.

Configurations:
  cached      ``minilm_frozen``: frozen MiniLM, states read from the cache (this project's recipe)
  no_cache    the same network, the frozen encoder run in every step (InputConfig.cache_encoder_states=False)
  minilm_small_trainable  the earlier ``minilm_small`` preset: 6-layer 384-wide decoder, MiniLM trained
  tiny_scratch            the earlier demo recipe: a 64-wide T5 encoder-decoder trained from scratch
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "gin_configs/experiments/emoji_demo.gin"
CONFIGS = {
    "cached": [],
    "no_cache": ["--gin.InputConfig.cache_encoder_states=False"],
    "minilm_small_trainable": ["--gin-file=gin_configs/models/minilm_small.gin",
                               "--gin.ModelConfig.freeze_encoder=False"],
    "tiny_scratch": ["--gin-file=gin_configs/models/tiny.gin", "--gin.ModelConfig.d_model=64",
                     "--gin.ModelConfig.num_heads=4", "--gin.ModelConfig.head_dim=16",
                     "--gin.ModelConfig.d_ff=128", "--gin.TrainConfig.learning_rate=0.003"],
}


def one_run(name: str, args, work: Path, cache_dir: Path) -> dict:
  model_dir = work / f"{name}-{time.time_ns()}"
  steps, window = args.steps, max(1, args.steps // 3)
  cmd = [sys.executable, "-m", "cart_jax.cli.main", "train", f"--gin-file={EXPERIMENT}", *CONFIGS[name],
         f"--gin.MODEL_DIR={model_dir}", f"--gin.CORPUS_DIR={args.corpus}", f"--gin.INDEX_DIR={args.index}",
         f"--gin.TrainConfig.num_steps={steps}", f"--gin.TrainConfig.log_every={window}",
         "--gin.TrainConfig.checkpoint_every=0", "--gin.TrainConfig.warmup_steps=1",
         f"--gin.InputConfig.state_cache_dir={cache_dir}", "--no-progress"]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  t0 = time.perf_counter()
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if out.returncode:
    raise SystemExit(f"{name}: cart train failed ({out.returncode}):\n{out.stderr[-3000:]}")
  s = json.loads((model_dir / "train_summary.json").read_text())
  shutil.rmtree(model_dir, ignore_errors=True)
  return {"config": name, "steps_per_second": s["last_metrics"]["steps_per_second"],
          "compile_seconds": s["compile_seconds"], "train_seconds": s["train_seconds"], "wall_seconds": wall,
          "state_cache": s.get("state_cache"), "load_avg_1m": os.getloadavg()[0]}


def summarize(runs: list[dict], names: list[str]) -> dict:
  """Median / min / max steps/s per configuration, and the cache's speed-up over the same network."""
  summary = {}
  for name in names:
    sps = [x["steps_per_second"] for x in runs if x["config"] == name]
    summary[name] = {"median_steps_per_second": statistics.median(sps), "min": min(sps), "max": max(sps)}
  base = summary.get("no_cache", {}).get("median_steps_per_second")
  if base and "cached" in summary:
    summary["cache_speedup"] = summary["cached"]["median_steps_per_second"] / base
  if "minilm_small_trainable" in summary and "cached" in summary:
    summary["speedup_over_minilm_small_trainable"] = (
        summary["cached"]["median_steps_per_second"] /
        summary["minilm_small_trainable"]["median_steps_per_second"])
  return summary


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--corpus", required=True, help="corpus directory (cart data prepare emoji)")
  p.add_argument("--index", required=True, help="its index (cart build-ids)")
  p.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
  p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
  p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
  p.add_argument("--json", required=True, help="write the results here")
  args = p.parse_args(argv)
  names = [n for n in args.configs.split(",") if n]
  unknown = sorted(set(names) - set(CONFIGS))
  if unknown:
    p.error(f"--configs: unknown {unknown}; expected some of {list(CONFIGS)}")
  work = Path(tempfile.mkdtemp(prefix="cart-train-speed-"))
  cache_dir = work / "state_cache"
  runs = []
  try:
    for r in range(args.rounds):
      for name in (names if r % 2 == 0 else names[::-1]):
        res = one_run(name, args, work, cache_dir)
        res["round"] = r
        runs.append(res)
        print(f"round {r} {name:<24} {res['steps_per_second']:6.2f} steps/s "
              f"(compile {res['compile_seconds']:.1f} s, load {res['load_avg_1m']:.1f})", flush=True)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  summary = summarize(runs, names)
  cache_build = [x["state_cache"] for x in runs if x["config"] == "cached" and x["state_cache"]]
  result = {"command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
            "steps": args.steps, "rounds": args.rounds, "batch_size": 128, "input_length": 24,
            "machine": {"cpus": os.cpu_count()}, "summary": summary,
            "state_cache_first_build": cache_build[0] if cache_build else None, "runs": runs}
  from cart_jax.core.artefacts import atomic_write_json  # pylint: disable=g-import-not-at-top
  atomic_write_json(args.json, result)
  print(json.dumps(summary, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
