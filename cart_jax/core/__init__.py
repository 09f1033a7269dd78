"""Shared infrastructure: atomic artefact writes and hashes (:mod:`artefacts`), the user-facing
error base class (:mod:`errors`). Nothing here imports JAX."""
