"""RQ-VAE in Flax NNX: MLP encoder -> latent -> M residual codebooks -> MLP decoder.

Loss = reconstruction MSE + codebook loss + beta * commitment loss. Codebooks are
updated **by the loss** (the codebook term ``||sg(r) - e||^2``, as in the RQ-VAE
and TIGER papers), not by EMA; the encoder sees the decoder's gradient through
the straight-through estimator ``z_q = z + sg(q - z)``. Codebook ``m`` is
initialised by K-Means (:mod:`cart_jax.index.kmeans`) on the level-``m`` residuals
of the first batch, and codes unused during ``restart_every`` steps are restarted
on random residuals of the current batch.

Diagnostics per level (returned, not printed): reconstruction MSE when decoding
the first ``m`` levels only, fraction of codes used, and code perplexity.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cart_jax.index import kmeans as kmeans_lib


@dataclasses.dataclass(frozen=True)
class RQVAEConfig:
  """Architecture and training of the RQ-VAE.

  Attributes:
    input_dim: embedding (residual) dimension d.
    latent_dim: dimension of the quantised latent.
    hidden_dims: encoder hidden widths (the decoder mirrors them).
    num_levels: M, the number of residual codebooks.
    codebook_size: C, codes per codebook.
    beta: weight of the commitment loss.
    learning_rate: Adam learning rate (cosine-decayed over ``steps``).
    steps: training steps.
    batch_size: examples per step (capped at N).
    restart_every: steps between dead-code restarts (0 disables).
  """
  input_dim: int
  latent_dim: int = 64
  hidden_dims: tuple[int, ...] = (256, 128)
  num_levels: int = 3
  codebook_size: int = 256
  beta: float = 0.25
  learning_rate: float = 3e-3
  steps: int = 1000
  batch_size: int = 1024
  restart_every: int = 100

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["hidden_dims"] = list(self.hidden_dims)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "RQVAEConfig":
    d = dict(d)
    d["hidden_dims"] = tuple(d["hidden_dims"])
    return cls(**d)


class MLP(nnx.Module):
  """Linear layers with ReLU between them (none after the last)."""

  def __init__(self, dims: tuple[int, ...], *, rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = jax.nn.relu(x)
    return x


class RQVAE(nnx.Module):
  """Residual-quantised autoencoder. Codebooks: ``[M, C, latent]``."""

  def __init__(self, config: RQVAEConfig, *, rngs: nnx.Rngs):
    self.config = config
    dims = (config.input_dim,) + tuple(config.hidden_dims) + (config.latent_dim,)
    self.encoder = MLP(dims, rngs=rngs)
    self.decoder = MLP(tuple(reversed(dims)), rngs=rngs)
    init = jax.random.normal(rngs.params(), (config.num_levels, config.codebook_size, config.latent_dim))
    self.codebooks = nnx.Param(init * 0.1)  # [M, C, latent]

  def quantize(self, z_bl: jax.Array):
    """Residual quantisation of latents ``[B, latent]``.

    Returns codes int32 [B, M], quantised vectors per level [M, B, latent] and the
    residual entering each level [M, B, latent].
    """
    cbs = self.codebooks[...]  # [M, C, latent]
    codes, quants, residuals = [], [], []
    r = z_bl
    for m in range(self.config.num_levels):
      cb = cbs[m]  # [C, latent]
      d2 = (jnp.sum(r * r, -1, keepdims=True) - 2.0 * r @ cb.T
            + jnp.sum(cb * cb, -1)[None, :])  # [B, C]
      code = jnp.argmin(d2, axis=-1).astype(jnp.int32)  # [B]
      e = cb[code]  # [B, latent]
      codes.append(code)
      quants.append(e)
      residuals.append(r)
      r = r - jax.lax.stop_gradient(e)
    return jnp.stack(codes, -1), jnp.stack(quants), jnp.stack(residuals)

  def __call__(self, x_bd: jax.Array):
    """Forward pass: returns (reconstruction [B, d], aux dict)."""
    z = self.encoder(x_bd)  # [B, latent]
    codes, quants, residuals = self.quantize(z)
    q_sum = jnp.sum(quants, axis=0)  # [B, latent]
    z_q = z + jax.lax.stop_gradient(q_sum - z)  # straight-through
    x_hat = self.decoder(z_q)
    codebook_loss = jnp.mean(jnp.sum((jax.lax.stop_gradient(residuals) - quants) ** 2, -1))
    commit_loss = jnp.mean(jnp.sum((residuals - jax.lax.stop_gradient(quants)) ** 2, -1))
    return x_hat, {"codes": codes, "codebook_loss": codebook_loss, "commit_loss": commit_loss,
                   "residuals": residuals}

  def encode_codes(self, x_bd: jax.Array) -> jax.Array:
    """Codes int32 [B, M] for inputs [B, d]."""
    return self.quantize(self.encoder(x_bd))[0]

  def reconstruct_per_level(self, x_bd: jax.Array) -> jax.Array:
    """Reconstruction MSE per example when decoding only the first m levels: [M, B]."""
    _, quants, _ = self.quantize(self.encoder(x_bd))
    partial = jnp.cumsum(quants, axis=0)  # [M, B, latent]
    x_hat = jax.vmap(self.decoder)(partial)  # [M, B, d]
    return jnp.mean((x_hat - x_bd[None]) ** 2, axis=-1)


def rqvae_loss(model: RQVAE, x_bd: jax.Array):
  x_hat, aux = model(x_bd)
  recon = jnp.mean(jnp.sum((x_hat - x_bd) ** 2, -1))
  loss = recon + aux["codebook_loss"] + model.config.beta * aux["commit_loss"]
  return loss, {"loss": loss, "recon": recon, "commit": aux["commit_loss"], "codes": aux["codes"],
                "residuals": aux["residuals"]}


def _batches(n: int, batch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
  while True:
    perm = rng.permutation(n)
    for i in range(0, n - batch + 1, batch):
      yield perm[i:i + batch]


def _init_codebooks(model: RQVAE, x_bd: np.ndarray, key: jax.Array) -> None:
  """Codebook m <- K-Means centroids of the level-m residuals of ``x_bd``."""
  cfg = model.config
  z = np.asarray(model.encoder(jnp.asarray(x_bd)))
  cbs = np.asarray(model.codebooks[...]).copy()
  r = z
  for m in range(cfg.num_levels):
    km_key = jax.random.fold_in(key, m)
    if r.shape[0] >= cfg.codebook_size:
      res = kmeans_lib.kmeans(r, km_key, kmeans_lib.KMeansConfig(cfg.codebook_size, max_iters=20),
                              mesh=kmeans_lib.data_mesh(jax.devices()[:1]))
      cbs[m] = np.asarray(res.centroids)
    else:  # too few points: codes start on the points themselves (plus noise)
      idx = np.arange(cfg.codebook_size) % r.shape[0]
      noise = np.asarray(jax.random.normal(km_key, cbs[m].shape)) * (r.std() + 1e-6) * 0.01
      cbs[m] = r[idx] + noise
    d2 = ((r[:, None, :] - cbs[m][None]) ** 2).sum(-1)
    r = r - cbs[m][d2.argmin(-1)]
  model.codebooks[...] = jnp.asarray(cbs)


@dataclasses.dataclass
class RQVAETrainResult:
  model: RQVAE
  history: list[dict]
  restarts: int


def train_rqvae(x_nd: np.ndarray, config: RQVAEConfig, key: jax.Array,
                progress: Callable[[int, dict], None] | None = None,
                log_every: int = 100) -> RQVAETrainResult:
  """Train an RQ-VAE on ``x_nd`` (float32 [N, d]); deterministic under ``key``.

  Runs in the shared training loop (:mod:`cart_jax.core.loop`): the metrics (loss, recon,
  commit) are pulled from the device every ``log_every`` steps and at the end, into the
  history; code usage is counted on the device and read only at a dead-code restart.
  ``progress(i, metrics)`` is called after every step ``i`` (0-based) with the last metrics
  pulled (``{}`` before the first log).
  """
  from cart_jax.core import loop  # pylint: disable=g-import-not-at-top
  x_nd = np.asarray(x_nd, np.float32)
  n, d = x_nd.shape
  if d != config.input_dim:
    raise ValueError(f"RQ-VAE input_dim {config.input_dim} != data dimension {d}")
  k_init, k_cb, k_data = jax.random.split(key, 3)
  model = RQVAE(config, rngs=nnx.Rngs(params=k_init))
  batch = min(config.batch_size, n)
  rng = np.random.default_rng(np.asarray(jax.random.key_data(k_data)).ravel()[-1].item())
  batches = _batches(n, batch, rng)
  first = next(batches)
  _init_codebooks(model, x_nd[first], k_cb)

  sched = optax.cosine_decay_schedule(config.learning_rate, max(config.steps, 1), alpha=0.05)
  tx = optax.adam(sched)
  graphdef, params = nnx.split(model, nnx.Param)
  opt_state = tx.init(params)
  n_codes = config.codebook_size

  @jax.jit
  def step(params, opt_state, usage_window, xb):
    def loss_fn(p):
      return rqvae_loss(nnx.merge(graphdef, p), xb)
    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    usage = jax.vmap(lambda c: jnp.bincount(c, length=n_codes), in_axes=1)(aux["codes"])  # [M, C]
    metrics = {k: aux[k] for k in ("loss", "recon", "commit")}
    return params, opt_state, usage_window + usage, metrics, aux["residuals"]

  no_usage = jnp.zeros((config.num_levels, n_codes), jnp.int32)
  restarts = 0

  def one_step(i: int, state):
    nonlocal restarts
    params, opt_state, usage_window = state
    idx = first if i == 0 else next(batches)
    params, opt_state, usage_window, metrics, residuals = step(params, opt_state, usage_window,
                                                               x_nd[idx])
    if config.restart_every and (i + 1) % config.restart_every == 0 and i + 1 < config.steps:
      dead = np.asarray(usage_window) == 0  # [M, C]
      if dead.any():
        cbs = np.asarray(params["codebooks"][...]).copy()
        res = np.asarray(residuals)  # [M, B, latent]
        for m in range(config.num_levels):
          dm = np.flatnonzero(dead[m])
          if dm.size:
            pick = rng.choice(res.shape[1], size=dm.size, replace=dm.size > res.shape[1])
            cbs[m, dm] = res[m, pick]
            restarts += int(dm.size)
        params["codebooks"][...] = jnp.asarray(cbs)
      usage_window = no_usage
    return (params, opt_state, usage_window), metrics

  last: dict = {}

  def on_step(done: int, m: dict | None) -> None:
    nonlocal last
    if m is not None:
      last = m
    if progress is not None:
      progress(done - 1, last)

  out = loop.run(one_step, (params, opt_state, no_usage), start=0, num_steps=config.steps,
                 log_every=log_every, on_step=on_step)
  model = nnx.merge(graphdef, out.state[0])
  return RQVAETrainResult(model=model, history=out.history, restarts=restarts)


def rqvae_diagnostics(model: RQVAE, x_nd: np.ndarray, chunk: int = 8192) -> dict:
  """Per-level diagnostics over a whole data set: codes, recon MSE, usage, perplexity."""
  cfg = model.config
  encode = nnx.jit(lambda mdl, xb: (mdl.encode_codes(xb), mdl.reconstruct_per_level(xb)))
  codes, mse = [], []
  for s in range(0, x_nd.shape[0], chunk):
    c, e = encode(model, jnp.asarray(x_nd[s:s + chunk], jnp.float32))
    codes.append(np.asarray(c))
    mse.append(np.asarray(e).sum(-1))
  codes = np.concatenate(codes) if codes else np.zeros((0, cfg.num_levels), np.int32)
  mse_per_level = (np.sum(mse, axis=0) / max(x_nd.shape[0], 1)).tolist() if mse else []
  usage, perplexity = [], []
  for m in range(cfg.num_levels):
    counts = np.bincount(codes[:, m], minlength=cfg.codebook_size).astype(np.float64)
    usage.append(float(np.count_nonzero(counts) / cfg.codebook_size))
    p = counts / max(counts.sum(), 1.0)
    nz = p[p > 0]
    perplexity.append(float(math.exp(-(nz * np.log(nz)).sum())) if nz.size else 0.0)
  return {"codes": codes.astype(np.int32), "rq_mse_per_level": mse_per_level,
          "codebook_usage_per_level": usage, "perplexity_per_level": perplexity}


def _path_key(path) -> str:
  parts = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
  return "/".join(p for p in parts if p not in (".value", "value"))


def state_dict(model: RQVAE) -> dict[str, np.ndarray]:
  """Flat ``{path: array}`` of the parameters, for saving."""
  _, params = nnx.split(model, nnx.Param)
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    key = _path_key(path)
    flat[key] = np.asarray(leaf)
  return flat


def load_state_dict(config: RQVAEConfig, flat: dict[str, np.ndarray]) -> RQVAE:
  """Rebuild an :class:`RQVAE` from :func:`state_dict` output; validates keys and shapes."""
  model = RQVAE(config, rngs=nnx.Rngs(params=0))
  graphdef, params = nnx.split(model, nnx.Param)
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  new_leaves = []
  for path, leaf in leaves_with_path:
    key = _path_key(path)
    if key not in flat:
      raise ValueError(f"RQ-VAE parameters lack '{key}'")
    arr = np.asarray(flat[key])
    if arr.shape != leaf.shape:
      raise ValueError(f"RQ-VAE parameter '{key}' has shape {arr.shape}, expected {leaf.shape}")
    new_leaves.append(jnp.asarray(arr, leaf.dtype))
  return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, new_leaves))
