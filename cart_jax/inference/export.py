"""``cart export``: a trained run's search as a serialised program plus its data.

:func:`export_run` loads a MODEL_DIR as ``cart search`` does, builds the same jitted search
(:class:`cart_jax.inference.searcher.CartSearcher`: query encoder -> CART encoder/decoder ->
trie-constrained beam search over the run's index) for a fixed batch size, and writes it with
``jax.export`` (StableHLO bytes) next to its inputs: the network's weights and the trie tables
(``arguments.npz``), the identifiers and item ids, and the tokenizer vocabulary. The directory
layout and the loader are in :mod:`cart_jax.inference.exported`, which runs it with JAX and
NumPy only (no Flax, no model code).

The program takes token ids, not text: the loader tokenises (a copy of the WordPiece rules over
the exported ``vocab.txt``). Its results are ``cart search``'s: the same rows, and the same
scores up to float rounding (``tests/test_export.py``).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cart_jax.core.errors import CartError
from cart_jax.inference import exported as fmt

KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


class ExportOptionsError(CartError):
  """Bad ``cart export`` settings (batch size, k, beam, platforms, output)."""


def _platforms(platforms: Sequence[str] | None) -> tuple[str, ...]:
  """The platforms to lower for: ``platforms`` checked, or this process's (``gpu`` -> ``cuda``)."""
  import jax  # pylint: disable=g-import-not-at-top
  if not platforms:
    backend = jax.default_backend()
    return ({"gpu": "cuda"}.get(backend, backend),)
  out = []
  for p in platforms:
    p = p.strip().lower()
    if p not in KNOWN_PLATFORMS:
      raise ExportOptionsError(f"--platforms: unknown platform {p!r}; expected some of "
                               f"{', '.join(KNOWN_PLATFORMS)}")
    if p not in out:
      out.append(p)
  return tuple(out)


