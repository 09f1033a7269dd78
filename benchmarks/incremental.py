"""Adding items to a trained run (issue 16 item 4): ``cart index add`` against full retraining.

Run (the defaults are the demo's schedule; what a run costs: the end of --help):
  python benchmarks/incremental.py --dataset emoji        # -> benchmarks/results/incremental_emoji.json + .png
  python benchmarks/incremental.py --dataset instruments
  python benchmarks/incremental.py --dataset emoji --limit 60 --steps 20 --embed-steps 5 \
      --json /tmp/incr.json                                 # smoke (minutes)

The protocol (every step through ``cart_jax.api``, in-process):
  1. ``api.prepare`` the data set; hold back ``--holdout`` (default 0.2) of its items: a seeded
     sample (``numpy.random.default_rng([seed, 16])``, ``round(holdout * N)`` items, at least 1),
     so the split is a function of the corpus and ``--seed``. Two corpora are written from it
     (media linked): ``kept`` (the old items, with all their texts) and ``new`` (the held-back
     items, with all theirs). On emoji-motion the items are clips, so a held-back clip may have
     sibling clips of the same emoji among the kept ones.
  2. Item embeddings, once: the built-in item encoder (the demo recipe's options,
     ``--embed-steps``) is trained on the **kept** corpus only (``api.embed``: its texts and
     items), so the held-back items are unseen by both towers. Its ``E.model.npz`` then encodes,
     without training (``api.embed(..., ModelEmbedOptions(model=...))``, ``cart embed --model``),
     the new corpus (``emb/new.npy``, what ``cart index add`` gets) and the whole corpus
     (``emb/all.npy``, what full retraining builds identifiers from). Every variant therefore sees
     the same vectors: the comparison isolates CART (identifiers + decoder), not the encoder; a
     real full retraining would usually retrain the encoder as well, which this leaves out (its
     cost too). The JSON records how far the encode-only rows are from the trained ones (they
     should be equal).
  3. ``base``: identifiers on the kept items (the demo recipe's IdentifierConfig, ``smoke_ids`` with
     --limit; ``seed=--seed``), CART trained on the kept corpus (the demo experiment, ``--steps``,
     no validation during training, no re-ranker). Its R@1/R@10 on the kept items' ``test``
     queries is "old before".
  4. From hard-linked copies of ``base`` (``cart index add`` replaces files, never writes into
     them), with ``emb/new.npy``:
       trie_only     ``api.index_add(..., steps=0)``: identifiers and trie only, no training
       new_only      ``replay_ratio=0.0``: fine-tuned on the new items' texts only, as many steps
                     as ``replay`` took (the same compute, no replay)
       replay        the default add (``replay_ratio`` 0.5, auto steps; ``--add-steps``,
                     ``--replay-ratio`` change them)
     and from scratch:
       full_retrain  identifiers built on all items (``emb/all.npy``, the same IdentifierConfig)
                     and CART trained on the whole corpus, the same ``--steps``
  5. Each variant: ``api.evaluate(..., items=...)`` on the new items' ``test`` queries and on the
     old items' (forgetting: old before vs after), beam 10; and its wall seconds: the add
     (``api.index_add``, from loading the run to the switch), or for ``full_retrain`` the
     identifier build plus the training. Embedding and evaluation are not in either.

The issue's record (``record``; add = ``replay``):
  {"dataset", "new_r1_add", "new_r1_full", "old_r1_before", "old_r1_after", "seconds_add",
   "seconds_full"}
and its goals per add variant (``goals``): new R@1 within 0.05 of full retraining's, old R@1 drop
<= 0.01, wall time <= 20% of full retraining's.

Resuming: the JSON is rewritten (atomically) after every finished variant; a variant already in it
with the same setting (dataset, split, limit, holdout, seed, steps, embed steps, add steps, replay
ratio, extra bindings) is skipped. The work directory (``--workdir``/<dataset>[-strict][-limitN]
-h<holdout>-seed<s>-embed<E>[-x<hash of --extra-binding>], default root
``$TMPDIR/cart-incremental``) keeps the corpora, embeddings, indexes and runs; an interrupted
``base``/``full_retrain`` training resumes from its checkpoint, an interrupted add starts again from
a fresh copy of ``base``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/incremental.py` from a checkout
  sys.path.insert(0, str(ROOT))

from benchmarks.driver_common import (load_average as _load, log as _log,  # noqa: E402
                                      quiet_to as _quiet_to, read_report, save_figure,
                                      short_hash as _short_hash, split_binding, split_extra,
                                      train_done as _train_done)
from cart_jax.core.artefacts import atomic_write_json  # noqa: E402
from cart_jax.core.errors import CartError  # noqa: E402

FORMAT = "cart-incremental"
VERSION = 1
DATASETS = ("emoji", "instruments", "emoji-motion")
MODALITY = {"emoji": "image", "instruments": "audio", "emoji-motion": "video"}
VARIANTS = {
    "base": "trained on the kept items only (the run the others start from; old items 'before')",
    "trie_only": "cart index add --steps 0: identifiers and trie only, no fine-tuning",
    "replay": "cart index add --distill 0 --new-item-prior none: fine-tuned on new texts + a replay "
              "of old ones (the add before distillation and the prior)",
    "new_only": "cart index add --replay-ratio 0 --distill 0 --new-item-prior none: fine-tuned on "
                "the new items' texts only, as many steps as replay",
    "distill": "replay + a strong distillation (--distill 1.0) from the run before the add on "
               "the replayed texts",
    "prior": "replay + the new items' decode-time prior (--new-item-prior auto --distill 0)",
    "add": "cart index add (default): replay + a light distillation (--distill 0.1)",
    "textless": "cart index add --pseudo-queries 8 of the new items with their training texts "
                "removed: pseudo-queries from the dual tower stand in for them",
    "full_retrain": "identifiers built on all items, CART trained from scratch on all, same steps",
}
ORDER = ("base", "trie_only", "replay", "new_only", "distill", "prior", "add", "textless",
         "full_retrain")  # new_only reuses replay's steps
ADD_VARIANTS = ("trie_only", "new_only", "replay", "distill", "prior", "add", "textless")
PLOT_ORDER = ("base", "trie_only", "new_only", "replay", "distill", "prior", "add", "textless",
              "full_retrain")
HEADLINE = "add"  # the variant the record and its goals are about: cart index add's defaults
# add variant -> cart index add options beside steps / replay ratio / seed
ADD_OPTIONS = {
    "trie_only": {},
    "replay": {"distill": 0.0, "new_item_prior": "none"},
    "new_only": {"distill": 0.0, "new_item_prior": "none"},
    "distill": {"distill": 1.0, "new_item_prior": "none"},
    "prior": {"distill": 0.0, "new_item_prior": "auto"},
    "add": {},
    "textless": {"pseudo_queries": 8},
}
RECORD_KEYS = ("dataset", "new_r1_add", "new_r1_full", "old_r1_before", "old_r1_after",
               "old_r1_full", "seconds_add", "seconds_full")
GOAL_NEW_WITHIN = 0.05
GOAL_OLD_DROP = 0.01
GOAL_TIME_FRACTION = 0.2
EVAL_KEYS = ("r@1", "r@5", "r@10", "mrr@10", "qps", "num_queries")
RESERVED = {"MODEL_DIR", "CORPUS_DIR", "INDEX_DIR", "EMBEDDINGS", "TrainConfig.num_steps",
            "TrainConfig.seed", "TrainConfig.eval_every", "train_job.embeddings",
            "train_job.index_dir", "train_job.identifier_config", "IdentifierConfig.seed"}
SPLIT_SALT = 16  # the hold-out sample's rng: default_rng([seed, SPLIT_SALT])


# ----------------------------------------------------------------------------- pure helpers

def holdout_split(item_ids: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
  """(kept, held back), both in corpus order: a seeded sample of ``round(fraction * N)`` items."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  n = len(item_ids)
  k = max(1, int(round(fraction * n)))
  if k >= n:
    raise CartError(f"--holdout {fraction}: holds back {k} of {n} items, none left to train on")
  pick = set(np.random.default_rng([seed, SPLIT_SALT]).choice(n, k, replace=False).tolist())
  return ([i for j, i in enumerate(item_ids) if j not in pick],
          [i for j, i in enumerate(item_ids) if j in pick])


