"""CART's training loss: token cross-entropy + ``omega`` x bidirectional KL (R-Drop).

R-Drop (Liang et al., 2021) runs the same batch twice with different dropout
masks and penalises the symmetric KL between the two predicted distributions:

  loss = (CE_1 + CE_2) / 2 + omega * (KL(p_1 || p_2) + KL(p_2 || p_1)) / 2

Both terms are means over non-padding target tokens (``targets != PAD_ID``).
The two passes run as ONE forward on the batch stacked with itself (``[2B]``):
each row draws its own dropout masks, and one call shards/compiles like any
other. ``omega = 0`` (or no dropout RNG) skips the second pass: loss = CE.

Distillation (``cart index add``): when the batch holds ``teacher_logp`` (the log-probabilities a
frozen teacher, the run before the add, gives its last ``t`` rows), ``distill`` x the masked mean
``KL(p_teacher || p_student)`` over those rows' target positions is added: the student keeps the
teacher's whole distribution on those texts, not only its top token (Li & Hoiem 2016, "Learning
without Forgetting").
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cart_jax.models.cart.network import CARTNetwork, shift_right

PAD_ID = 0  # mirrors cart_jax.index.vocab.PAD_ID


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Masked mean CE and token accuracy. ``logits [b, T, V]``, ``targets, mask [b, T]``."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [b, T]
  m = mask.astype(jnp.float32)
  denom = jnp.maximum(jnp.sum(m), 1.0)
  ce = jnp.sum(nll * m) / denom
  acc = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * m) / denom
  return ce, acc


def bidirectional_kl(logits_a: jax.Array, logits_b: jax.Array, mask: jax.Array) -> jax.Array:
  """``(KL(p_a || p_b) + KL(p_b || p_a)) / 2`` summed over the vocabulary, masked mean over tokens."""
  la = jax.nn.log_softmax(logits_a.astype(jnp.float32), axis=-1)
  lb = jax.nn.log_softmax(logits_b.astype(jnp.float32), axis=-1)
  # KL(a||b) + KL(b||a) = sum (p_a - p_b) (log p_a - log p_b)
  sym = jnp.sum((jnp.exp(la) - jnp.exp(lb)) * (la - lb), axis=-1)  # [b, T]
  m = mask.astype(jnp.float32)
  return 0.5 * jnp.sum(sym * m) / jnp.maximum(jnp.sum(m), 1.0)


def distillation_kl(student_logits: jax.Array, teacher_logp: jax.Array, mask: jax.Array) -> jax.Array:
  """``KL(p_teacher || p_student)`` summed over the vocabulary, masked mean over tokens.

  ``student_logits [t, L, V]``, ``teacher_logp [t, L, V]`` (log-probabilities, no gradient),
  ``mask [t, L]``.
  """
  ls = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  lt = teacher_logp.astype(jnp.float32)
  kl = jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)  # [t, L]
  m = mask.astype(jnp.float32)
  return jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0)


def compute_loss(model: CARTNetwork, batch: dict[str, jax.Array], *, omega: float,
                 dropout_rng: jax.Array | None, distill: float = 0.0
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """CART loss for one batch.

  Args:
    model: the network.
    batch: ``inputs int32 [b, src]`` (0 = pad), ``targets int32 [b, L]`` identifier
      token ids (``PAD_ID`` positions are ignored); optional ``input_mask [b, src]``; optional
      ``states [b, S, src, width]``: cached frozen-encoder states of ``inputs`` (the encoder
      then does not run); optional ``teacher_logp [t, L, V]``: a teacher's log-probabilities for
      the batch's last ``t`` rows (module docstring).
    omega: weight of the R-Drop KL term; 0 skips the second forward pass.
    dropout_rng: key for dropout; None = deterministic (evaluation; no KL term).
    distill: weight of the distillation term (used when the batch has ``teacher_logp``).
  Returns:
    (loss, aux) with aux ``ce``, ``kl``, ``distill_kl``, ``token_accuracy``, ``num_tokens`` and
    ``fusion_alpha`` (``[decoder_layers, S]``) when fine fusion is on.
  """
  inputs, targets = batch["inputs"], batch["targets"]
  states = batch.get("states")  # [b, S, src, width] cached frozen-encoder states, or None
  input_mask = batch.get("input_mask")
  if input_mask is None:
    input_mask = inputs != 0
  decoder_inputs = batch.get("decoder_inputs")
  if decoder_inputs is None:
    decoder_inputs = shift_right(targets)
  mask = targets != PAD_ID  # [b, L]
  rngs = None if dropout_rng is None else nnx.Rngs(dropout=dropout_rng)
  two_pass = omega > 0 and rngs is not None

  if two_pass:
    b = inputs.shape[0]
    twice = lambda a: jnp.concatenate([a, a], axis=0)  # [2b, ...]
    logits, model_aux = model(twice(inputs), twice(decoder_inputs), twice(input_mask), rngs=rngs,
                              states=None if states is None else twice(states))
    logits_a, logits_b = logits[:b], logits[b:]  # [b, L, V] each
    ce_a, acc = token_cross_entropy(logits_a, targets, mask)
    ce_b, _ = token_cross_entropy(logits_b, targets, mask)
    ce = 0.5 * (ce_a + ce_b)
    kl = bidirectional_kl(logits_a, logits_b, mask)
    students = (logits_a, logits_b)
  else:
    logits, model_aux = model(inputs, decoder_inputs, input_mask, rngs=rngs, states=states)
    ce, acc = token_cross_entropy(logits, targets, mask)
    kl = jnp.zeros((), jnp.float32)
    students = (logits,)
  loss = ce + omega * kl
  teacher = batch.get("teacher_logp")  # [t, L, V] for the last t rows, or None
  dkl = jnp.zeros((), jnp.float32)
  if teacher is not None:
    t = teacher.shape[0]
    dkl = sum(distillation_kl(s[-t:], teacher, mask[-t:]) for s in students) / len(students)
    loss = loss + distill * dkl
  aux: dict[str, Any] = {"ce": ce, "kl": kl, "distill_kl": dkl, "token_accuracy": acc,
                         "num_tokens": jnp.sum(mask.astype(jnp.int32))}
  aux.update(model_aux)
  return loss, aux
