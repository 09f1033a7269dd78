"""The demo as a recipe over :mod:`cart_jax.api`: prepare -> embed -> build_index -> train -> evaluate.

A :class:`DemoRecipe` names a built-in data set and the settings of each step (typed: the
embedding options, the identifier configs, the gin experiment). :func:`recipe_for` picks one by
modality: image -> ``emoji`` (:data:`IMAGE`, ``--full``: :data:`IMAGE_FULL`), audio ->
``instruments`` and video -> ``emoji-motion`` (their data set module's ``DEMO_RECIPE``).
:func:`run_demo` runs the five steps in a work directory (each step's output in
``WORKDIR/logs/<i>_<step>.log``; a step whose output exists there is reused) and evaluates CART,
CART + rerank and the dual tower on the same ``test`` queries through the one evaluator.
:func:`report` is the table ``cart demo`` prints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from cart_jax.core.errors import CartError
from cart_jax.core.machine import cpu_seconds, load_average
from cart_jax.data.embeddings import BuiltinEmbedOptions
from cart_jax.index.identifiers import IdentifierConfig

MODALITIES = ("image", "audio", "video")
UNSEEN_CAPTION_RATE = 0.5  # unseen_items: share of each CART batch drawn from the caption texts
_RECIPE_MODULES = {"audio": "cart_jax.data.datasets.instruments",
                   "video": "cart_jax.data.datasets.emoji_motion"}
_ITEMS = {"image": "emoji", "audio": "clips", "video": "clips"}


@dataclasses.dataclass(frozen=True)
class DemoRecipe:
  """What :func:`run_demo` runs.

  Attributes:
    modality: image, audio or video.
    dataset: the built-in data set (:data:`cart_jax.api.DATASETS`).
    experiment: the gin experiment ``cart train`` runs.
    embed: the built-in item encoder's settings.
    ids: identifier settings; ``smoke_ids`` replaces them in smoke runs (``limit``).
    items: what the results table calls the candidates.
    full: the full image recipe (``--full``).
  """
  modality: str
  dataset: str
  experiment: str
  embed: BuiltinEmbedOptions
  ids: IdentifierConfig
  smoke_ids: IdentifierConfig
  items: str = "items"
  full: bool = False

  @classmethod
  def from_settings(cls, modality: str, settings: dict) -> DemoRecipe:
    """A recipe from a data set module's ``DEMO_RECIPE`` (named settings, see instruments.py)."""
    missing = sorted({"dataset", "experiment", "embed", "ids", "smoke_ids"} - set(settings))
    if missing:
      raise CartError(f"{_RECIPE_MODULES[modality]}.DEMO_RECIPE lacks {missing}")
    return cls(modality=modality, dataset=settings["dataset"], experiment=settings["experiment"],
               embed=BuiltinEmbedOptions(**settings["embed"]),
               ids=IdentifierConfig(**settings["ids"]),
               smoke_ids=IdentifierConfig(**settings["smoke_ids"]),
               items=settings.get("items", _ITEMS[modality]))


SMOKE_IDS = IdentifierConfig(n_clusters=4, num_levels=1, codebook_size=8, rq_steps=50)
IMAGE = DemoRecipe(
    modality="image", dataset="emoji", experiment="gin_configs/experiments/emoji_demo.gin",
    embed=BuiltinEmbedOptions(steps=300),
    ids=IdentifierConfig(n_clusters=64, num_levels=2, codebook_size=64, rq_steps=300),
    smoke_ids=SMOKE_IDS, items="emoji")
# --full: CART trains on 10% captions, so its dual tower does too (captions): the same texts.
IMAGE_FULL = dataclasses.replace(IMAGE, experiment="gin_configs/experiments/emoji_cart.gin",
                                 embed=BuiltinEmbedOptions(steps=600, captions=True), full=True)


def recipe_for(modality: str, full: bool = False) -> DemoRecipe:
  """The demo recipe of a modality (``full`` exists for images only)."""
  if modality not in MODALITIES:
    raise CartError(f"--modality {modality!r}: expected one of {list(MODALITIES)}")
  if modality == "image":
    return IMAGE_FULL if full else IMAGE
  if full:
    raise CartError(f"--full is the image recipe (emoji_cart.gin); not available with --modality {modality}")
  return DemoRecipe.from_settings(modality,
                                  importlib.import_module(_RECIPE_MODULES[modality]).DEMO_RECIPE)


