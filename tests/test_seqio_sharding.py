"""SeqIO input for multi-host: file-backed tasks, per-host shards, registration on import, and a
pipeline that is a pure function of the step (exact resume without replaying the stream)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")

from cart_jax.data.corpus import Item, Text, write_corpus  # noqa: E402
from cart_jax.index.identifiers import IdentifierConfig, build_index  # noqa: E402
from cart_seqio import tasks as cart_tasks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LENGTHS = {"inputs": 10, "targets": 3}  # identifiers: (cluster, code, counter)


@pytest.fixture(scope="module")
def corpus_and_index(tmp_path_factory):
  root = tmp_path_factory.mktemp("shard")
  (root / "m.png").write_bytes(b"png")
  items = [Item(f"it{i}", "image", f"media/it{i}.png") for i in range(9)]
  texts = []
  for i in range(9):
    texts += [Text(f"it{i}", f"query {k} about thing {i}", "train") for k in range(4)]
    texts += [Text(f"it{i}", f"held out {i}", "test")]
    texts += [Text(f"it{i}", f"caption {k} of thing {i}", "train", "caption") for k in range(2)]
  write_corpus(root / "corpus", "shardy", "image", items, texts,
               media_sources={it.id: root / "m.png" for it in items})
  emb = np.random.default_rng(0).normal(size=(9, 4)).astype(np.float32)
  index = build_index(emb, [it.id for it in items],
                      IdentifierConfig(n_clusters=3, num_levels=1, codebook_size=3, use_rqvae=False,
                                       kmeans_iters=10))
  index.save(root / "index")
  return root, index


def _texts(task, shard=None):
  ds = seqio.get_mixture_or_task(task).get_dataset(LENGTHS, split="train", shuffle=False,
                                                    shard_info=shard)
  return sorted(ex["inputs_pretokenized"].decode() for ex in ds.as_numpy_iterator())


def test_file_backed_tasks_shard_per_host(corpus_and_index, tmp_path):
  root, index = corpus_and_index
  names = cart_tasks.register_index_tasks(root / "corpus", index, source_dir=str(tmp_path / "src"),
                                          num_shards=4, caption_rate=0.5)
  written = sorted(p.relative_to(tmp_path / "src").as_posix() for p in (tmp_path / "src").rglob("*")
                   if p.is_file())
  query_files = [w for w in written if "_query/train.tfrecord-" in w]
  assert len(query_files) == 4 and any(w.endswith("_query/_COMPLETE") for w in written)
  everything = _texts(names.query)
  assert len(everything) == 36
  a = _texts(names.query, seqio.ShardInfo(0, 2))
  b = _texts(names.query, seqio.ShardInfo(1, 2))
  assert a and b and not set(a) & set(b) and sorted(a + b) == everything
  # Another process registers without writing: it reads the same files.
  again = cart_tasks.register_index_tasks(root / "corpus", index, source_dir=str(tmp_path / "src"),
                                          num_shards=4, caption_rate=0.5, write_sources=False)
  assert _texts(again.query) == everything
  with pytest.raises(Exception, match="no TFRecord source"):
    cart_tasks.register_index_tasks(root / "corpus", index, source_dir=str(tmp_path / "none"),
                                    write_sources=False)


def test_seqio_pipeline_is_a_function_of_the_step(corpus_and_index, tmp_path):
  from cart_jax.train.input_pipeline import InputConfig, SeqioPipeline
  root, index = corpus_and_index
  cfg = InputConfig(batch_size=6, input_length=10, pipeline="seqio", caption_rate=0.5, seed=3,
                    seqio_source_dir=str(tmp_path / "src"))
  p = SeqioPipeline(str(root / "corpus"), index, cfg)
  assert p.summary()["train_queries"] == 36 and p.summary()["train_captions"] == 18
  it = p.iterate(0)
  first = [next(it) for _ in range(8)]
  resumed = SeqioPipeline(str(root / "corpus"), index, cfg).iterate(5)  # no replay of steps 0-4
  for step in range(5, 8):
    got = next(resumed)
    for k in first[step]:
      np.testing.assert_array_equal(got[k], first[step][k])
  # Rows of a slice are those rows of the whole batch; 3 queries then 3 captions per batch.
  np.testing.assert_array_equal(p.batch_at(2, slice(0, 3))["encoder_input_tokens"],
                                first[2]["encoder_input_tokens"][:3])
  # 6 steps x 3 queries = 18 = half an epoch of the 36 queries: no query twice.
  seen = np.concatenate([b["encoder_input_tokens"][:3] for b in first[:6]])
  assert len({row.tobytes() for row in seen}) == 18


def test_registered_module_for_module_import(corpus_and_index, tmp_path):
  root, _ = corpus_and_index
  env = dict(os.environ, CART_SEQIO_CORPUS=str(root / "corpus"), CART_SEQIO_INDEX=str(root / "index"),
             CART_SEQIO_SOURCE_DIR=str(tmp_path / "src2"), CART_SEQIO_CAPTION_RATE="0.25")
  code = ("import json, seqio, cart_seqio.registered as r; "
          "print(json.dumps([r.NAMES.train, r.NAMES.caption_rate, "
          "sorted(n for n in seqio.TaskRegistry.names() if n.startswith('cart_shardy'))]))")
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  train, rate, registered = json.loads(out.stdout.strip().splitlines()[-1])
  assert train == "cart_shardy_train" and rate == 0.25
  assert registered == ["cart_shardy_caption", "cart_shardy_eval_test", "cart_shardy_query"]
  assert (tmp_path / "src2").is_dir()
  env.pop("CART_SEQIO_INDEX")
  out = subprocess.run([sys.executable, "-c", "import cart_seqio.registered"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "set CART_SEQIO_INDEX" in out.stderr
