"""Moved: the MODEL_DIR layout is :mod:`cart_jax.runs.layout`, loading a run
:mod:`cart_jax.runs.restore`, ``searcher_for_run`` :mod:`cart_jax.inference.searcher` and
``search_job`` :mod:`cart_jax.jobs.search`. These names stay only for ``train/incremental.py``
and its test until issue 30 updates their imports; then this file goes."""
from cart_jax.runs.layout import (CHECKPOINT_SUBDIR, CORPUS_HASHES, RUN_FILE, RunError,  # noqa: F401
                                  corpus_hashes, run_subdir)
from cart_jax.runs.restore import load_run  # noqa: F401