@dataclasses.dataclass
class DemoResult:
  """``summary``: the JSON ``cart demo --json`` writes (rows ``cart``, ``cart_rerank``,
  ``dual_tower`` with ``r@1``, ``r@5``, ``r@10``, ``mrr@10``, ``qps``; sizes, timings, example)."""
  summary: dict

  @property
  def workdir(self) -> Path:
    return Path(self.summary["workdir"])


class _Stages:
  """Announces ``[i/n] title ...`` through ``log``; the stage's own output goes to a log file."""

  def __init__(self, logs: Path, log: Callable[[str], None], n: int = 5):
    self.logs, self.log, self.n, self.i = logs, log, n, 0
    self.times: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, key: str, title: str) -> Iterator[None]:
    self.i += 1
    self.log(f"[{self.i}/{self.n}] {title} ...")
    t0 = time.perf_counter()
    path = self.logs / f"{self.i}_{key}.log"
    with open(path, "w", encoding="utf-8") as f:
      with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):  # progress bars too
        yield
    self.times[key] = round(time.perf_counter() - t0, 1)
    self.log(f"      done in {self.times[key]:.0f} s (log: {path})")


def run_demo(recipe: DemoRecipe, *, workdir: str | os.PathLike | None = None,
             limit: int | None = None, embed_steps: int | None = None,
             train_steps: int | None = None, no_templates: bool = False,
             unseen_items: float = 0.0, captions_only_items: float = 0.0,
             textless_items: float = 0.0, no_val: bool = False, item_encoder: str | None = None,
             log: Callable[[str], None] | None = None) -> DemoResult:
  """Runs the recipe's five steps in ``workdir`` (default: a new temporary directory).

  Args:
    limit: smoke runs, only the first N items (and ``recipe.smoke_ids``).
    embed_steps, train_steps: override the item encoder's and CART's training steps.
    no_templates, unseen_items: emoji splits (see ``cart data prepare emoji``); with
      ``unseen_items`` both methods also train on captions, and recall is also reported on the
      unseen items' test queries (``summary["unseen"]``).
    captions_only_items, textless_items, no_val: protocols of :mod:`cart_jax.data.protocols`
      applied to the prepared corpus (any data set): a share of the items known only through
      keyword captions, a share with no text at all, no ``val`` split. With the first two, recall
      is also reported on the affected items' test queries (``summary["affected"]``); with
      captions-only items both methods train on the captions.
    item_encoder: the dual encoder's item side (``BuiltinEmbedOptions.item_encoder``: ``scratch``,
      ``pretrained``, ``efficientnet-lite0``, ``aisfx``; default: the recipe's). Both methods use
      it: CART's identifiers are built from its embeddings and its re-ranker is that dual
      encoder. A pretrained encoder's files get its name (``emb/<set>_<encoder>.npy``,
      ``index_<encoder>/``, ``cart_<encoder>/``), so one work directory holds both.
    log: where the stage lines go (default: print to stdout, flushed).
  """
  from cart_jax import api  # pylint: disable=g-import-not-at-top
  from cart_jax.data.embeddings import embedding_files  # pylint: disable=g-import-not-at-top

  log = log or (lambda m: print(m, flush=True))
  t_start = time.perf_counter()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow, if a step imports it, stays quiet
  if (no_templates or unseen_items) and recipe.modality != "image":
    raise CartError("--no-templates and --unseen-items are emoji (--modality image) splits")
  protocol = _protocol(recipe, captions_only_items, textless_items, no_val, unseen_items)
  embed = _embed_options(recipe, captions_only_items=captions_only_items, unseen_items=unseen_items,
                         item_encoder=item_encoder, embed_steps=embed_steps)
  tag = "" if embed.item_encoder == "scratch" else "_" + embed.item_encoder.replace("-", "_")
  ids = recipe.smoke_ids if limit else recipe.ids
  work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"cart-demo-{recipe.modality}-"))
  work.mkdir(parents=True, exist_ok=True)
  logs = work / "logs"
  logs.mkdir(exist_ok=True)
  dataset = recipe.dataset
  corpus_dir, index_dir = work / "corpus", work / f"index{tag}"
  emb = embedding_files(work / "emb" / f"{dataset.replace('-', '_')}{tag}.npy")
  model_dir = work / (("cart_full" if recipe.full else "cart") + tag)
  stage = _Stages(logs, log)
  flags = (" --full" if recipe.full else "") + \
      (f" --modality {recipe.modality}" if recipe.modality != "image" else "")
  log(f"cart demo{flags}: working in {work}")

  with stage("prepare", f"preparing the {dataset} corpus (cart data prepare {dataset})"):
    if not (corpus_dir / "corpus.json").exists():
      _prepare(dataset, corpus_dir, limit=limit, no_templates=no_templates, unseen_items=unseen_items,
               protocol=protocol)

  encoder_note = "" if not tag else f" on frozen {embed.item_encoder} features"
  with stage("embed", f"training the item encoder{encoder_note}, {embed.training_steps()} steps "
                     "(cart embed)"):
    if not emb.embeddings.exists():
      result = api.embed(corpus_dir, emb.embeddings, embed, progress=False)
      print(json.dumps(result.summary, indent=2, default=str))

  with stage("build_ids", f"building identifiers K={ids.n_clusters}, M={ids.num_levels} x "
                          f"C={ids.codebook_size} + counter (cart build-ids)"):
    if not (index_dir / "meta.json").exists():
      built = api.build_index(emb.embeddings, index_dir, ids, item_ids=emb.ids)
      print(json.dumps(built.stats, indent=2, default=str))

  with stage("train", f"training CART ({recipe.experiment})"):
    train_summary = _train(recipe.experiment, model_dir, corpus_dir, index_dir, emb.embeddings,
                           train_steps=train_steps, unseen_items=unseen_items)

  with stage("eval", "evaluating CART, CART + rerank and the dual tower on the test queries "
                     "(cart eval --rerank, cart baseline)"):
    ids_file = corpus_dir / ("unseen_items.txt" if unseen_items else "affected_items.txt")
    if not (unseen_items or captions_only_items or textless_items):
      ids_file = None
    cart, base, cart_u, unseen, example = _evaluate(model_dir, corpus_dir, emb.embeddings, ids_file)

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
      "stage_seconds": stage.times, "full": recipe.full, "experiment": recipe.experiment,
      "embed_steps": embed.training_steps(), "train_steps": train_summary["step"],
      "item_encoder": embed.item_encoder, "index_stats": _index_stats(index_dir),
      "modality": recipe.modality, "dataset": dataset, "items": recipe.items,
      "workdir": str(work), "model_dir": str(model_dir), "example": example,
      "cpu_seconds": cpu_seconds(), "machine": {"cpus": os.cpu_count(), "load_avg_1m": load_average()},
      "no_templates": bool(no_templates), "unseen_items": unseen_items,
  }
  if protocol:
    summary["protocol"] = {name: share for name, share in protocol}
  summary["rerank_tuning"] = (train_summary.get("rerank") or {}).get("chosen_by")
  summary["train_input"] = train_summary.get("input")
  if unseen is not None and unseen_items:
    summary["unseen"] = {**unseen, "n_test_queries": cart_u["num_queries"],
                         "caption_rate": UNSEEN_CAPTION_RATE}
  elif unseen is not None:
    summary["affected"] = {**unseen, "n_test_queries": cart_u["num_queries"],
                           "what": "captions-only" if captions_only_items else "textless"}
  return DemoResult(summary)


