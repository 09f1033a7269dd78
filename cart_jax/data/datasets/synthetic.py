"""Structured synthetic embeddings: a two-level Gaussian mixture on the unit sphere.

Stand-ins for real item embeddings in tests and benchmarks when no corpus is at
hand: ``n_topics`` coarse directions, each with ``n_subtopics`` finer directions,
plus isotropic noise; rows are L2-normalised like the output of a text/image tower.
"""
from __future__ import annotations

import numpy as np


def structured_embeddings(n: int, dim: int, *, n_topics: int = 64, n_subtopics: int = 32,
                          sub_scale: float = 0.5, noise: float = 0.15, seed: int = 0) -> np.ndarray:
  """float32 ``[n, dim]`` unit-norm rows with hierarchical cluster structure (deterministic)."""
  rng = np.random.default_rng(seed)
  topics = rng.normal(size=(n_topics, dim)) / np.sqrt(dim)
  subs = rng.normal(size=(n_topics, n_subtopics, dim)) / np.sqrt(dim) * sub_scale
  t = rng.integers(0, n_topics, n)
  s = rng.integers(0, n_subtopics, n)
  out = np.empty((n, dim), np.float32)
  chunk = 65536
  for a in range(0, n, chunk):
    b = min(n, a + chunk)
    x = topics[t[a:b]] + subs[t[a:b], s[a:b]] + rng.normal(size=(b - a, dim)) / np.sqrt(dim) * noise
    out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
  return out
