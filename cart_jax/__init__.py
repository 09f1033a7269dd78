"""cart-jax: CART generative cross-modal retrieval in JAX/Flax.

Importing this package imports nothing heavy. The pipeline as functions a notebook calls is
:mod:`cart_jax.api`; the rooms under it:

* ``core/``      shared infrastructure: atomic artefact writes and hashes, the ``CartError`` base,
  the persistent JAX compilation cache.
* ``data/``      the corpus format (items, texts, splits), importers, captions, embeddings files;
  ``data/datasets/`` the built-in data sets (emoji, instruments, emoji-motion).
* ``media/``     reading images, audio and video into arrays.
* ``models/``    the CART network (``cart/``), the MiniLM text encoder (``text/``), the item towers
  (``towers/``) and the dual encoder.
* ``index/``     semantic identifiers: K-Means, RQ-VAE, counter, trie, identifier vocabulary.
* ``inference/`` constrained beam search, the searcher of a trained run, re-ranking, dual-tower
  searchers, metrics and evaluation; ``cart export`` and its JAX-only loader (``exported.py``).
* ``train/``     the trainer (sharded with ``jax.jit`` + ``NamedSharding``), input pipelines, the
  encoder-state cache, checkpoints, the dual-encoder training.
* ``partitioning.py`` logical axis rules and meshes.
* ``cli/``       the ``cart`` console script: each command parses, calls the library, prints.

The SeqIO tasks (``tasks/`` in the repository) install as ``cart_seqio``.
"""
__version__ = "0.1.0"