def _prepare(dataset: str, corpus_dir: Path, *, limit: int | None, no_templates: bool,
             unseen_items: float, protocol: list[tuple[str, float]]) -> None:
  """The demo's prepare stage: the built-in corpus, then its protocols; summaries printed."""
  from cart_jax import api  # pylint: disable=g-import-not-at-top
  prepared = api.prepare(dataset, corpus_dir, limit=limit, templates=not no_templates,
                         unseen_items=unseen_items)
  print(json.dumps(prepared.summary, indent=2, ensure_ascii=False, default=str))
  for name, share in protocol:
    from cart_jax.data import protocols  # pylint: disable=g-import-not-at-top
    keywords = getattr(importlib.import_module(_DATASET_MODULES[dataset]), "keyword_captions", None)
    print(json.dumps(protocols.apply_protocol(corpus_dir, name, share, keywords), indent=2))


def _train(experiment: str, model_dir: Path, corpus_dir: Path, index_dir: Path, embeddings: Path, *,
           train_steps: int | None, unseen_items: float) -> dict:
  """The demo's train stage: ``cart train`` of the recipe's gin experiment (its re-ranker from
  ``embeddings``); the summary, also printed."""
  from cart_jax.cli import gin_bridge  # pylint: disable=g-import-not-at-top  (the experiment is a gin file)
  bindings = [f"MODEL_DIR='{model_dir}'", f"CORPUS_DIR='{corpus_dir}'", f"INDEX_DIR='{index_dir}'",
              f"EMBEDDINGS='{embeddings}'", "train_job.embeddings=%EMBEDDINGS"]  # -> MODEL_DIR/rerank/
  if train_steps:
    bindings.append(f"TrainConfig.num_steps={train_steps}")
  if unseen_items:  # the unseen items are known only through captions
    bindings.append(f"InputConfig.caption_rate={UNSEEN_CAPTION_RATE}")
  with contextlib.redirect_stderr(sys.stdout):
    train_summary = gin_bridge.train([experiment], bindings, progress=False)
  print(json.dumps(train_summary, indent=2, default=str))
  return train_summary


