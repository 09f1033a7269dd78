"""Item ids: the one rule, used wherever ids enter (corpus files, importers, ids files, indexes).

An id is a non-empty printable string without line separators and without leading or trailing
whitespace (:data:`ID_RULE`), so a one-id-per-line file holds exactly one line per id. Pure Python.
"""
from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from cart_jax.core.errors import CartError


BOM = "\ufeff"
# What str.splitlines() splits on: none of these may be inside an id, or a one-id-per-line file
# would hold more lines than ids.
LINE_SEPARATORS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
# Format characters (category Cf, not printable for str.isprintable) that real names need inside
# an id: the zero-width non-joiner and joiner (emoji ZWJ sequences, Indic scripts) and the emoji
# tag characters (subdivision flags). Other format characters (bidi overrides, zero-width space,
# a BOM inside a line) make two different-looking ids print the same and are refused.
_ID_FORMAT_OK = frozenset("\u200c\u200d") | frozenset(map(chr, range(0xE0020, 0xE0080)))
ID_RULE = ("ids must be non-empty and printable, without line separators and without leading or "
           "trailing whitespace")


def item_id_problem(item_id) -> str | None:
  """What is wrong with ``item_id`` under the id rule, or ``None`` when it is a valid id."""
  if not isinstance(item_id, str):
    return f"must be a string, found {type(item_id).__name__} {item_id!r}"
  if not item_id:
    return "is empty"
  for pos, ch in enumerate(item_id):
    if ch in LINE_SEPARATORS:
      return f"contains the line separator {ch!r} (U+{ord(ch):04X}) at position {pos}"
  if item_id != item_id.strip():
    return "has leading or trailing whitespace"
  for pos, ch in enumerate(item_id):
    if not ch.isprintable() and ch not in _ID_FORMAT_OK:
      return (f"contains the non-printable character {ch!r} (U+{ord(ch):04X}, "
              f"{unicodedata.category(ch)}) at position {pos}")
  return None


def check_item_id(item_id, where: str, error: type[CartError]) -> str:
  """Returns ``item_id`` if it follows the id rule, else raises ``error`` naming ``where``.

  Args:
    item_id: the id as read (no stripping happens here: whitespace around an id is an error).
    where: the file and line (``items.jsonl:12``), or array and row, the id comes from.
    error: the CartError subclass to raise.
  """
  problem = item_id_problem(item_id)
  if problem is not None:
    shown = repr(item_id) if isinstance(item_id, str) else ""
    raise error(
        f"{where}: item id {shown + ' ' if shown else ''}{problem} ({ID_RULE})")
  return item_id


def read_id_lines(path: str | os.PathLike, error: type[CartError],
                  what: str = "item ids") -> list[tuple[int, str]]:
  """``(line number, line)`` of a one-id-per-line UTF-8 file, exactly as written.

  Lines end at ``\\n`` (a ``\\r\\n`` ending counts as one); nothing is stripped but a UTF-8 BOM at
  the start of the file, so the caller sees (and refuses, through :func:`check_item_id`) blank
  lines, surrounding whitespace and other separators (``\\u2028``) inside a line. A final newline
  does not make an extra line.

  Raises:
    ``error`` naming the file (and line, for bad UTF-8).
  """
  try:
    data = Path(path).read_bytes()
  except OSError as e:
    raise error(f"{path}: cannot read the {what} ({e.strerror or e})") from None
  lines = data.split(b"\n")
  if lines and lines[-1] == b"":
    lines.pop()
  out = []
  for lineno, raw in enumerate(lines, start=1):
    if raw.endswith(b"\r"):
      raw = raw[:-1]
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise error(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)") from None
    if lineno == 1 and line.startswith(BOM):
      line = line[1:]
    out.append((lineno, line))
  return out
