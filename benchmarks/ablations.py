"""The paper's ablations (Table 4) on a built-in corpus: the full CART recipe and one-change variants.

Run (the default --steps 1,000 is the demo schedule; what a run costs: the end of --help):
  python benchmarks/ablations.py --dataset emoji --seeds 0,1,2
      # -> benchmarks/results/ablations_emoji.json + .png
  python benchmarks/ablations.py --dataset emoji --no-templates          # the strict split, _strict.json
  python benchmarks/ablations.py --dataset instruments --variants full,no_fusion,no_rdrop
  python benchmarks/ablations.py --dataset emoji --limit 80 --steps 20 --embed-steps 5 \
      --json /tmp/abl.json --plot /tmp/abl.png                             # smoke (minutes)

Variants (each ablation changes exactly one thing relative to ``full``):
  full         ModelConfig.fusion="both", TrainConfig.omega=1.0 (R-Drop KL), InputConfig.caption_rate=0.1,
               identifiers (k, v1..vM, u) from K-Means + RQ-VAE + counter
  no_fusion    ModelConfig.fusion="none"  (standard cross-attention on the last encoder layer)
  coarse_only  ModelConfig.fusion="coarse"
  fine_only    ModelConfig.fusion="fine"
  no_kmeans    IdentifierConfig.use_kmeans=False  (RQ-VAE on the raw embedding, no coarse token)
  no_rqvae     IdentifierConfig.use_rqvae=False   (fine tokens from hierarchical K-Means)
  no_rdrop     TrainConfig.omega=0.0  (cross-entropy only, one forward pass per step)
  no_caption   InputConfig.caption_rate=0.0  (only the human queries in each batch)
On a corpus without caption texts (instruments, emoji-motion) ``full`` has to train with
caption_rate=0.0, so ``no_caption`` would be the same run: it is listed as not applicable.

What one run is (all through ``cart_jax.api``, in-process):
  * once per setting: ``api.prepare`` the corpus, ``api.embed`` the items with the dataset's demo
    recipe's encoder options and ``captions=True`` (the dual tower sees the texts CART trains on);
    the identifiers are built by ``api.build_index`` once per IdentifierConfig (the recipe's ``ids``,
    ``smoke_ids`` with --limit, with ``seed=<seed>`` and use_kmeans/use_rqvae per variant) and
    shared by every variant that uses the same one;
  * ``gin_bridge.train`` (``cart train``) of the dataset's experiment (emoji: emoji_cart.gin, instruments:
    instruments_demo.gin, emoji-motion: emoji_motion_demo.gin) with the full recipe's bindings made
    explicit, then the variant's one override, TrainConfig.num_steps/seed, eval_every=0 (no
    validation during training) and checkpoints every 250 steps (keep 1);
  * ``api.evaluate`` on ``val`` and ``test`` (beam 10): r@1, r@5, r@10, mrr@10, qps, num_queries.
  No EMBEDDINGS binding: the runs build no dual-tower re-ranker (CART alone is what is ablated).

Resuming: the JSON is rewritten (atomically) after every finished run; a run already in it with
the same (variant, seed, steps, dataset, no_templates, limit, embed_steps, extra bindings) is
skipped. An interrupted training resumes from its checkpoint: each run has its own MODEL_DIR under
the work directory, and ``cart train`` resumes a MODEL_DIR. The work directory is
``--workdir``/<dataset>[-strict][-limitN]-embed<E>[-x<hash of --extra-binding>] (default root:
``$TMPDIR/cart-ablations``): corpus/, emb/, index/<identifier config>/, runs/<variant>-seed<s>-steps<n>/.

JSON: ``runs`` (one record per finished run: config, timings, machine load, val/test metrics,
identifier diagnostics), ``summary`` (for this invocation's setting: per variant mean/min/max/std
over seeds of test R@1, R@10, MRR@10, the delta vs full and a verdict), ``paper`` (Table 4 of the
paper and its order of harm), ``comparison`` (the measured order next to the paper's).
A verdict is "worse"/"better" only when |mean(variant) - mean(full)| exceeds the seed spread, the
larger of the two min..max ranges over seeds; otherwise "tie" (with one seed the spread is 0: any
difference decides, flagged as ``single_seed``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/ablations.py` from a checkout
  sys.path.insert(0, str(ROOT))

from cart_jax.core.artefacts import atomic_write_json  # noqa: E402
from cart_jax.core.errors import CartError  # noqa: E402
from benchmarks.driver_common import load_average as _load  # noqa: E402
from benchmarks.driver_common import log as _log  # noqa: E402
from benchmarks.driver_common import quiet_to as _quiet_to  # noqa: E402
from benchmarks.driver_common import short_hash as _short_hash  # noqa: E402
from benchmarks.driver_common import read_report, save_figure, split_binding, split_extra  # noqa: E402
from benchmarks.driver_common import train_done as _train_done  # noqa: E402

FORMAT = "cart-ablations"
VERSION = 1
DATASETS = ("emoji", "instruments", "emoji-motion")
MODALITY = {"emoji": "image", "instruments": "audio", "emoji-motion": "video"}
EXPERIMENTS = {"emoji": "gin_configs/experiments/emoji_cart.gin",
               "instruments": "gin_configs/experiments/instruments_demo.gin",
               "emoji-motion": "gin_configs/experiments/emoji_motion_demo.gin"}
# The full recipe, bound explicitly whatever the experiment file says (instruments_demo.gin and
# emoji_motion_demo.gin train without R-Drop and captions: here every dataset gets the same recipe).
FULL_BINDINGS = {"ModelConfig.fusion": '"both"', "TrainConfig.omega": "1.0",
                 "InputConfig.caption_rate": "0.1"}
CAPTION_KEY = "InputConfig.caption_rate"


@dataclasses.dataclass(frozen=True)
class Variant:
  """One ablation: gin overrides of FULL_BINDINGS and IdentifierConfig field overrides."""
  name: str
  what: str
  bindings: tuple[tuple[str, str], ...] = ()
  ids: tuple[tuple[str, bool], ...] = ()


VARIANTS = {v.name: v for v in (
    Variant("full", "fusion both, R-Drop omega 1.0, caption rate 0.1, K-Means + RQ-VAE identifiers"),
    Variant("no_fusion", "w/o feature fusion: cross-attention on the last encoder layer only",
            (("ModelConfig.fusion", '"none"'),)),
    Variant("coarse_only", "coarse fusion only", (("ModelConfig.fusion", '"coarse"'),)),
    Variant("fine_only", "fine fusion only", (("ModelConfig.fusion", '"fine"'),)),
    Variant("no_kmeans", "w/o K-Means: RQ-VAE on the raw embedding, no coarse token",
            ids=(("use_kmeans", False),)),
    Variant("no_rqvae", "w/o RQ-VAE: fine tokens from hierarchical K-Means",
            ids=(("use_rqvae", False),)),
    Variant("no_rdrop", "w/o R-Drop KL (consistency loss): cross-entropy only",
            (("TrainConfig.omega", "0.0"),)),
    Variant("no_caption", "w/o caption enhancement: queries only", ((CAPTION_KEY, "0.0"),)),
)}
# What this driver sets itself: an --extra-binding may not touch these.
RESERVED = set(FULL_BINDINGS) | {"MODEL_DIR", "CORPUS_DIR", "INDEX_DIR", "EMBEDDINGS",
                                 "TrainConfig.num_steps", "TrainConfig.seed", "TrainConfig.eval_every",
                                 "train_job.embeddings", "train_job.index_dir",
                                 "train_job.identifier_config", "IdentifierConfig.use_kmeans",
                                 "IdentifierConfig.use_rqvae", "IdentifierConfig.seed"}
CHECKPOINT_EVERY = 250

# The paper's Table 4 (Flickr30K, text-to-image), as /work/shared/paper/CART-paper-summary.txt
# gives it. Only these four ablations are in it: no caption-enhancement, coarse-only or fine-only row.
PAPER_TABLE4 = {
    "full": {"r@1": 81.78, "r@10": 98.38, "mrr@10": 88.04},
    "no_rdrop": {"r@1": 81.64, "r@10": 98.04, "mrr@10": 87.85, "paper_name": "w/o consistency loss"},
    "no_fusion": {"r@1": 75.54, "r@10": 96.72, "mrr@10": 83.11, "paper_name": "w/o fusion strategy"},
    "no_kmeans": {"r@1": 79.50, "r@10": 97.52, "mrr@10": 86.12, "paper_name": "w/o K-Means"},
    "no_rqvae": {"r@1": 76.22, "r@10": 96.16, "mrr@10": 83.31, "paper_name": "w/o RQ-VAE"},
}
PAPER_ORDER = ["no_fusion", "no_rqvae", "no_kmeans", "no_rdrop"]  # most harmful first (R@1 drop)
METRICS = ("r@1", "r@10", "mrr@10")
EVAL_KEYS = ("r@1", "r@5", "r@10", "mrr@10", "qps", "num_queries")
DIAGNOSTIC_KEYS = ("collision_rate", "max_counter", "unique_prefixes", "codebook_usage_per_level",
                   "perplexity_per_level", "rq_mse_per_level", "kmeans_empty_clusters", "id_length",
                   "level_sizes", "vocab_size", "n_items")


# ----------------------------------------------------------------------------- pure helpers

def parse_variants(text: str) -> list[str]:
  """``a,b`` -> names in the order given (duplicates dropped); ValueError names the valid ones."""
  names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
  bad = [n for n in names if n not in VARIANTS]
  if bad or not names:
    raise ValueError(f"--variants: unknown {bad or 'empty list'}; valid names: {', '.join(VARIANTS)}")
  return names


def parse_seeds(text: str) -> list[int]:
  try:
    seeds = list(dict.fromkeys(int(s) for s in text.split(",") if s.strip()))
  except ValueError:
    raise ValueError(f"--seeds {text!r}: expected a comma list of integers, e.g. 0,1,2") from None
  if not seeds or any(s < 0 for s in seeds):
    raise ValueError(f"--seeds {text!r}: expected one or more integers >= 0")
  return seeds


def variant_bindings(variant: str, has_captions: bool) -> dict[str, str]:
  """The full recipe's bindings with the variant's one override (no captions: caption rate 0)."""
  out = dict(FULL_BINDINGS)
  if not has_captions:
    out[CAPTION_KEY] = "0.0"
  out.update(dict(VARIANTS[variant].bindings))
  return out


def applicable(variant: str, has_captions: bool) -> str | None:
  """None, or why the variant cannot differ from ``full`` on this corpus."""
  if variant == "no_caption" and not has_captions:
    return "the corpus has no caption texts: full already trains with caption_rate=0"
  return None


def run_key(rec: dict) -> tuple:
  return (rec["variant"], rec["seed"], rec["steps"], rec["dataset"], bool(rec["no_templates"]),
          rec["limit"], rec["embed_steps"], tuple(rec.get("extra_bindings", ())))


def setting_key(rec: dict) -> tuple:
  """What must match for runs to be summarised together (all of run_key but variant and seed)."""
  return run_key(rec)[2:]


def _stats(values: list[float]) -> dict:
  return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
          "std": statistics.stdev(values) if len(values) > 1 else None, "values": values}


def verdict(var: dict, full: dict) -> str:
  """worse/better only when the difference of means exceeds the larger min..max range."""
  delta = var["mean"] - full["mean"]
  spread = max(var["max"] - var["min"], full["max"] - full["min"])
  if abs(delta) <= spread or delta == 0:
    return "tie"
  return "worse" if delta < 0 else "better"


def summarise(runs: list[dict]) -> dict:
  """Per variant: test R@1/R@10/MRR@10 over seeds, deltas vs full, verdicts; the paper comparison.

  ``runs``: records of one setting (same steps, dataset, split, limit, embeddings).
  """
  by_var: dict[str, list[dict]] = {}
  for r in runs:
    by_var.setdefault(r["variant"], []).append(r)
  variants = {}
  for name in [v for v in VARIANTS if v in by_var]:
    rs = sorted(by_var[name], key=lambda r: r["seed"])
    row = {"seeds": [r["seed"] for r in rs], "n_seeds": len(rs)}
    for m in METRICS:
      row[m] = _stats([float(r["test"][m]) for r in rs])
    row["val_r@1_mean"] = statistics.fmean(float(r["val"]["r@1"]) for r in rs)
    row["collision_rate"] = statistics.fmean(float(r["identifiers"]["collision_rate"]) for r in rs)
    row["train_seconds_mean"] = statistics.fmean(float(r["train"]["wall_seconds"]) for r in rs)
    variants[name] = row
  full = variants.get("full")
  if full is not None:
    for name, row in variants.items():
      if name == "full":
        continue
      row["delta_vs_full"] = {m: row[m]["mean"] - full[m]["mean"] for m in METRICS}
      row["verdict"] = {m: verdict(row[m], full[m]) for m in METRICS}
      row["single_seed"] = row["n_seeds"] < 2 or full["n_seeds"] < 2
  comparison = None
  present = [v for v in PAPER_ORDER if v in variants and "delta_vs_full" in variants[v]]
  if present:
    measured = sorted(present, key=lambda v: variants[v]["delta_vs_full"]["r@1"])
    paper = [v for v in PAPER_ORDER if v in present]
    comparison = {
        "paper_order": paper, "measured_order": measured, "same_order": measured == paper,
        "paper_r@1_drop": {v: round(PAPER_TABLE4[v]["r@1"] - PAPER_TABLE4["full"]["r@1"], 2)
                           for v in paper},
        "measured_r@1_drop_points": {v: round(100 * variants[v]["delta_vs_full"]["r@1"], 2)
                                     for v in measured},
        "note": "order = most harmful first, by the mean test R@1 change vs full (in points); the "
                "paper's Table 4 has no caption-enhancement, coarse-only or fine-only row"}
  return {"variants": variants, "comparison": comparison}


def table(summary: dict) -> str:
  """The compact text table (± is half the min..max range over seeds)."""
  lines = [f"{'variant':<12} {'seeds':>5} {'R@1':>14} {'R@10':>14} {'MRR@10':>14} {'dR@1':>7} "
           f"{'verdict':>7} {'coll.':>6}"]

  def cell(s):
    return f"{s['mean']:.3f} ±{(s['max'] - s['min']) / 2:.3f}"

  for name, row in summary["variants"].items():
    d = row.get("delta_vs_full")
    delta = "" if d is None else f"{d['r@1']:+.3f}"
    lines.append(f"{name:<12} {row['n_seeds']:>5} {cell(row['r@1']):>14} {cell(row['r@10']):>14} "
                 f"{cell(row['mrr@10']):>14} {delta:>7} "
                 f"{row.get('verdict', {}).get('r@1', ''):>7} {row['collision_rate']:>6.3f}")
  lines.append("(test split; ± = half the min..max range over seeds; verdict on R@1: worse/better only "
               "beyond the seed spread)")
  cmp = summary.get("comparison")
  if cmp:
    lines.append(f"order of harm, measured: {' > '.join(cmp['measured_order'])}; paper (Table 4): "
                 f"{' > '.join(cmp['paper_order'])}" + (" (same)" if cmp["same_order"] else ""))
  return "\n".join(lines)


def plot(summary: dict, path: str | os.PathLike, title: str) -> None:
  """Grouped bars of test R@1 / R@10 per variant (mean), min..max error bars, seeds as dots."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rows = summary["variants"]
  names = list(rows)
  x = np.arange(len(names))
  width = 0.38
  fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(names) + 3.5), 4.6))
  for j, (metric, color) in enumerate((("r@1", "tab:blue"), ("r@10", "tab:orange"))):
    xs = x + (j - 0.5) * width
    means = np.array([rows[n][metric]["mean"] for n in names])
    lo = means - np.array([rows[n][metric]["min"] for n in names])
    hi = np.array([rows[n][metric]["max"] for n in names]) - means
    ax.bar(xs, means, width, color=color, alpha=0.75, label=f"test {metric.upper()} (mean)",
           yerr=np.vstack([lo, hi]), capsize=3, error_kw={"elinewidth": 1})
    for xi, n in zip(xs, names):
      vals = rows[n][metric]["values"]
      ax.plot([xi] * len(vals), vals, "k.", markersize=4, zorder=3)
    if "full" in rows:
      ax.axhline(rows["full"][metric]["mean"], color=color, linestyle="--", linewidth=1,
                 label=f"full {metric.upper()}")
  ax.set_xticks(x)
  ax.set_xticklabels(names, rotation=20, ha="right")
  ax.set_ylim(0.0, 1.05)
  ax.set_ylabel("test recall (error bars: min..max over seeds; dots: seeds)")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  ax.grid(True, axis="y", alpha=0.3)
  save_figure(fig, path)