def _embed_options(recipe: DemoRecipe, *, captions_only_items: float, unseen_items: float,
                   item_encoder: str | None, embed_steps: int | None):
  """The recipe's item-encoder options (``BuiltinEmbedOptions``) with the demo's flags applied."""
  embed = recipe.embed
  if captions_only_items:
    embed = dataclasses.replace(embed, captions=True)  # the dual tower sees the keyword captions too
  if unseen_items:
    from cart_jax.data.datasets.emoji import check_unseen_fraction  # pylint: disable=g-import-not-at-top
    try:
      check_unseen_fraction(unseen_items)
    except ValueError as e:
      raise CartError(str(e)) from None
    embed = dataclasses.replace(embed, captions=True)
  if item_encoder is not None:
    from cart_jax.models.pretrained import encoders  # pylint: disable=g-import-not-at-top
    embed = dataclasses.replace(embed, item_encoder=encoders.resolve(item_encoder, recipe.modality))
  if embed_steps:  # the steps of whichever item side trains: the tower or the head
    embed = dataclasses.replace(embed, steps=embed_steps, head_steps=embed_steps)
  return embed


def _evaluate(model_dir: Path, corpus_dir: Path, embeddings: Path, ids_file: Path | None):
  """The demo's eval stage: CART (+ rerank when the run has a re-ranker) and the dual tower on the
  test queries, printed; with ``ids_file`` (unseen or affected items, when it lists any) the same
  three methods on those items' test queries only. Returns ``(cart, base, cart on the items,
  three rows on the items, worked example)``; the item entries are None without them."""
  from cart_jax import api  # pylint: disable=g-import-not-at-top
  from cart_jax.data.corpus import read_item_ids  # pylint: disable=g-import-not-at-top
  from cart_jax.inference import rerank  # pylint: disable=g-import-not-at-top
  from cart_jax.jobs.evaluate import eval_job  # pylint: disable=g-import-not-at-top
  from cart_jax.runs.restore import load_run  # pylint: disable=g-import-not-at-top
  loaded = load_run(model_dir)
  has_rerank = rerank.exists(model_dir)
  cart = eval_job(str(model_dir), split="test", loaded=loaded, rerank=has_rerank)
  print(json.dumps(cart, indent=2))
  base = api.baseline(embeddings, corpus_dir, split="test")
  print(json.dumps(base, indent=2))
  cart_u = unseen = None
  if ids_file is not None and ids_file.exists() and ids_file.read_text(encoding="utf-8").strip():
    # the same three methods on the unseen items' test queries only
    cart_u = eval_job(str(model_dir), split="test", loaded=loaded, rerank=has_rerank,
                      items=read_item_ids(ids_file, loaded.corpus))
    base_u = api.baseline(embeddings, corpus_dir, split="test", items=ids_file)
    unseen = _three_rows(cart_u, base_u)
  return cart, base, cart_u, unseen, _worked_example(loaded)


_DATASET_MODULES = {"emoji": "cart_jax.data.datasets.emoji",
                    "instruments": "cart_jax.data.datasets.instruments",
                    "emoji-motion": "cart_jax.data.datasets.emoji_motion"}


