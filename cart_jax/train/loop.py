"""Moved to :mod:`cart_jax.core.loop`; this name stays only for ``train/incremental.py`` (issue 30
updates its import, then this file goes)."""
from cart_jax.core.loop import MetricWriter, run, tqdm_bar  # noqa: F401