# ----------------------------------------------------------------------------- the driver

def _setting_dir(root: Path, args, extra: list[str]) -> Path:
  name = args.dataset + ("-strict" if args.no_templates else "") + \
      (f"-limit{args.limit}" if args.limit else "") + f"-embed{args.embed_steps}"
  if extra:
    name += f"-x{_short_hash(extra)}"
  return root / name


class _Workspace:
  """Corpus, embeddings and identifier indexes of one setting, each made once and reused."""

  def __init__(self, work: Path, args, recipe, extra: list[str]):
    self.work, self.args, self.recipe = work, args, recipe
    self.corpus_dir = work / "corpus"
    self.emb_path = work / "emb" / f"{args.dataset.replace('-', '_')}.npy"
    self.stamp = {"dataset": args.dataset, "no_templates": bool(args.no_templates),
                  "limit": args.limit, "embed_steps": args.embed_steps, "extra_bindings": extra}
    self._indexes: dict[str, tuple[Path, dict]] = {}

  def prepare(self, log_file: Path | None) -> None:
    from cart_jax import api  # pylint: disable=g-import-not-at-top
    self.work.mkdir(parents=True, exist_ok=True)
    stamp_path = self.work / "setting.json"
    if stamp_path.exists():
      old = json.loads(stamp_path.read_text(encoding="utf-8"))
      if old != self.stamp:
        raise CartError(f"{self.work} holds another setting ({old}); pass another --workdir")
    else:
      atomic_write_json(stamp_path, self.stamp)
    if not (self.corpus_dir / "corpus.json").exists():
      _log(f"preparing the {self.args.dataset} corpus in {self.corpus_dir}")
      with _quiet_to(log_file):
        api.prepare(self.args.dataset, self.corpus_dir, limit=self.args.limit,
                    templates=not self.args.no_templates, overwrite=self.corpus_dir.exists())
    if not self.emb_path.exists():
      opts = dataclasses.replace(self.recipe.embed, captions=True, steps=self.args.embed_steps)
      _log(f"training the item encoder ({opts.steps} steps, captions) -> {self.emb_path}")
      t0 = time.perf_counter()
      with _quiet_to(log_file):
        api.embed(self.corpus_dir, self.emb_path, opts, overwrite=True, progress=not self.args.quiet)
      _log(f"  embeddings done in {time.perf_counter() - t0:.0f} s")
    from cart_jax.data.captions import caption_texts  # pylint: disable=g-import-not-at-top
    from cart_jax.data.corpus import load_corpus  # pylint: disable=g-import-not-at-top
    corpus = load_corpus(self.corpus_dir, check_media=False)
    self.has_captions = bool(caption_texts(corpus))

  def index(self, cfg, log_file: Path | None) -> tuple[Path, dict]:
    """The index of ``cfg`` (built once; ``stats`` from its meta.json)."""
    from cart_jax import api  # pylint: disable=g-import-not-at-top
    from cart_jax.index.identifiers import load_index  # pylint: disable=g-import-not-at-top
    d = cfg.to_dict()
    name = f"k{int(cfg.use_kmeans)}-rq{int(cfg.use_rqvae)}-seed{cfg.seed}-{_short_hash(d)}"
    if name in self._indexes:
      return self._indexes[name]
    path = self.work / "index" / name
    if (path / "meta.json").exists():
      idx = load_index(path)
      if idx.config.to_dict() != d:
        raise CartError(f"{path}: built with another identifier config; remove it")
      stats = dict(idx.stats)
    else:
      _log(f"building identifiers {name} (K={cfg.n_clusters}, M={cfg.num_levels} x C={cfg.codebook_size}, "
           f"kmeans={cfg.use_kmeans}, rqvae={cfg.use_rqvae})")
      from cart_jax.data.embeddings import embedding_files  # pylint: disable=g-import-not-at-top
      with _quiet_to(log_file):
        built = api.build_index(self.emb_path, path, cfg, item_ids=embedding_files(self.emb_path).ids)
      stats = dict(built.stats)
      _log(f"  identifiers done in {stats.get('seconds', 0):.0f} s, collision rate "
           f"{stats.get('collision_rate', float('nan')):.3f}")
    self._indexes[name] = (path, stats)
    return path, stats


