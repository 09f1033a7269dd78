"""Run a search exported by ``cart export``, with only JAX and NumPy.

This file is self-contained: it imports nothing from the rest of cart-jax (no Flax, no model code,
no TensorFlow), so it can be copied next to an export and used on its own::

  from cart_jax.inference.exported import load_exported   # or: from exported import load_exported
  s = load_exported("emoji.cart-export")
  s.search(["smiling cat", "a red car"], k=5)
  # [{"query": "smiling cat", "results": [{"rank": 1, "item_id": "1F63A", "identifier": [..],
  #                                         "score": -0.12}, ...]}, ...]

or from a shell: ``python exported.py emoji.cart-export "smiling cat" -k 5`` (JSON on stdout).

An export is one directory (written atomically by ``cart export``)::

  manifest.json      format, version, shapes, the tokenizer's special ids, sha256 of every file
  manifest.sha256    sha256 of manifest.json ("<hex>  manifest.json", as sha256sum writes it)
  search.stablehlo   the search program, serialised by ``jax.export``: token ids int32
                     [batch_size, input_length] -> (rows int32 [batch_size, n_results], scores
                     float32 [batch_size, n_results]); the query encoder, CART's encoder/decoder and
                     the trie-constrained beam search, for a fixed batch size
  arguments.npz      the program's other inputs, in order: the network's weights, the trie tables
  index.npz          codes int32 [N, L]: the identifier of every item (row r of the results)
  items.json         the item ids, row by row (and each item's modality when known)
  vocab.txt          the WordPiece vocabulary of the query tokenizer

Queries are tokenised here (BERT uncased WordPiece over ``vocab.txt``: the rules of
``cart_jax/models/text/tokenizer.py``, which the tests hold this copy to), padded to the export's
batch size and run through the program; any number of queries and any ``k`` up to the export's
``n_results`` work. The program runs on the platforms it was exported for (``manifest.json``
``platforms``; ``cart export --platforms cpu,cuda,tpu`` exports for several), by a JAX at most
6 months newer or 3 weeks older than the one that exported it (``jax.export``'s guarantees; the
manifest's ``created_with``).

Integrity: :func:`load_exported` checks ``manifest.json`` against ``manifest.sha256`` and every
other file against the manifest's sha256 (``verify=False`` skips both), then the manifest's values
against the program (batch size, input length, ``n_results``) and the vocabulary (the tokenizer's
ids): anything edited or damaged is an :class:`ExportError` naming the file and field, never
different results or a traceback. An export written before ``manifest.sha256`` existed (its
manifest names no ``integrity`` file) loads with a warning line on stderr.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import unicodedata
from pathlib import Path
from typing import Iterable, Sequence

import jax
import numpy as np

FORMAT = "cart-export"
VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_HASH = "manifest.sha256"  # "<sha256 of manifest.json>  manifest.json"
PROGRAM = "search.stablehlo"
ARGUMENTS = "arguments.npz"
INDEX = "index.npz"
ITEMS = "items.json"
VOCAB = "vocab.txt"
FILES = (PROGRAM, ARGUMENTS, INDEX, ITEMS, VOCAB)

try:  # inside cart-jax the error is a CartError (exit 2 in `cart`); copied alone, a ValueError
  from cart_jax.core.errors import CartError as _ErrorBase  # pylint: disable=g-import-not-at-top
except ImportError:
  _ErrorBase = ValueError


class ExportError(_ErrorBase):
  """An export that is missing, malformed, altered, or asked for something it cannot do."""


# ---- the query tokenizer: BERT uncased WordPiece (same rules as cart_jax/models/text/tokenizer.py)

def _is_whitespace(ch: str) -> bool:
  return ch in (" ", "\t", "\n", "\r") or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
  return ch not in ("\t", "\n", "\r") and unicodedata.category(ch) in ("Cc", "Cf")


def _is_punctuation(ch: str) -> bool:
  cp = ord(ch)
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
  return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
          or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
          or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class WordPiece:
  """``[CLS] pieces [SEP]`` token ids of a text, truncated and 0-padded to a fixed length."""

  def __init__(self, vocab: Sequence[str], *, cls_id: int, sep_id: int, pad_id: int, unk_id: int,
               lowercase: bool = True, max_chars_per_word: int = 100):
    self.vocab = {tok: i for i, tok in enumerate(vocab)}
    self.cls_id, self.sep_id, self.pad_id, self.unk_id = cls_id, sep_id, pad_id, unk_id
    self.unk_token = vocab[unk_id]
    self.lowercase = lowercase
    self.max_chars_per_word = max_chars_per_word

  def basic_tokens(self, text: str) -> list[str]:
    chars = []
    for ch in text:
      cp = ord(ch)
      if cp == 0 or cp == 0xFFFD or _is_control(ch):
        continue
      if _is_whitespace(ch):
        chars.append(" ")
      elif _is_cjk(cp):
        chars.extend((" ", ch, " "))
      else:
        chars.append(ch)
    tokens = []
    for word in "".join(chars).split():
      if self.lowercase:
        word = unicodedata.normalize("NFD", word.lower())
        word = "".join(ch for ch in word if unicodedata.category(ch) != "Mn")
      current: list[str] = []
      for ch in word:
        if _is_punctuation(ch):
          if current:
            tokens.append("".join(current))
            current = []
          tokens.append(ch)
        else:
          current.append(ch)
      if current:
        tokens.append("".join(current))
    return tokens

  def wordpiece(self, word: str) -> list[str]:
    """Greedy longest-match-first split of one basic token (``[UNK]`` when impossible)."""
    if len(word) > self.max_chars_per_word:
      return [self.unk_token]
    pieces, start = [], 0
    while start < len(word):
      end, match = len(word), None
      while start < end:
        piece = word[start:end] if start == 0 else "##" + word[start:end]
        if piece in self.vocab:
          match = piece
          break
        end -= 1
      if match is None:
        return [self.unk_token]
      pieces.append(match)
      start = end
    return pieces

  def encode_batch(self, texts: Iterable[str], length: int) -> np.ndarray:
    """Texts -> int32 ``[n, length]`` ids (``[CLS] .. [SEP]``, right-padded with ``pad_id``)."""
    texts = list(texts)
    ids = np.full((len(texts), length), self.pad_id, np.int32)
    for i, text in enumerate(texts):
      pieces = [self.vocab[p] for w in self.basic_tokens(text) for p in self.wordpiece(w)]
      row = [self.cls_id] + pieces[:length - 2] + [self.sep_id]
      ids[i, :len(row)] = row
    return ids


# ---- the export

def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _dtype(name: str) -> np.dtype:
  """A dtype by name; bfloat16 & co. come from ml_dtypes (a JAX dependency) via jax.numpy."""
  try:
    return np.dtype(name)
  except TypeError:
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    return np.dtype(getattr(jnp, name))


class ExportedSearch:
  """A loaded export: ``search(queries, k)``; see :func:`load_exported`.

  Attributes:
    manifest: ``manifest.json`` as a dict.
    batch_size, input_length, n_results, beam_size: the program's fixed shapes and settings.
    item_ids: list[str] [N]: the item of each index row.
    codes: int32 [N, L]: the identifier of each index row.
    modalities: list[str] [N] or None.
    platform: the JAX platform the program runs on here.
  """

  def __init__(self, path: Path, manifest: dict, exported, arguments: list, codes: np.ndarray,
               items: dict, tokenizer: WordPiece):
    self.path = path
    self.manifest = manifest
    self.batch_size = int(manifest["batch_size"])
    self.input_length = int(manifest["input_length"])
    self.n_results = int(manifest["n_results"])
    self.beam_size = int(manifest["beam_size"])
    self.codes = codes
    self.item_ids: list[str] = list(items["item_ids"])
    self.modalities: list[str] | None = items.get("modalities")
    self.tokenizer = tokenizer
    self.platform = jax.default_backend()
    self._exported = exported
    self._arguments = jax.device_put(arguments)  # once; every call reuses them
    self._call = jax.jit(exported.call)

  def encode(self, queries: Sequence[str]) -> np.ndarray:
    """Queries -> int32 ``[n, input_length]`` token ids (what the program takes)."""
    return self.tokenizer.encode_batch(queries, self.input_length)

  def search_ids(self, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token ids int32 ``[n, input_length]`` (any ``n``) -> rows int32 ``[n, n_results]``, scores
    float32 ``[n, n_results]``, best first; rows -1 / scores -inf where fewer identifiers exist."""
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2 or input_ids.shape[1] != self.input_length:
      raise ExportError(f"token ids: expected shape [n, {self.input_length}] (this export's "
                        f"input_length), found {list(input_ids.shape)}")
    if not np.issubdtype(input_ids.dtype, np.integer):
      raise ExportError(f"token ids: expected integers, found {input_ids.dtype}")
    input_ids = input_ids.astype(np.int32)
    n, b = input_ids.shape[0], self.batch_size
    rows = np.full((n, self.n_results), -1, np.int32)
    scores = np.full((n, self.n_results), -np.inf, np.float32)
    for start in range(0, n, b):
      chunk = input_ids[start:start + b]  # [<=b, src]
      m = chunk.shape[0]
      if m < b:  # the program's batch is fixed: pad with copies of the last query
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - m, axis=0)])  # [b, src]
      r, s = self._call(*self._arguments, chunk)
      rows[start:start + m] = np.asarray(r)[:m]
      scores[start:start + m] = np.asarray(s)[:m]
    # A query left without any identifier, or a NaN / +inf score: the weights are corrupt or
    # overflow (over a non-empty index, finite scores always keep one identifier).
    bad = (rows < 0).all(axis=1) | (np.isnan(scores) | np.isposinf(scores)).any(axis=1)  # [n]
    if bad.any():
      raise ExportError(f"{self.path / ARGUMENTS}: the search gave non-finite scores (NaN or inf) for "
                        f"{int(bad.sum())} of {n} queries: the exported weights are corrupt or "
                        "overflow; no results are given")
    return rows, scores

  def search(self, queries: Sequence[str], k: int = 10) -> list[dict]:
    """The top ``k`` items for each query: ``[{"query", "results": [{"rank", "item_id",
    "identifier", "score"[, "modality"]}]}]`` (the fields of ``cart search --json``)."""
    if isinstance(queries, str):
      queries = [queries]
    queries = list(queries)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= self.n_results:
      raise ExportError(f"k={k!r}: this export returns at most n_results={self.n_results} items "
                        f"per query (1 <= k <= {self.n_results}; cart export -k sets it)")
    for i, q in enumerate(queries):
      if not isinstance(q, str) or not q.strip():
        raise ExportError(f"query {i + 1} of {len(queries)} is empty ({q!r}): give some words "
                          "to search for")
    rows, scores = self.search_ids(self.encode(queries))
    out = []
    for q, rr, ss in zip(queries, rows[:, :k], scores[:, :k]):
      results = []
      for rank, (r, s) in enumerate(zip(rr, ss)):
        if r < 0:
          continue
        d = {"rank": rank + 1, "item_id": self.item_ids[r],
             "identifier": [int(c) for c in self.codes[r]], "score": float(s)}
        if self.modalities is not None:
          d["modality"] = self.modalities[r]
        results.append(d)
      out.append({"query": q, "results": results})
    return out


