"""Moved to :mod:`cart_jax.core.checkpointing`; this name stays only for ``train/incremental.py``
(issue 30 updates its import, then this file goes)."""
from cart_jax.core.checkpointing import Checkpointer  # noqa: F401