def _protocol(recipe: DemoRecipe, captions_only: float, textless: float, no_val: bool,
              unseen: float) -> list[tuple[str, float]]:
  """The (protocol, share) pairs a demo applies after preparing its corpus."""
  from cart_jax.data import protocols  # pylint: disable=g-import-not-at-top
  out = []
  if captions_only:
    protocols.check_share(captions_only, "--captions-only-items")
    if recipe.dataset == "emoji":
      raise CartError("--captions-only-items: the emoji corpus has its own captions-only split, "
                      "--unseen-items F (English captions built from each item's metadata)")
    out.append(("captions-only", float(captions_only)))
  if textless:
    out.append(("textless", protocols.check_share(textless, "--textless-items")))
  if sum(bool(x) for x in (captions_only, textless, unseen)) > 1:
    raise CartError("--unseen-items, --captions-only-items and --textless-items are separate "
                    "protocols: pick one")
  if no_val:
    out.append(("no-val", 0.0))
  return out


def _index_stats(index_dir: Path) -> dict | None:
  """The identifier diagnostics ``cart build-ids`` recorded (collisions, codebook use)."""
  try:
    meta = json.loads((index_dir / "meta.json").read_text(encoding="utf-8"))
  except (OSError, json.JSONDecodeError):
    return None
  return meta.get("stats")


def _three_rows(cart: dict, base: dict) -> dict:
  """CART, CART + rerank (None without a re-ranker) and dual-tower rows of the table."""
  keys = ("r@1", "r@5", "r@10", "mrr@10", "qps")
  rr = cart.get("rerank")
  return {"cart": {k: cart[k] for k in keys},
          "cart_rerank": None if rr is None else {k: rr[k] for k in keys + ("weight",)},
          "dual_tower": {k: base[k] for k in keys}}


def _worked_example(loaded) -> dict:
  """The first test query whose generated top identifier is its item (else the first query)."""
  from cart_jax.inference.evaluation import split_queries  # pylint: disable=g-import-not-at-top
  from cart_jax.inference.searcher import CartSearcher, describe  # pylint: disable=g-import-not-at-top
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
    how = _tuning_note(summary.get("rerank_tuning"))
    lines.append(f"(CART + rerank: CART's beam re-sorted by log p + {w:g} x dual-tower cosine; weight "
                 f"{how})" if w != "cosine" else
                 f"(CART + rerank: CART's beam re-sorted by the dual-tower cosine; {how})")
  elif summary.get("rerank_note"):
    lines.append(f"(CART + rerank: {summary['rerank_note']})")
  return "\n".join(lines)


def _tuning_note(chosen_by: str | None) -> str:
  """How the re-rank weight was chosen, for the table's note ("tuned on val" when on val)."""
  if not chosen_by or "held out" not in chosen_by and "default" not in chosen_by:
    return "tuned on val"
  if chosen_by.startswith("default"):
    return "the default: no val split and no training query to hold out"
  return "tuned on held-out training queries (no val split)"


def example_text(ex: dict) -> str:
  """The worked example: query -> generated identifiers -> items."""
  lines = [f"worked example: query \"{ex['query']}\"  (its item {ex['target_item']}, trained on "
           f"{', '.join(repr(t) for t in ex['target_train_texts']) or 'no texts'})"]
  for r in ex["results"]:
    mark = "  <- the query's item" if r["item_id"] == ex["target_item"] else ""
    lines.append(f"  #{r['rank']} generated identifier {tuple(r['identifier'])} (log p {r['score']:.2f}) "
                 f"-> item {r['item_id']}  {r.get('media', '')}{mark}")
  return "\n".join(lines)


def report(summary: dict) -> str:
  """What ``cart demo`` prints once the stages are done: table(s), example, timings, a try line."""
  parts = ["", table(summary)]
  if "unseen" in summary:
    parts.append(f"\nthe {summary['unseen']['n_test_queries']} test queries of the unseen items "
                 f"(known to both methods only through captions):")
    parts.append(table({**summary, **summary["unseen"]}, header=False))
  if "affected" in summary:
    what = ("known to both methods only through keyword captions"
            if summary["affected"]["what"] == "captions-only" else "with no training text at all")
    parts.append(f"\nthe {summary['affected']['n_test_queries']} test queries of the held-out items "
                 f"({what}):")
    parts.append(table({**summary, **summary["affected"]}, header=False))
  parts += ["", example_text(summary["example"])]
  times = summary["stage_seconds"]
  parts.append(f"\ntotal {summary['seconds']:.0f} s (stages: " +
               ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ")")
  parts.append(f"try: cart search --model-dir {summary['model_dir']} \"{summary['example']['query']}\" -k 5")
  return "\n".join(parts)