def run_one(ws: _Workspace, args, variant: str, seed: int, extra: list[str], log_file: Path | None) -> dict:
  """Trains and evaluates one (variant, seed); returns its record."""
  from cart_jax import api  # pylint: disable=g-import-not-at-top
  from cart_jax.cli import gin_bridge  # pylint: disable=g-import-not-at-top
  ids_base = ws.recipe.smoke_ids if args.limit else ws.recipe.ids
  gin_extra, ids_extra = split_extra(extra)
  cfg = dataclasses.replace(ids_base, **ids_extra, seed=seed, **dict(VARIANTS[variant].ids))
  index_dir, stats = ws.index(cfg, log_file)
  model_dir = ws.work / "runs" / f"{variant}-seed{seed}-steps{args.steps}"
  gin = variant_bindings(variant, ws.has_captions)
  bindings = [f"MODEL_DIR='{model_dir}'", f"CORPUS_DIR='{ws.corpus_dir}'", f"INDEX_DIR='{index_dir}'"]
  bindings += [f"{k}={v}" for k, v in gin.items()]
  bindings += [f"TrainConfig.num_steps={args.steps}", f"TrainConfig.seed={seed}",
               "TrainConfig.eval_every=0", f"TrainConfig.checkpoint_every={min(CHECKPOINT_EVERY, args.steps)}",
               "TrainConfig.keep_checkpoints=1"]
  bindings += gin_extra
  experiment = EXPERIMENTS[args.dataset]
  load_before = _load()
  t0 = time.perf_counter()
  done = _train_done(model_dir, args.steps)
  with _quiet_to(log_file):
    summary = done or gin_bridge.train([experiment], bindings, progress=not args.quiet)
  train_wall = time.perf_counter() - t0
  evals = {}
  t1 = time.perf_counter()
  with _quiet_to(log_file):
    for split in ("val", "test"):
      ev = api.evaluate(model_dir, split=split, log=(lambda m: None) if args.quiet else print)
      evals[split] = {k: ev[k] for k in EVAL_KEYS}
  eval_s = time.perf_counter() - t1
  return {
      "variant": variant, "seed": seed, "dataset": args.dataset, "no_templates": bool(args.no_templates),
      "limit": args.limit, "steps": args.steps, "embed_steps": args.embed_steps,
      "extra_bindings": list(extra),
      "config": {"experiment": experiment, "bindings": bindings, "identifier_config": cfg.to_dict(),
                 "what": VARIANTS[variant].what if ws.has_captions else
                         VARIANTS[variant].what.replace("caption rate 0.1", "caption rate 0 (no captions)")},
      "model_dir": str(model_dir), "index_dir": str(index_dir),
      "train": {"wall_seconds": round(train_wall if done is None else summary.get("seconds", train_wall), 2),
                "already_trained": done is not None, "step": summary.get("step"),
                "start_step": summary.get("start_step"), "train_seconds": summary.get("train_seconds"),
                "compile_seconds": summary.get("compile_seconds"),
                "last_metrics": summary.get("last_metrics"),
                "input": summary.get("input")},
      "eval_seconds": round(eval_s, 2),
      "machine": {"load_avg_1m_before": load_before, "load_avg_1m_after": _load(),
                  "cpu_count": os.cpu_count()},
      "val": evals["val"], "test": evals["test"],
      "identifiers": {k: stats.get(k) for k in DIAGNOSTIC_KEYS} | {"build_seconds": stats.get("seconds")},
      "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
  }


