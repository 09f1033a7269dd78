"""cart-jax: CART generative cross-modal retrieval in JAX/Flax.

Importing this package imports nothing heavy. The pipeline as functions a notebook calls is
:mod:`cart_jax.api`; the rooms under it:

Imports run one way, down (docs/architecture.md; tests/test_layering.py checks it)::

  core < index, media, partitioning < models < data < runs < train | inference < jobs < serve < api
       < cli

* ``core/``      errors, atomic artefact writes and hashes, paths, the item-id rule, the training
  loop, checkpoints, the persistent JAX compilation cache.
* ``index/``     semantic identifiers: K-Means, RQ-VAE, counter, trie, identifier vocabulary.
* ``media/``     reading images, audio and video into arrays.
* ``partitioning.py`` logical axis rules, meshes, the multi-process start.
* ``models/``    the CART network (``cart/``), the MiniLM text encoder and tokenizer (``text/``), the
  item towers (``towers/``) and the dual encoder.
* ``data/``      the corpus format (items, texts, splits), importers, captions, embeddings files;
  ``data/datasets/`` the built-in data sets (emoji, instruments, emoji-motion).
* ``runs/``      a trained MODEL_DIR: its layout and loading it for inference.
* ``train/``     the trainer (sharded with ``jax.jit`` + ``NamedSharding``), input pipelines, the
  encoder-state cache, the dual-encoder training.
* ``inference/`` constrained beam search, the searcher, re-rank scores, dual-tower searchers,
  metrics and evaluation; ``cart export`` and its JAX-only loader (``exported.py``).
* ``jobs/``      whole jobs: train, evaluate, search, baseline, embed, the re-ranker of a run.
* ``serve/``     the HTTP server.
* ``api.py``     typed functions, one per command.
* ``cli/``       the edge: the ``cart`` console script, gin (``gin_bridge.py``, the only module
  that imports gin) and the demo's recipes (``recipes.py``).

The SeqIO tasks (``tasks/`` in the repository) install as ``cart_seqio``.
"""
__version__ = "0.1.0"