def _check_manifest_hash(d: Path, mpath: Path) -> bool:
  """``manifest.json`` against ``manifest.sha256``; False when there is no ``manifest.sha256``."""
  hpath = d / MANIFEST_HASH
  if not hpath.exists():
    return False
  try:
    line = hpath.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise ExportError(f"{hpath}: unreadable ({e})") from None
  m = re.fullmatch(r"([0-9a-f]{64}) [ *]" + re.escape(MANIFEST) + r"\n?", line)
  if m is None:
    raise ExportError(f"{hpath}: expected one line '<sha256 hex>  {MANIFEST}', found {line[:80]!r}")
  got = _sha256(mpath)
  if got != m.group(1):
    raise ExportError(f"{mpath}: content does not match {MANIFEST_HASH} (sha256 {got[:16]}..., "
                      f"expected {m.group(1)[:16]}...): the manifest was edited or is corrupt")
  return True


def _positive_int(manifest: dict, key: str, where: Path) -> int:
  value = manifest.get(key)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ExportError(f"{where}: field {key!r} must be an integer >= 1, found {value!r}")
  return value


def read_manifest(path: str | os.PathLike, *, verify: bool = True) -> dict:
  """``manifest.json`` of an export directory, checked for format, version and value types.

  ``verify``: check it against ``manifest.sha256`` first (module docstring: integrity).
  """
  d = Path(path)
  if not d.is_dir():
    raise ExportError(f"{d}: no such export directory (write one with `cart export`)")
  mpath = d / MANIFEST
  if not mpath.is_file():
    raise ExportError(f"{d}: not a cart export (no {MANIFEST})")
  hashed = _check_manifest_hash(d, mpath) if verify else True
  try:
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ExportError(f"{mpath}: unreadable JSON ({e})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ExportError(f"{mpath}: format {manifest.get('format') if isinstance(manifest, dict) else None!r}"
                      f", expected {FORMAT!r}")
  if manifest.get("version") != VERSION:
    raise ExportError(f"{mpath}: version {manifest.get('version')!r}, this loader reads version "
                      f"{VERSION}")
  if not hashed:
    if manifest.get("integrity") == MANIFEST_HASH:
      raise ExportError(f"{d / MANIFEST_HASH}: missing ({MANIFEST} says the export was written "
                        "with it); the export cannot be verified: export the run again")
    print(f"warning: {d}: no {MANIFEST_HASH} (an export written before cart-jax hashed its "
          f"manifest): {MANIFEST} itself is not verified", file=sys.stderr)
  for key in ("batch_size", "input_length", "n_results", "beam_size", "files", "arguments",
              "tokenizer"):
    if key not in manifest:
      raise ExportError(f"{mpath}: field {key!r} missing")
  for key in ("batch_size", "input_length", "n_results", "beam_size"):
    _positive_int(manifest, key, mpath)
  if not isinstance(manifest["files"], dict):
    raise ExportError(f"{mpath}: field 'files' must map file names to sha256 hex digests")
  tok = manifest["tokenizer"]
  if not isinstance(tok, dict) or not all(
      isinstance(tok.get(k), int) and not isinstance(tok.get(k), bool)
      for k in ("cls_id", "sep_id", "pad_id", "unk_id")):
    raise ExportError(f"{mpath}: field 'tokenizer' must hold integer cls_id, sep_id, pad_id and "
                      f"unk_id, found {tok!r:.200}")
  specs = manifest["arguments"]
  if not isinstance(specs, list) or not all(
      isinstance(a, dict) and isinstance(a.get("name"), str) and isinstance(a.get("dtype"), str)
      and isinstance(a.get("shape"), list) for a in specs):
    raise ExportError(f"{mpath}: field 'arguments' must be a list of {{name, shape, dtype}}")
  return manifest