def setting_of(args, extra: list[str]) -> dict:
  return {"dataset": args.dataset, "no_templates": bool(args.no_templates), "limit": args.limit,
          "holdout": args.holdout, "seed": args.seed, "steps": args.steps,
          "embed_steps": args.embed_steps, "add_steps": args.add_steps,
          "replay_ratio": args.replay_ratio, "extra_bindings": list(extra)}


def goals(add: dict, full: dict, before: dict) -> dict:
  """The issue's goals for one add variant's record: new R@1 within 0.05 of full retraining's;
  old R@1 at least the higher of (before - 0.01) and full retraining's own old R@1; wall time at
  most 20% of full retraining's."""
  new_gap = full["new"]["r@1"] - add["new"]["r@1"]
  old_drop = before["old"]["r@1"] - add["old"]["r@1"]
  old_floor = max(before["old"]["r@1"] - GOAL_OLD_DROP, full["old"]["r@1"])
  frac = add["seconds"] / full["seconds"] if full["seconds"] > 0 else None
  return {
      "new_r1_gap_to_full": new_gap, "new_within_0.05_of_full": bool(new_gap <= GOAL_NEW_WITHIN),
      "old_r1_drop": old_drop, "old_drop_le_0.01": bool(old_drop <= GOAL_OLD_DROP),
      "old_r1_vs_full": add["old"]["r@1"] - full["old"]["r@1"],
      "old_r1_floor": old_floor, "old_r1_at_least_floor": bool(add["old"]["r@1"] >= old_floor),
      "time_fraction_of_full": frac,
      "time_le_20pct_of_full": None if frac is None else bool(frac <= GOAL_TIME_FRACTION),
  }