def _title(args, seeds: list[int]) -> str:
  split = " (strict split)" if args.no_templates else ""
  lim = f", first {args.limit} items" if args.limit else ""
  return (f"CART ablations on {args.dataset}{split}{lim}: {args.steps} training steps, "
          f"seeds {','.join(map(str, seeds))}")


def _write(report: dict, args, json_path: Path, plot_path: Path, current: tuple) -> dict:
  mine = [r for r in report["runs"] if setting_key(r) == current]
  summary = summarise(mine)
  seeds = sorted({r["seed"] for r in mine})
  report["summary"] = {"setting": {"dataset": args.dataset, "no_templates": bool(args.no_templates),
                                   "limit": args.limit, "steps": args.steps,
                                   "embed_steps": args.embed_steps, "extra_bindings": list(current[-1])},
                       "seeds": seeds, **summary}
  report["comparison"] = summary["comparison"]
  report["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
  atomic_write_json(json_path, report)
  if summary["variants"]:
    plot(summary, plot_path, _title(args, seeds))
  return summary


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(
      prog="benchmarks/ablations.py", description=__doc__,
      epilog="cost, estimated from the experiment files' measurements (2-core CPU, load ~2):\n"
             "  emoji (emoji_cart.gin: 1.5 steps/s with R-Drop): one 1,000-step run ~11 min of training\n"
             "  + ~1 min eval (val and test, 3,944 queries each); no_rdrop trains about twice as fast.\n"
             "  Once per setting: the item encoder (600 steps, ~100 s), identifiers (~45 s per config)\n"
             "  and the MiniLM states of the 50K training texts (~70 s, 2.7 GiB in $CART_CACHE_DIR).\n"
             "  All 8 variants x 1 seed: ~1.5 h; x 3 seeds: ~4.5 h.\n"
             "  instruments / emoji-motion: 3.4 steps/s without R-Drop (about half that with it).",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--dataset", choices=DATASETS, default="emoji",
                  help="built-in corpus; experiment: emoji -> emoji_cart.gin, instruments -> "
                       "instruments_demo.gin, emoji-motion -> emoji_motion_demo.gin (default: emoji)")
  ap.add_argument("--no-templates", action="store_true",
                  help="emoji only: the strict split (no templated '<name> emoji' wordings); default "
                       "report name gets _strict")
  ap.add_argument("--limit", type=int, default=None, metavar="N",
                  help="smoke runs: only the first N items, and the recipe's small identifier config")
  ap.add_argument("--variants", default=",".join(VARIANTS),
                  help=f"comma list of {', '.join(VARIANTS)} (default: all)")
  ap.add_argument("--seeds", default="0",
                  help="comma list of seeds (training init/dropout and the identifier build); default 0")
  ap.add_argument("--steps", type=int, default=1000,
                  help="CART training steps per run (default 1,000: the demo schedule, the point where "
                       "emoji_cart.gin's validation R@1 was 0.82; the published emoji_cart.gin numbers "
                       "used 2,000)")
  ap.add_argument("--embed-steps", type=int, default=None,
                  help="item-encoder steps (default: the dataset's demo recipe: emoji 600, instruments "
                       "and emoji-motion 300)")
  ap.add_argument("--workdir", default=None,
                  help="root of the work directories (corpus, embeddings, indexes, one MODEL_DIR per "
                       "run; each setting in its own subdirectory); default $TMPDIR/cart-ablations")
  ap.add_argument("--json", default=None,
                  help="report (default benchmarks/results/ablations_<dataset>[_strict].json; with "
                       "--limit: ..._limit<N>.json)")
  ap.add_argument("--plot", default=None, help="bar plot PNG (default: the --json path with .png)")
  ap.add_argument("--quiet", action="store_true",
                  help="one line per run; training/eval output goes to <workdir>/.../logs/*.log")
  ap.add_argument("--extra-binding", action="append", default=[], metavar="NAME=VALUE",
                  help="dev/tests: an extra gin binding for every run (e.g. ModelConfig.d_model=16 "
                       "to shrink the model; IdentifierConfig.X=V changes the identifier config); "
                       "recorded in the report and part of the run key (and of the work "
                       "subdirectory). May not set what the variants or the driver set")
  return ap


def main(argv=None) -> int:
  ap = build_parser()
  args = ap.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  try:
    variants = parse_variants(args.variants)
    seeds = parse_seeds(args.seeds)
    extra = [f"{n}={v}" for n, v in (split_binding(b) for b in args.extra_binding)]
    split_extra(extra)  # checks the IdentifierConfig ones
  except ValueError as e:
    ap.error(str(e))
  clash = sorted({b.split("=", 1)[0] for b in extra} & RESERVED)
  if clash:
    ap.error(f"--extra-binding may not set {clash}: the driver and the variants set those")
  if args.no_templates and args.dataset != "emoji":
    ap.error("--no-templates is the emoji strict split; not available for " + args.dataset)
  if args.steps < 1 or (args.limit is not None and args.limit < 1):
    ap.error("--steps and --limit must be >= 1")
  from cart_jax.cli import recipes  # pylint: disable=g-import-not-at-top
  recipe = recipes.recipe_for(MODALITY[args.dataset], full=args.dataset == "emoji")
  if args.embed_steps is None:
    args.embed_steps = recipe.embed.steps
  if args.embed_steps < 1:
    ap.error("--embed-steps must be >= 1")
  stem = f"ablations_{args.dataset.replace('-', '_')}" + ("_strict" if args.no_templates else "") + \
      (f"_limit{args.limit}" if args.limit else "")
  json_path = Path(args.json or ROOT / "benchmarks" / "results" / f"{stem}.json")
  plot_path = Path(args.plot) if args.plot else json_path.with_suffix(".png")
  root = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir()) / "cart-ablations"
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  try:
    return _run(args, variants, seeds, extra, recipe, json_path, plot_path, root)
  except CartError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _run(args, variants, seeds, extra, recipe, json_path, plot_path, root) -> int:
  t_start = time.perf_counter()
  report = read_report(json_path, FORMAT, VERSION, "an ablation report")
  work = _setting_dir(root, args, extra)
  current = (args.steps, args.dataset, bool(args.no_templates), args.limit, args.embed_steps,
             tuple(extra))  # setting_key of this invocation's runs
  done = {run_key(r) for r in report["runs"]}
  report.update({"format": FORMAT, "version": VERSION,
                 "command": " ".join(["benchmarks/ablations.py"] + args.argv),
                 "paper": {"table4_flickr30k": PAPER_TABLE4, "order_of_harm": PAPER_ORDER,
                           "source": "CART paper, Table 4 (Flickr30K), via the paper summary"},
                 "variants": {n: VARIANTS[n].what for n in VARIANTS}})
  todo = [(v, s) for s in seeds for v in variants]
  ws = _Workspace(work, args, recipe, extra)
  log_file = (work / "logs" / "ablations.log") if args.quiet else None
  trained = skipped = 0
  not_applicable = report.setdefault("not_applicable", {})
  prepared = False
  for i, (variant, seed) in enumerate(todo, start=1):
    key = (variant, seed, *current)
    tag = f"[{i}/{len(todo)}] {variant} seed {seed}"
    if key in done:
      _log(f"{tag}: skip {variant} {seed} (done)")
      skipped += 1
      continue
    if not prepared:
      _log(f"work directory {work}")
      ws.prepare(log_file)
      prepared = True
      import jax  # pylint: disable=g-import-not-at-top  (loaded by now)
      report["machine"] = {"cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
                           "device": jax.devices()[0].device_kind}
    why = applicable(variant, ws.has_captions)
    if why:
      _log(f"{tag}: not applicable ({why})")
      not_applicable[f"{args.dataset}:{variant}"] = why
      continue
    _log(f"{tag}: training {args.steps} steps (load {_load()}) ...")
    try:
      rec = run_one(ws, args, variant, seed, extra, log_file)
    except CartError as e:
      raise CartError(f"{variant} seed {seed}: {e}" + (f" (output: {log_file})" if log_file else "")) from None
    report["runs"].append(rec)
    done.add(run_key(rec))
    trained += 1
    _write(report, args, json_path, plot_path, current)
    _log(f"{tag}: done, train {rec['train']['wall_seconds']:.0f} s, eval {rec['eval_seconds']:.0f} s, "
         f"test R@1 {rec['test']['r@1']:.3f} R@10 {rec['test']['r@10']:.3f} "
         f"(elapsed {time.perf_counter() - t_start:.0f} s)")
  summary = _write(report, args, json_path, plot_path, current)
  if summary["variants"]:
    print(table(summary))
  _log(f"{trained} run(s) trained, {skipped} skipped; report {json_path}, plot {plot_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
