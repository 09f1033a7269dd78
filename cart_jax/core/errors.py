"""The one base class of user-facing errors.

A :class:`CartError` is a problem with what the user gave us (a file, a line, a field, a flag)
and its message says which, with what was expected and what was found. ``cart`` prints it as
one line, ``cart COMMAND: error: MESSAGE``, and exits 2; a library caller catches
``CartError``. Anything else (a bug here, in JAX, in a library) is not a ``CartError`` and
propagates with its traceback.

Each room keeps its own subclass next to the code that raises it (``InputError`` for
embeddings and ids, ``CorpusFormatError``, ``IndexFormatError``, ``RunError``, ...).
``CartError`` derives from ``ValueError`` so that code written against the earlier
``ValueError`` subclasses keeps working.
"""
from __future__ import annotations


class CartError(ValueError):
  """Bad user input, named: file/line/field, expected vs found."""


class ConfigError(CartError):
  """A configuration value out of its range, or one the data cannot serve (``TrainConfig``,
  ``InputConfig``, ``ModelConfig``, identifier and serving options): the message names the field."""