def summarise(runs: dict[str, dict], dataset: str) -> dict:
  """``record`` (the issue's keys; None where a variant is missing) and ``goals`` per add variant."""
  base, full, add = runs.get("base"), runs.get("full_retrain"), runs.get(HEADLINE)
  record = {
      "dataset": dataset,
      "new_r1_add": add["new"]["r@1"] if add else None,
      "new_r1_full": full["new"]["r@1"] if full else None,
      "old_r1_before": base["old"]["r@1"] if base else None,
      "old_r1_after": add["old"]["r@1"] if add else None,
      # full retraining's own old R@1: the old items compete with the new ones there too
      "old_r1_full": full["old"]["r@1"] if full else None,
      "seconds_add": add["seconds"] if add else None,
      "seconds_full": full["seconds"] if full else None,
      # beside the issue's keys: where the old test queries' rank-1 errors went
      "old_errors_before": base.get("old_errors") if base else None,
      "old_errors_add": add.get("old_errors") if add else None,
      "old_errors_full": full.get("old_errors") if full else None,
  }
  out_goals = {}
  if base and full:
    for v in ADD_VARIANTS:
      if v in runs:
        out_goals[v] = goals(runs[v], full, base)
  return {"record": record, "goals": out_goals}


def table(runs: dict[str, dict]) -> str:
  lines = [f"{'variant':<13} {'new R@1':>8} {'new R@10':>9} {'old R@1':>8} {'old R@10':>9} "
           f"{'seconds':>8} {'steps':>6}"]
  for v in PLOT_ORDER:
    r = runs.get(v)
    if r is None:
      continue
    new = r.get("new")
    cell = (lambda m, k: f"{m[k]:.3f}" if m else "-")
    lines.append(f"{v:<13} {cell(new, 'r@1'):>8} {cell(new, 'r@10'):>9} {cell(r['old'], 'r@1'):>8} "
                 f"{cell(r['old'], 'r@10'):>9} {r['seconds']:>8.1f} {r.get('train_steps', '-')!s:>6}")
  lines.append("(test queries; new = the held-back items', old = the kept items'; seconds: the add, "
               "or identifiers + training)")
  return "\n".join(lines)


