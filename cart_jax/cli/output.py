"""What every ``cart`` command shares: ``--json PATH``, ``--quiet`` and old flag spellings.

* ``--json PATH`` writes the command's JSON summary to PATH (atomically); ``--json -`` prints it
  on stdout, and then stdout carries only that JSON document: the human-readable text goes to
  stderr with the logs.
* ``--quiet`` turns off progress bars and log lines (``--no-progress`` is its old spelling).
* While the library call runs, whatever it prints (logs) goes to stderr (:func:`logs_to_stderr`).
* Flags are kebab-case; an older spelling (``--model_dir``, ``--ids``, ``--batch``) still works
  for one release as a hidden alias (:func:`add_argument`).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from typing import Iterator


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """The commands' ``--help``: descriptions as written, old flag spellings left out."""

  def _format_action_invocation(self, action: argparse.Action) -> str:
    hidden = getattr(action, "hidden_aliases", ())
    if hidden:
      action = copy.copy(action)
      action.option_strings = [o for o in action.option_strings if o not in hidden]
    return super()._format_action_invocation(action)


def add_argument(p, flag: str, *old: str, **kwargs) -> argparse.Action:
  """``p.add_argument(flag, *old, **kwargs)`` with the ``old`` spellings hidden from --help.

  The parser must use :class:`HelpFormatter` (every ``cart`` command does).
  """
  action = p.add_argument(flag, *old, **kwargs)
  action.hidden_aliases = old
  return action


def add_output_flags(p: argparse.ArgumentParser, what: str = "the JSON summary") -> None:
  """``--json PATH`` (``-`` = stdout) and ``--quiet`` (old spelling ``--no-progress``, hidden)."""
  p.add_argument("--json", default=None, metavar="PATH",
                 help=f"write {what} here ('-': print it on stdout, nothing else goes there)")
  add_argument(p, "--quiet", "--no-progress", action="store_true",
               help="no progress bars and no log lines")


def json_to_stdout(args) -> bool:
  return getattr(args, "json", None) == "-"


def text_stream(args):
  """Where the human-readable result goes: stdout, or stderr when stdout carries the JSON."""
  return sys.stderr if json_to_stdout(args) else sys.stdout


@contextlib.contextmanager
def logs_to_stderr(args) -> Iterator[None]:
  """Sends what the library prints to stderr (to nowhere with ``--quiet``)."""
  import io  # pylint: disable=g-import-not-at-top
  target = io.StringIO() if getattr(args, "quiet", False) else sys.stderr
  with contextlib.redirect_stdout(target):
    yield


def emit(args, summary: dict, text: str | None = None, **json_options) -> None:
  """Prints ``text`` (default: the JSON itself) and writes/prints the JSON as ``--json`` asks."""
  doc = json.dumps(summary, indent=2, default=str, **json_options)
  if text is not None or not json_to_stdout(args):
    print(doc if text is None else text, file=text_stream(args))
  if json_to_stdout(args):
    print(doc)
  elif args.json:
    from cart_jax.core.artefacts import atomic_write_json  # pylint: disable=g-import-not-at-top
    atomic_write_json(args.json, json.loads(doc), **json_options)


def unseen_fraction(value: str) -> float:
  """argparse type of ``--unseen-items`` (``cart data prepare``, ``cart demo``): a share in [0, 1);
  argparse names the flag in its error (exit 2)."""
  from cart_jax.data.datasets.emoji import check_unseen_fraction  # pylint: disable=g-import-not-at-top
  try:
    return check_unseen_fraction(value)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e).replace("--unseen-items ", "", 1)) from None