def load_exported(path: str | os.PathLike, *, verify: bool = True) -> ExportedSearch:
  """Loads an export directory written by ``cart export``; see :class:`ExportedSearch`.

  ``verify``: check every file against the manifest's sha256 first (an altered or truncated file
  is an :class:`ExportError` naming it, never results).
  """
  d = Path(path)
  manifest = read_manifest(d, verify=verify)
  files = manifest["files"]
  for name in FILES:
    if name not in files:
      raise ExportError(f"{d / MANIFEST}: no sha256 for {name}")
    if not (d / name).is_file():
      raise ExportError(f"{d / name}: missing")
    if verify and _sha256(d / name) != files[name]:
      raise ExportError(f"{d / name}: sha256 differs from {MANIFEST} (altered or truncated)")
  try:
    exported = jax.export.deserialize(bytearray((d / PROGRAM).read_bytes()))
  except Exception as e:  # pylint: disable=broad-except  (a foreign or damaged program)
    raise ExportError(f"{d / PROGRAM}: not a program this JAX ({jax.__version__}) can read: "
                      f"{type(e).__name__}: {e}") from None
  platform = jax.default_backend()  # cpu, gpu or tpu; jax.export names GPUs cuda / rocm
  runnable = {"gpu": ("cuda", "rocm")}.get(platform, (platform,))
  if not set(runnable) & set(exported.platforms):
    raise ExportError(f"{d / PROGRAM}: exported for {', '.join(exported.platforms)}; this process "
                      f"runs on {platform} (export again with --platforms including {platform})")
  specs = manifest["arguments"]
  with np.load(d / ARGUMENTS, allow_pickle=False) as z:
    if len(z.files) != len(specs):
      raise ExportError(f"{d / ARGUMENTS}: {len(z.files)} arrays, the manifest lists {len(specs)}")
    arguments = []
    for spec in specs:
      a = z[spec["name"]]
      dtype = _dtype(spec["dtype"])
      if a.dtype != dtype and a.dtype.itemsize == dtype.itemsize and a.dtype.kind == "V":
        a = a.view(dtype)  # bfloat16 & co. are stored as raw bytes
      if list(a.shape) != list(spec["shape"]) or a.dtype != dtype:
        raise ExportError(f"{d / ARGUMENTS}: {spec['name']} is {a.dtype}{list(a.shape)}, the "
                          f"manifest says {spec['dtype']}{spec['shape']}")
      arguments.append(a)
  expected = [(list(av.shape), str(av.dtype)) for av in exported.in_avals]
  found = [(list(a.shape), str(a.dtype)) for a in arguments] + [
      ([int(manifest["batch_size"]), int(manifest["input_length"])], "int32")]
  if expected != found:
    raise ExportError(f"{d}: the program's inputs {expected[-1:]} (+{len(expected) - 1} arrays) do "
                      f"not match {ARGUMENTS} and the manifest's batch_size/input_length")
  outputs = [list(av.shape) for av in exported.out_avals]  # rows, scores: [batch, n_results]
  if outputs != [[int(manifest["batch_size"]), int(manifest["n_results"])]] * 2:
    raise ExportError(f"{d / MANIFEST}: n_results {manifest['n_results']} does not match the "
                      f"program's outputs {outputs[0]} ([batch_size, n_results])")
  with np.load(d / INDEX, allow_pickle=False) as z:
    codes = np.asarray(z["codes"], np.int32)
  items = json.loads((d / ITEMS).read_text(encoding="utf-8"))
  if len(items.get("item_ids", [])) != codes.shape[0]:
    raise ExportError(f"{d / ITEMS}: {len(items.get('item_ids', []))} item ids for "
                      f"{codes.shape[0]} identifiers in {INDEX}")
  with open(d / VOCAB, encoding="utf-8") as f:
    vocab = [line.rstrip("\n").rstrip("\r") for line in f]
  if vocab and vocab[-1] == "":
    vocab = vocab[:-1]
  tok = manifest["tokenizer"]
  for key in ("cls_id", "sep_id", "pad_id", "unk_id"):
    if not 0 <= tok[key] < len(vocab):
      raise ExportError(f"{d / MANIFEST}: tokenizer {key.replace('_id', '')}_id {tok[key]} is not an "
                        f"id of {VOCAB} (0..{len(vocab) - 1})")
  tokenizer = WordPiece(vocab, cls_id=tok["cls_id"], sep_id=tok["sep_id"], pad_id=tok["pad_id"],
                        unk_id=tok["unk_id"], lowercase=tok.get("lowercase", True))
  return ExportedSearch(d, manifest, exported, arguments, codes, items, tokenizer)


def main(argv: Sequence[str] | None = None) -> int:
  """``python exported.py EXPORT_DIR QUERY... [-k K]``: the results as JSON on stdout."""
  import argparse  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  ap = argparse.ArgumentParser(description="Search with a `cart export` directory (JAX + NumPy only).")
  ap.add_argument("export_dir")
  ap.add_argument("query", nargs="+")
  ap.add_argument("-k", type=int, default=None, help="results per query (default: the export's)")
  args = ap.parse_args(argv)
  try:
    s = load_exported(args.export_dir)
    print(json.dumps(s.search(args.query, k=args.k or s.n_results), indent=2, ensure_ascii=False))
  except ExportError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