def plot(runs: dict[str, dict], path: str | os.PathLike, title: str) -> None:
  """Left: new and old R@1 per variant (old before as a line); right: wall seconds per variant."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  names = [v for v in PLOT_ORDER if v in runs]
  x = np.arange(len(names))
  w = 0.38
  fig, (ax, at) = plt.subplots(1, 2, figsize=(12.0, 4.6), gridspec_kw={"width_ratios": [3, 2]})
  for j, (part, color) in enumerate((("new", "tab:green"), ("old", "tab:blue"))):
    vals = [runs[n][part]["r@1"] if runs[n].get(part) else np.nan for n in names]
    bars = ax.bar(x + (j - 0.5) * w, vals, w, color=color, alpha=0.8, label=f"{part} items' R@1")
    for b, val in zip(bars, vals):
      if not np.isnan(val):
        ax.annotate(f"{val:.2f}", (b.get_x() + b.get_width() / 2, val), ha="center", va="bottom",
                    fontsize=7)
  if "base" in runs:
    ax.axhline(runs["base"]["old"]["r@1"], color="tab:blue", linestyle="--", linewidth=1,
               label="old R@1 before (base)")
  ax.set_xticks(x)
  ax.set_xticklabels(names, rotation=30)
  ax.set_ylim(0.0, 1.08)
  ax.set_ylabel("test R@1")
  ax.legend(fontsize=7, loc="upper left")
  ax.grid(True, axis="y", alpha=0.3)
  ax.set_title(title, fontsize=9)
  secs = [runs[n]["seconds"] for n in names]
  bars = at.bar(x, secs, 0.6, color=["tab:gray" if n in ("base", "full_retrain") else "tab:orange"
                                      for n in names])
  for b, s in zip(bars, secs):
    at.annotate(f"{s:.0f} s", (b.get_x() + b.get_width() / 2, s), ha="center", va="bottom", fontsize=7)
  if "full_retrain" in runs:
    at.axhline(GOAL_TIME_FRACTION * runs["full_retrain"]["seconds"], color="k", linestyle=":",
               linewidth=1, label="20% of full retraining")
    at.legend(fontsize=7, loc="upper left")
  at.set_xticks(x)
  at.set_xticklabels(names, rotation=30)
  at.set_ylabel("wall seconds (add, or identifiers + training)")
  at.grid(True, axis="y", alpha=0.3)
  save_figure(fig, path)


# ----------------------------------------------------------------------------- the driver

def _sub_corpus(full, out: Path, keep: set[str]) -> None:
  from cart_jax.data.corpus import write_corpus  # pylint: disable=g-import-not-at-top
  items = [it for it in full.items if it.id in keep]
  write_corpus(out, full.name, full.modality, items, [t for t in full.all_texts if t.item_id in keep],
               media_sources={it.id: full.media_path(it) for it in items}, media_mode="symlink",
               meta={"subset_of": str(full.root), "items": len(items)}, overwrite=True)


def _copy_run(src: Path, dst: Path) -> str:
  """``dst`` = a fresh hard-linked copy of ``src`` (a copy where linking fails)."""
  shutil.rmtree(dst, ignore_errors=True)
  try:
    shutil.copytree(src, dst, copy_function=os.link, symlinks=True)
    return "hardlink"
  except OSError:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, symlinks=True)
    return "copy"


class _Workspace:
  """Corpora, embeddings, identifiers and the runs of one setting, each made once and reused."""

  def __init__(self, work: Path, args, recipe, extra: list[str], log_file: Path | None):
    self.work, self.args, self.recipe, self.log_file = work, args, recipe, log_file
    self.full_dir, self.kept_dir, self.new_dir = (work / "corpus" / n for n in ("full", "kept", "new"))
    self.emb_kept, self.emb_new, self.emb_all = (work / "emb" / f"{n}.npy" for n in ("kept", "new", "all"))
    self.gin_extra, ids_extra = split_extra(extra)
    base_ids = recipe.smoke_ids if args.limit else recipe.ids
    self.ids_config = dataclasses.replace(base_ids, **ids_extra, seed=args.seed)
    self.stamp = {k: v for k, v in setting_of(args, extra).items()
                  if k not in ("steps", "add_steps", "replay_ratio")}
    self.kept: list[str] = []
    self.new: list[str] = []
    self.embeddings: dict = {}

  def _quiet(self):
    return _quiet_to(self.log_file)

  def prepare(self) -> None:
    """Corpora, the split and the embeddings (each only when missing)."""
    from cart_jax import api  # pylint: disable=g-import-not-at-top
    from cart_jax.data.corpus import load_corpus  # pylint: disable=g-import-not-at-top
    self.work.mkdir(parents=True, exist_ok=True)
    stamp_path = self.work / "setting.json"
    if stamp_path.exists():
      old = json.loads(stamp_path.read_text(encoding="utf-8"))
      if old != self.stamp:
        raise CartError(f"{self.work} holds another setting ({old}); pass another --workdir")
    else:
      atomic_write_json(stamp_path, self.stamp)
    args = self.args
    if not (self.full_dir / "corpus.json").exists():
      _log(f"preparing the {args.dataset} corpus in {self.full_dir}")
      with self._quiet():
        api.prepare(args.dataset, self.full_dir, limit=args.limit, templates=not args.no_templates,
                    overwrite=self.full_dir.exists())
    full = load_corpus(self.full_dir, check_media=False)
    self.kept, self.new = holdout_split(full.item_ids, args.holdout, args.seed)
    split_path = self.work / "split.json"
    split = {"kept": self.kept, "new": self.new}
    if split_path.exists() and json.loads(split_path.read_text(encoding="utf-8")) != split:
      raise CartError(f"{split_path}: another hold-out split than this corpus and --seed give; "
                      "pass another --workdir")
    if not split_path.exists():
      for d, ids in ((self.kept_dir, self.kept), (self.new_dir, self.new)):
        _sub_corpus(full, d, set(ids))
      atomic_write_json(split_path, split)  # last: the corpora exist once it does
    _log(f"hold-out: {len(self.new)} of {len(full.item_ids)} items held back (seed {args.seed})")
    t = {}
    if not self.emb_kept.exists():
      opts = dataclasses.replace(self.recipe.embed, steps=args.embed_steps)
      _log(f"training the item encoder on the kept items ({opts.steps} steps) -> {self.emb_kept}")
      t0 = time.perf_counter()
      with self._quiet():
        api.embed(self.kept_dir, self.emb_kept, opts, overwrite=True, progress=not args.quiet)
      t["train_encoder_kept"] = time.perf_counter() - t0
    from cart_jax.data.embeddings import ModelEmbedOptions, embedding_files  # pylint: disable=g-import-not-at-top
    model = ModelEmbedOptions(model=str(embedding_files(self.emb_kept).model))
    for path, corpus_dir, key in ((self.emb_new, self.new_dir, "encode_new"),
                                  (self.emb_all, self.full_dir, "encode_all")):
      if not path.exists():
        _log(f"encoding {corpus_dir.name} items with the kept items' encoder -> {path}")
        t0 = time.perf_counter()
        with self._quiet():
          api.embed(corpus_dir, path, model, overwrite=True, progress=not args.quiet)
        t[key] = time.perf_counter() - t0
    self.embeddings = self._check_embeddings()
    if t:
      self.embeddings["seconds"] = t

  def textless_corpus(self) -> Path:
    """The new items with every ``train`` text removed (their val/test texts kept): made once."""
    from cart_jax.data.corpus import load_corpus, write_corpus  # pylint: disable=g-import-not-at-top
    out = self.work / "corpus" / "new_textless"
    if not (out / "corpus.json").exists():
      new = load_corpus(self.new_dir, check_media=False)
      write_corpus(out, new.name, new.modality, list(new.items),
                   [t for t in new.all_texts if t.split != "train"],
                   media_sources={it.id: new.media_path(it) for it in new.items},
                   media_mode="symlink", meta={"subset_of": str(new.root), "train_texts": "removed"},
                   overwrite=True)
    return out

  def _check_embeddings(self) -> dict:
    """How far the encode-only rows are from the trained encoder's own (expected: 0)."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    from cart_jax.data.embeddings import read_embeddings_with_ids  # pylint: disable=g-import-not-at-top
    rows = {}
    for name, path in (("kept", self.emb_kept), ("new", self.emb_new), ("all", self.emb_all)):
      arr, ids = read_embeddings_with_ids(path)
      rows[name] = dict(zip(ids, np.asarray(arr, np.float32)))
    kept_diff = max(float(np.max(np.abs(rows["all"][i] - rows["kept"][i]))) for i in self.kept)
    new_diff = max(float(np.max(np.abs(rows["all"][i] - rows["new"][i]))) for i in self.new)
    dim = len(next(iter(rows["all"].values())))
    return {"dim": dim, "kept_trained_vs_encoded_max_abs_diff": kept_diff,
            "new_vs_all_encoded_max_abs_diff": new_diff,
            "encoder": "built-in, trained on the kept items' texts only (both towers never saw "
                       "the held-back items)"}

  def index(self, name: str, emb: Path) -> tuple[Path, dict, float]:
    """The identifiers of ``emb`` (built once): (dir, stats, the seconds the build took, also when
    reused: they are kept beside the index, since its directory lists exactly its own files)."""
    from cart_jax import api  # pylint: disable=g-import-not-at-top
    from cart_jax.data.embeddings import embedding_files  # pylint: disable=g-import-not-at-top
    from cart_jax.index.identifiers import load_index  # pylint: disable=g-import-not-at-top
    path = self.work / "index" / f"{name}-{_short_hash(self.ids_config.to_dict())}"
    timing = path.with_name(path.name + ".seconds.json")
    if (path / "meta.json").exists():
      took = json.loads(timing.read_text())["seconds"] if timing.exists() else 0.0
      return path, dict(load_index(path).stats), took
    cfg = self.ids_config
    _log(f"building identifiers on the {name} items (K={cfg.n_clusters}, M={cfg.num_levels} x "
         f"C={cfg.codebook_size})")
    t0 = time.perf_counter()
    with self._quiet():
      built = api.build_index(emb, path, cfg, item_ids=embedding_files(emb).ids)
    took = time.perf_counter() - t0
    atomic_write_json(timing, {"seconds": took})
    return path, dict(built.stats), took

  def train(self, model_dir: Path, corpus_dir: Path, index_dir: Path) -> tuple[dict, float, bool]:
    """CART on ``corpus_dir`` (resumes; reused when finished): (summary, seconds, was done)."""
    from cart_jax.cli import gin_bridge  # pylint: disable=g-import-not-at-top  (the demo's gin experiment)
    args = self.args
    done = _train_done(model_dir, args.steps)
    if done is not None:
      return done, float(done.get("seconds") or 0.0), True
    bindings = [f"MODEL_DIR='{model_dir}'", f"CORPUS_DIR='{corpus_dir}'", f"INDEX_DIR='{index_dir}'",
                f"TrainConfig.num_steps={args.steps}", f"TrainConfig.seed={args.seed}",
                "TrainConfig.eval_every=0", *self.gin_extra]
    t0 = time.perf_counter()
    with self._quiet():
      summary = gin_bridge.train([self.recipe.experiment], bindings, progress=not args.quiet)
    return summary, time.perf_counter() - t0, False

  def evaluate(self, model_dir: Path, ids: list[str]) -> dict:
    from cart_jax import api  # pylint: disable=g-import-not-at-top
    with self._quiet():
      ev = api.evaluate(model_dir, split="test", items=set(ids),
                        log=(lambda m: None) if self.args.quiet else print)
    return {k: ev[k] for k in EVAL_KEYS}

  def old_errors(self, model_dir: Path) -> dict:
    """Where the old items' test queries go wrong at rank 1: to a new item (the added items
    compete for them) or to another old item (what the model forgot). Forgetting proper is the
    second share's rise over ``base``'s."""
    from cart_jax import api  # pylint: disable=g-import-not-at-top
    from cart_jax.data.corpus import load_corpus  # pylint: disable=g-import-not-at-top
    kept, new = set(self.kept), set(self.new)
    qs = [t for t in load_corpus(self.full_dir).texts(split="test")
          if t.item_id in kept and t.kind == "query"]
    if not qs:
      return {"queries": 0}
    with self._quiet():
      res = api.search(model_dir, [t.text for t in qs], k=1, log=lambda m: None)
    top = [r["results"][0]["item_id"] if r["results"] else None for r in res]
    right = sum(t.item_id == g for t, g in zip(qs, top))
    to_new = sum(g in new for t, g in zip(qs, top) if g != t.item_id)
    n = len(qs)
    return {"queries": n, "r@1": right / n, "error_to_new_item": to_new / n,
            "error_to_old_item": (n - right - to_new) / n}