def export_run(model_dir: str | os.PathLike, out: str | os.PathLike, *, batch_size: int = 8,
               k: int = 10, beam: int | None = None, step: int | None = None,
               platforms: Sequence[str] | None = None, verify: bool = True,
               overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
  """Writes the search of a trained run as an export directory ``out``; returns a summary.

  Args:
    batch_size: queries per program call (the loader pads a last, partial batch).
    k: results per query the program returns (``n_results``); the loader serves any k up to it.
      Clamped to the number of items, like ``cart search -k``.
    beam: beam size (default ``max(k, 10)``, clamped like ``cart search``'s).
    step: checkpoint step (default: newest).
    platforms: JAX platforms to export for (``cpu``, ``cuda``, ``rocm``, ``tpu``; default: this
      process's).
    verify: check the checkpoint against its manifest first.
    overwrite: replace an existing ``out``.

  Returns:
    ``{"out", "model_dir", "step", "batch_size", "input_length", "n_results", "beam_size",
    "n_items", "platforms", "program_bytes", "arguments_bytes", "total_bytes", "seconds"}``.
  """
  from cart_jax.core.artefacts import atomic_directory, output_lock, sha256_file  # pylint: disable=g-import-not-at-top
  from cart_jax.runs.restore import load_run  # pylint: disable=g-import-not-at-top
  from cart_jax.inference.searcher import searcher_for_run  # pylint: disable=g-import-not-at-top
  from cart_jax.models.text.tokenizer import minilm_tokenizer  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  _check_options(batch_size, k, beam)
  explicit_platforms = bool(platforms)
  platforms = _platforms(platforms)
  out = Path(out)
  _check_out(out, overwrite)

  r = load_run(model_dir, step, verify=verify)
  n_items = r.index.n_items
  if k > n_items:
    log(f"-k {k}: the index has {n_items} items; exporting {n_items} results per query")
    k = n_items
  beam = min(beam or max(k, 10), max(n_items, k))
  searcher = searcher_for_run(r, beam_size=beam, n_results=k, batch_size=batch_size)

  log(f"exporting the search of {r.model_dir} (step {r.step}): batch {batch_size}, k {k}, "
      f"beam {beam}, {n_items} items, for {', '.join(platforms)}")
  exp, host = _lower(r, searcher, batch_size, k, platforms, explicit_platforms)
  program_bytes = exp.serialize()

  tok = minilm_tokenizer()
  modalities = _item_modalities(r)
  arg_specs = [{"name": f"a{i:05d}", "shape": list(a.shape), "dtype": str(a.dtype)}
               for i, a in enumerate(host)]
  with output_lock(out):
    with atomic_directory(out) as tmp:
      (tmp / fmt.PROGRAM).write_bytes(program_bytes)
      # bfloat16 (not a NumPy dtype) is stored as raw bytes; the manifest names the dtype
      np.savez(tmp / fmt.ARGUMENTS, **{s["name"]: a for s, a in zip(arg_specs, host)})
      np.savez(tmp / fmt.INDEX, codes=np.asarray(r.index.codes, np.int32))
      items = {"item_ids": list(r.index.item_ids)}
      if modalities is not None:
        items["modalities"] = modalities
      (tmp / fmt.ITEMS).write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
      (tmp / fmt.VOCAB).write_text("".join(t + "\n" for t in tok.inv_vocab), encoding="utf-8")
      manifest = _manifest(r, exp, tok, arg_specs, batch_size=batch_size, k=k, beam=beam,
                           files={name: sha256_file(tmp / name) for name in fmt.FILES})
      (tmp / fmt.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
      (tmp / fmt.MANIFEST_HASH).write_text(f"{sha256_file(tmp / fmt.MANIFEST)}  {fmt.MANIFEST}\n",
                                           encoding="utf-8")
      sizes = {name: (tmp / name).stat().st_size
               for name in (*fmt.FILES, fmt.MANIFEST, fmt.MANIFEST_HASH)}
  return {"out": str(out), "model_dir": str(r.model_dir), "step": r.step, "batch_size": batch_size,
          "input_length": r.input_length, "n_results": k, "beam_size": beam, "n_items": n_items,
          "platforms": list(exp.platforms), "program_bytes": sizes[fmt.PROGRAM],
          "arguments_bytes": sizes[fmt.ARGUMENTS], "total_bytes": sum(sizes.values()),
          "seconds": time.perf_counter() - t0}


def _check_options(batch_size, k, beam) -> None:
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ExportOptionsError(f"--batch-size {batch_size}: must be an integer >= 1")
  if not isinstance(k, int) or k < 1:
    raise ExportOptionsError(f"-k {k}: must be an integer >= 1")
  if beam is not None and (not isinstance(beam, int) or beam < k):
    raise ExportOptionsError(f"--beam {beam}: must be an integer >= -k ({k})")


def _check_out(out: Path, overwrite: bool) -> None:
  if out.exists() and not overwrite:
    raise ExportOptionsError(f"--out {out} already exists (pass --overwrite to replace it)")
  if out.exists() and not (out / fmt.MANIFEST).is_file():
    raise ExportOptionsError(f"--out {out} exists and is not a cart export: not replacing it")


def _lower(r, searcher, batch_size: int, k: int, platforms: tuple[str, ...], explicit_platforms: bool):
  """``(exported program, its host arguments)``: the searcher's own jitted search over token ids
  int32 [batch_size, input_length], lowered for ``platforms`` by ``jax.export``."""
  import jax  # pylint: disable=g-import-not-at-top

  # The program's inputs after the token ids: the network's arrays, then the trie's.
  tree = (r.params, r.frozen, searcher.trie)
  leaves, treedef = jax.tree.flatten(tree)
  host = [np.asarray(x) for x in leaves]
  search = searcher._search  # pylint: disable=protected-access  (the searcher's own jitted search)

  def program(*args):
    *arrays, input_ids = args  # input_ids int32 [batch, src]
    params, frozen, trie = jax.tree.unflatten(treedef, arrays)
    res, _ = search(params, frozen, input_ids, trie, k, False)
    rows = jax.numpy.where(res.valid, res.rows, -1)  # [batch, k]
    scores = jax.numpy.where(res.valid, res.scores, -jax.numpy.inf).astype(jax.numpy.float32)
    return rows.astype(jax.numpy.int32), scores  # [batch, k], [batch, k]

  specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in host]
  specs.append(jax.ShapeDtypeStruct((batch_size, r.input_length), np.int32))
  try:
    exp = jax.export.export(jax.jit(program), platforms=platforms)(*specs)
  except (NotImplementedError, ValueError) as e:
    if not explicit_platforms:  # this machine's own platform: a bug, not a user error
      raise
    raise ExportOptionsError(f"--platforms {','.join(platforms)}: cannot lower the search for "
                             f"them here ({type(e).__name__}: {str(e).splitlines()[0]})") from None
  return exp, host


def _item_modalities(r) -> list[str] | None:
  """Each item's modality, row by row, when the run's corpus knows every one (else None)."""
  if r.corpus is None:
    return None
  modalities = [r.corpus.item_modality(i) if i in r.corpus else None for i in r.index.item_ids]
  return None if any(m is None for m in modalities) else modalities


def _manifest(r, exp, tok, arg_specs, *, batch_size: int, k: int, beam: int, files: dict) -> dict:
  """``manifest.json`` of an export (``files``: sha256 of every other file)."""
  import jax  # pylint: disable=g-import-not-at-top
  return {
      "format": fmt.FORMAT, "version": fmt.VERSION,
      "batch_size": batch_size, "input_length": r.input_length, "n_results": k,
      "beam_size": beam, "n_items": r.index.n_items, "id_length": int(r.index.codes.shape[1]),
      "platforms": list(exp.platforms),
      "calling_convention_version": exp.calling_convention_version,
      "tokenizer": {"kind": "bert-wordpiece", "vocab": fmt.VOCAB, "lowercase": tok.lowercase,
                    "cls_id": tok.cls_id, "sep_id": tok.sep_id, "pad_id": tok.pad_id,
                    "unk_id": tok.unk_id},
      "arguments": arg_specs,
      "outputs": {"rows": f"int32 [{batch_size}, {k}]", "scores": f"float32 [{batch_size}, {k}]"},
      "source": {"model_dir": str(Path(r.model_dir).resolve()), "step": r.step,
                 "model_config": r.run.get("model_config"), **_provenance(r)},
      "created_with": {"jax": jax.__version__, "cart_jax": _version()},
      "files": files,
      "integrity": fmt.MANIFEST_HASH,  # a loader then refuses the export without it
  }


def _provenance(r) -> dict:
  """sha256 of the checkpoint step's manifest and of the index's meta.json (what was exported)."""
  from cart_jax.core.artefacts import sha256_file  # pylint: disable=g-import-not-at-top
  from cart_jax.index.identifiers import META_FILE  # pylint: disable=g-import-not-at-top
  from cart_jax.runs.layout import CHECKPOINT_SUBDIR, INDEX_SUBDIR, run_subdir  # pylint: disable=g-import-not-at-top
  from cart_jax.core.checkpointing import MANIFEST  # pylint: disable=g-import-not-at-top
  out = {}
  manifest = run_subdir(r.model_dir, r.run, "checkpoint_dir", CHECKPOINT_SUBDIR) / str(r.step) / MANIFEST
  if manifest.is_file():
    out["checkpoint_manifest_sha256"] = sha256_file(manifest)
  meta = run_subdir(r.model_dir, r.run, "index_dir", INDEX_SUBDIR) / META_FILE
  if meta.is_file():
    out["index_meta_sha256"] = sha256_file(meta)
  return out


def _version() -> str:
  from cart_jax import __version__  # pylint: disable=g-import-not-at-top
  return __version__
