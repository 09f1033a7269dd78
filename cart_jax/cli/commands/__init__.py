"""Subcommands of the ``cart`` console script, one module each (see ``cart_jax.cli.main``).

Command modules import heavy libraries (jax) inside ``run`` so ``cart --help`` is fast.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable


def int_at_least(low: int) -> Callable[[str], int]:
  """argparse ``type=``: an integer >= ``low`` (argparse names the flag, exit 2).

  ``--train-steps 0`` or ``--batch-size -3`` are refused where they are parsed, instead of
  silently meaning "the default" or failing deep inside a library.
  """
  def parse(value: str) -> int:
    try:
      n = int(value)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value!r}") from None
    if n < low:
      raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {n}")
    return n
  parse.__name__ = f"integer >= {low}"
  return parse


def positive_float(value: str) -> float:
  """argparse ``type=``: a finite number > 0 (``--lr nan`` is refused, not trained with)."""
  try:
    x = float(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number > 0, got {value!r}") from None
  if not (math.isfinite(x) and x > 0):
    raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {value!r}")
  return x


def float_in(low: float, high: float = math.inf, *, high_open: bool = False,
             what: str = "a number") -> Callable[[str], float]:
  """argparse ``type=``: a number in ``[low, high]`` (``[low, high)`` with ``high_open``); NaN is
  never in range, and an infinite ``high`` means "at least ``low``", finite."""
  if math.isinf(high):
    wanted = f"{what} >= {low:g}"
  else:
    wanted = f"{what} in [{low:g}, {high:g}{')' if high_open else ']'}"

  def parse(value: str) -> float:
    try:
      x = float(value)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected {wanted}, got {value!r}") from None
    inside = low <= x and (x < high if high_open or math.isinf(high) else x <= high)
    if not inside:
      raise argparse.ArgumentTypeError(f"expected {wanted}, got {value!r}")
    return x
  parse.__name__ = wanted
  return parse