def run_variant(ws: _Workspace, variant: str, runs: dict[str, dict]) -> dict:
  """Runs one variant and evaluates it; returns its record."""
  from cart_jax import api  # pylint: disable=g-import-not-at-top
  args = ws.args
  rec: dict = {"variant": variant, "what": VARIANTS[variant]}
  load_before = _load()
  if variant in ("base", "full_retrain"):
    name = "kept" if variant == "base" else "all"
    index_dir, stats, ids_s = ws.index(name, ws.emb_kept if variant == "base" else ws.emb_all)
    model_dir = ws.work / "runs" / f"{variant}-steps{args.steps}"
    corpus = ws.kept_dir if variant == "base" else ws.full_dir
    summary, train_s, reused = ws.train(model_dir, corpus, index_dir)
    rec.update({"model_dir": str(model_dir), "index_dir": str(index_dir),
                "seconds": ids_s + train_s, "seconds_identifiers": ids_s, "seconds_train": train_s,
                "train_steps": summary.get("step"), "start_step": summary.get("start_step"),
                "train_reused": reused,
                "last_metrics": summary.get("last_metrics"),
                "identifiers": {k: stats.get(k) for k in ("n_items", "collision_rate", "max_counter",
                                                          "level_sizes", "vocab_size")}})
    if reused:
      rec["note"] = "training finished by an earlier invocation: seconds_train is its summary's"
    elif summary.get("start_step"):
      rec["note"] = (f"training resumed at step {summary['start_step']}: seconds cover only the "
                     "steps after it")
  else:
    base_dir = Path(runs["base"]["model_dir"])
    if _train_done(base_dir, args.steps) is None:  # the work directory lost it: train it again
      _log("base run missing from the work directory: training it again")
      index_dir, _, _ = ws.index("kept", ws.emb_kept)
      ws.train(base_dir, ws.kept_dir, index_dir)
    model_dir = ws.work / "runs" / f"{variant}-steps{args.steps}"
    link = _copy_run(base_dir, model_dir)
    if variant == "trie_only":
      steps, ratio = 0, args.replay_ratio
    elif variant == "new_only":  # the same steps as replay
      steps, ratio = runs["replay"]["add"]["fine_tune_steps"], 0.0
    else:
      steps, ratio = args.add_steps, args.replay_ratio
    options = ADD_OPTIONS[variant]
    new_dir = ws.textless_corpus() if variant == "textless" else ws.new_dir
    t0 = time.perf_counter()
    with ws._quiet():  # pylint: disable=protected-access
      s = api.index_add(model_dir, new_dir, ws.emb_new, steps=steps, replay_ratio=ratio,
                        seed=args.seed, progress=not args.quiet, **options,
                        log=(lambda m: None) if args.quiet else print)
    wall = time.perf_counter() - t0
    ft = s.get("fine_tune") or {}
    rec.update({"model_dir": str(model_dir), "copy": link, "seconds": wall,
                "add": {"steps_requested": steps, "replay_ratio": ratio, "options": options,
                        "distill": ft.get("distill"), "new_item_prior": s.get("new_item_prior"),
                        "pseudo_queries": ft.get("pseudo_queries"),
                        "fine_tune_steps": ft.get("steps", 0), "new_texts": ft.get("new_texts"),
                        "replay_texts": ft.get("replay_texts"),
                        "new_per_batch": ft.get("new_per_batch"),
                        "replay_per_batch": ft.get("replay_per_batch"),
                        "fine_tune_seconds": ft.get("seconds"),
                        "last_metrics": ft.get("last_metrics"), "version": s.get("version"),
                        "vocab_grew_by": s.get("vocab_grew_by"), "step": s.get("step"),
                        "stage_seconds": s.get("stage_seconds"),
                        "summary_seconds": s.get("seconds")},
                "train_steps": ft.get("steps", 0)})
  t1 = time.perf_counter()
  rec["old"] = ws.evaluate(model_dir, ws.kept)
  rec["new"] = None if variant == "base" else ws.evaluate(model_dir, ws.new)
  rec["old_errors"] = ws.old_errors(model_dir)
  rec["eval_seconds"] = time.perf_counter() - t1
  rec["machine"] = {"load_avg_1m_before": load_before, "load_avg_1m_after": _load(),
                    "cpu_count": os.cpu_count()}
  rec["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
  return rec


def _title(args) -> str:
  split = " (strict split)" if args.no_templates else ""
  lim = f", first {args.limit} items" if args.limit else ""
  return (f"adding {args.holdout:.0%} held-back items to a CART run on {args.dataset}{split}{lim}: "
          f"{args.steps} training steps, seed {args.seed}")


def _current(report: dict, setting: dict) -> dict[str, dict]:
  return {r["variant"]: r for r in report["runs"] if r.get("setting") == setting}


def _write(report: dict, args, setting: dict, json_path: Path, plot_path: Path) -> dict[str, dict]:
  runs = _current(report, setting)
  s = summarise(runs, args.dataset)
  report.update({"setting": setting, "record": s["record"], "goals": s["goals"],
                 "holdout": report.get("holdout"), "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})
  atomic_write_json(json_path, report)
  if runs:
    plot(runs, plot_path, _title(args))
  return runs


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(
      prog="benchmarks/incremental.py", description=__doc__,
      epilog="cost (2-core CPU, estimated: the demo's 3.4 steps/s at batch 128 plus the fixed costs a\n"
             "  30-item smoke run measured): the two trainings dominate, 1,000 steps ~5 min each\n"
             "  (+ ~20 s compile and state cache); the two fine-tuning adds (auto: at most 20% of\n"
             "  --steps, 200 on emoji) ~1 min + ~12 s each, the trie-only add seconds; the item\n"
             "  encoder (300 steps) ~20 s; nine evaluations (3.4 s compile each) ~85 s on emoji.\n"
             "  emoji or instruments: ~15 min each on a quiet machine, 2-2.5x that at load ~5.",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--dataset", choices=DATASETS, default="emoji",
                  help="built-in corpus; its demo recipe (experiment, encoder, identifiers)")
  ap.add_argument("--no-templates", action="store_true",
                  help="emoji only: the strict split; default report name gets _strict")
  ap.add_argument("--limit", type=int, default=None, metavar="N",
                  help="smoke runs: only the first N items, and the recipe's small identifier config")
  ap.add_argument("--holdout", type=float, default=0.2,
                  help="share of the items held back and added later (default 0.2)")
  ap.add_argument("--seed", type=int, default=0,
                  help="the hold-out sample, identifiers, training and the add (default 0)")
  ap.add_argument("--steps", type=int, default=1000,
                  help="CART training steps of base and of full retraining (default 1,000: the demo's)")
  ap.add_argument("--embed-steps", type=int, default=None,
                  help="item-encoder steps (default: the dataset's demo recipe's)")
  ap.add_argument("--add-steps", type=int, default=None,
                  help="fine-tuning steps of the replay add (default: cart index add's auto steps); "
                       "new_only takes as many")
  ap.add_argument("--replay-ratio", type=float, default=None,
                  help="the replay add's share of old texts per batch (default: cart index add's, 0.5)")
  ap.add_argument("--redo", default="", metavar="V1,V2",
                  help="run these variants again even if the report has them for this setting "
                       f"(of {', '.join(ORDER)})")
  ap.add_argument("--variants", default=",".join(ORDER), metavar="V1,V2",
                  help="the variants to run (default: all; base runs first whenever an add needs it)")
  ap.add_argument("--workdir", default=None,
                  help="root of the work directories (default $TMPDIR/cart-incremental)")
  ap.add_argument("--json", default=None,
                  help="report (default benchmarks/results/incremental_<dataset>[_strict][_limitN].json)")
  ap.add_argument("--plot", default=None, help="plot PNG (default: the --json path with .png)")
  ap.add_argument("--quiet", action="store_true",
                  help="one line per step; the stages' output goes to <workdir>/.../logs/incremental.log")
  ap.add_argument("--extra-binding", action="append", default=[], metavar="NAME=VALUE",
                  help="dev/tests: an extra gin binding for both trainings (e.g. ModelConfig.d_model=16; "
                       "IdentifierConfig.X=V changes the identifier config); part of the setting")
  return ap


def main(argv=None) -> int:
  ap = build_parser()
  args = ap.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  try:
    extra = [f"{n}={v}" for n, v in (split_binding(b) for b in args.extra_binding)]
    split_extra(extra)  # checks the IdentifierConfig ones
  except ValueError as e:
    ap.error(str(e))
  clash = sorted({b.split("=", 1)[0] for b in extra} & RESERVED)
  if clash:
    ap.error(f"--extra-binding may not set {clash}: the driver sets those")
  if args.no_templates and args.dataset != "emoji":
    ap.error("--no-templates is the emoji strict split; not available for " + args.dataset)
  if args.steps < 1 or (args.limit is not None and args.limit < 2):
    ap.error("--steps must be >= 1 and --limit >= 2")
  if not 0.0 < args.holdout < 1.0:
    ap.error(f"--holdout {args.holdout}: must be in (0, 1)")
  if args.add_steps is not None and args.add_steps < 1:
    ap.error("--add-steps must be >= 1 (trie_only is the 0-step add)")
  from cart_jax.jobs.index_update import DEFAULT_REPLAY_RATIO  # pylint: disable=g-import-not-at-top
  if args.replay_ratio is None:
    args.replay_ratio = DEFAULT_REPLAY_RATIO
  if not 0.0 < args.replay_ratio < 1.0:
    ap.error(f"--replay-ratio {args.replay_ratio}: must be in (0, 1) (new_only is the 0 one)")
  from cart_jax.cli import recipes  # pylint: disable=g-import-not-at-top
  recipe = recipes.recipe_for(MODALITY[args.dataset])
  if args.embed_steps is None:
    args.embed_steps = recipe.embed.steps
  if args.embed_steps < 1:
    ap.error("--embed-steps must be >= 1")
  stem = f"incremental_{args.dataset.replace('-', '_')}" + ("_strict" if args.no_templates else "") + \
      (f"_limit{args.limit}" if args.limit else "")
  json_path = Path(args.json or ROOT / "benchmarks" / "results" / f"{stem}.json")
  plot_path = Path(args.plot) if args.plot else json_path.with_suffix(".png")
  root = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir()) / "cart-incremental"
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  try:
    return _run(args, extra, recipe, json_path, plot_path, root)
  except CartError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _run(args, extra, recipe, json_path, plot_path, root) -> int:
  t_start = time.perf_counter()
  report = read_report(json_path, FORMAT, VERSION, "an incremental report")
  setting = setting_of(args, extra)
  name = args.dataset + ("-strict" if args.no_templates else "") + \
      (f"-limit{args.limit}" if args.limit else "") + f"-h{args.holdout:g}-seed{args.seed}" + \
      f"-embed{args.embed_steps}" + (f"-x{_short_hash(extra)}" if extra else "")
  work = root / name
  log_file = (work / "logs" / "incremental.log") if args.quiet else None
  report.update({"format": FORMAT, "version": VERSION,
                 "command": " ".join(["benchmarks/incremental.py"] + args.argv),
                 "variants": dict(VARIANTS),
                 "goals_wanted": {"new_r1_within_of_full": GOAL_NEW_WITHIN,
                                  "old_r1_drop_at_most": GOAL_OLD_DROP,
                                  "time_fraction_of_full_at_most": GOAL_TIME_FRACTION},
                 "embedding_choice": "one built-in item encoder trained on the kept items' texts "
                                     "only; new and all items encoded with it (cart embed --model); "
                                     "every variant uses these vectors, full retraining too"})
  ws = _Workspace(work, args, recipe, extra, log_file)
  done = _current(report, setting)
  redo = {v for v in args.redo.split(",") if v}
  if redo - set(ORDER):
    raise CartError(f"--redo {args.redo}: unknown variant(s) {sorted(redo - set(ORDER))}; "
                    f"the variants are {', '.join(ORDER)}")
  wanted = {v for v in args.variants.split(",") if v}
  if wanted - set(ORDER):
    raise CartError(f"--variants {args.variants}: unknown variant(s) {sorted(wanted - set(ORDER))}; "
                    f"the variants are {', '.join(ORDER)}")
  if wanted - {"base", "full_retrain"}:
    wanted.add("base")
  if "new_only" in wanted:
    wanted.add("replay")
  order = [v for v in ORDER if v in wanted]
  ran = skipped = 0
  prepared = False
  for i, variant in enumerate(order, start=1):
    tag = f"[{i}/{len(order)}] {variant}"
    if variant in done and variant not in redo:
      _log(f"{tag}: skip (done)")
      skipped += 1
      continue
    if not prepared:
      _log(f"work directory {work}")
      ws.prepare()
      prepared = True
      import jax  # pylint: disable=g-import-not-at-top  (loaded by now)
      report["machine"] = {"cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
                           "device": jax.devices()[0].device_kind}
      report["holdout"] = {"fraction": args.holdout, "seed": args.seed, "kept_items": len(ws.kept),
                           "new_items": len(ws.new), "new_item_ids": ws.new}
      if ws.embeddings:
        report["embeddings"] = {**report.get("embeddings", {}), **ws.embeddings}
    _log(f"{tag}: {VARIANTS[variant]} (load {_load()}) ...")
    try:
      rec = run_variant(ws, variant, {**done})
    except CartError as e:
      raise CartError(f"{variant}: {e}" + (f" (output: {log_file})" if log_file else "")) from None
    rec["setting"] = setting
    report["runs"] = [r for r in report["runs"]
                      if not (r.get("setting") == setting and r["variant"] == variant)] + [rec]
    done[variant] = rec
    ran += 1
    _write(report, args, setting, json_path, plot_path)
    new = f", new R@1 {rec['new']['r@1']:.3f}" if rec.get("new") else ""
    _log(f"{tag}: done in {rec['seconds']:.1f} s{new}, old R@1 {rec['old']['r@1']:.3f} "
         f"(eval {rec['eval_seconds']:.0f} s; elapsed {time.perf_counter() - t_start:.0f} s)")
  runs = _write(report, args, setting, json_path, plot_path)
  print(table(runs))
  g = report["goals"].get(HEADLINE)
  if g:
    print(f"goals ({HEADLINE} vs before and full retraining): new R@1 gap to full "
          f"{g['new_r1_gap_to_full']:+.3f} (<= {GOAL_NEW_WITHIN}: {g['new_within_0.05_of_full']}); "
          f"old R@1 {runs[HEADLINE]['old']['r@1']:.3f} vs the floor max(before - {GOAL_OLD_DROP}, "
          f"full) = {g['old_r1_floor']:.3f} ({g['old_r1_at_least_floor']}); time "
          f"{g['time_fraction_of_full']:.1%} of full (<= 20%: {g['time_le_20pct_of_full']})")
  _log(f"{ran} variant(s) run, {skipped} skipped; report {json_path}, plot {plot_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
