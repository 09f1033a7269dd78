"""SeqIO side: vocabularies, tasks/mixtures, feature converter, TFDS builder (one TF process)."""
import collections
import math

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")

from cart_jax.data.corpus import Item, Text, normalize_text, write_corpus  # noqa: E402
from cart_jax.index.vocab import START_ID, IdentifierVocab  # noqa: E402
from cart_seqio import tasks as cart_tasks  # noqa: E402
from cart_seqio.feature_converters import CartFeatureConverter  # noqa: E402
from cart_seqio.vocabularies import IdentifierVocabulary, WordPieceVocabulary, input_vocabulary  # noqa: E402

_CART_TASKS_AT_IMPORT = [n for n in seqio.TaskRegistry.names() if n.startswith("cart_")]
VOCAB = IdentifierVocab((4, 8, 8, 3))  # L = 4; offsets 2, 6, 14, 22; size 25
LENGTHS = {"inputs": 12, "targets": 4}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  """6 items; queries in all splits; captions; identifiers from a seeded numpy draw."""
  root = tmp_path_factory.mktemp("toy")
  (root / "m.png").write_bytes(b"png")
  colours = ["red", "blue", "green", "yellow", "black", "white"]
  items = [Item(f"it{i}", "image", f"media/it{i}.png") for i in range(6)]
  texts = []
  for i, c in enumerate(colours):
    texts += [Text(f"it{i}", f"a {c} ball", "train"), Text(f"it{i}", f"{c} ball photo", "train"),
              Text(f"it{i}", f"the {c} one", "val"), Text(f"it{i}", f"{c} sphere", "test")]
    texts += [Text(f"it{i}", f"caption {k} of a {c} thing", "train", "caption") for k in range(3)]
  write_corpus(root / "corpus", "toy", "image", items, texts,
               media_sources={it.id: root / "m.png" for it in items})
  rng = np.random.default_rng(0)
  codes = np.stack([rng.integers(0, s, 6) for s in VOCAB.level_sizes], axis=1).astype(np.int32)
  item_ids = [f"it{i}" for i in range(6)][::-1]  # index order differs from corpus order
  codes = codes[::-1].copy()
  return root / "corpus", item_ids, codes


def _examples(ds, n=None):
  ds = ds if n is None else ds.take(n)
  return list(ds.as_numpy_iterator())


def test_identifier_vocabulary():
  v = IdentifierVocabulary(VOCAB)
  assert v.vocab_size == 25 and v.eos_id is None and v.pad_id == 0 and v.bos_id == START_ID
  assert v.encode("3 0 7 2") == [5, 6, 21, 24]
  assert v.decode([5, 6, 21, 24]) == (3, 0, 7, 2)
  assert v.decode(np.array([5, 6, 21, 24, 0, 0])) == (3, 0, 7, 2)  # trailing padding
  with pytest.raises(ValueError, match="out of range"):
    v.encode("4 0 0 0")
  with pytest.raises(ValueError, match="identifier length 3"):
    v.encode("1 2 3")
  with pytest.raises(ValueError, match="not a level-1 token"):
    v.decode([5, 5, 21, 24])
  assert v.encode_tf(tf.constant("3 0 7 2")).numpy().tolist() == [5, 6, 21, 24]
  assert v.decode_tf(tf.constant([[5, 6, 21, 24]])).numpy().tolist() == [[3, 0, 7, 2]]
  with pytest.raises(tf.errors.InvalidArgumentError):
    v.encode_tf(tf.constant("0 8 0 0"))
  with pytest.raises(tf.errors.InvalidArgumentError):
    v.decode_tf(tf.constant([[2, 6, 14, 25]]))
  assert v == IdentifierVocabulary(IdentifierVocab((4, 8, 8, 3)))


def test_wordpiece_matches_python_tokenizer():
  from cart_jax.models.text.tokenizer import WordPieceTokenizer
  wp = input_vocabulary("wordpiece")
  assert isinstance(wp, WordPieceVocabulary) and wp.vocab_size == 30522
  assert (wp.cls_id, wp.eos_id, wp.unk_id) == (101, 102, 100)
  ref = WordPieceTokenizer.from_file(wp.vocab_path)
  texts = ["Hello World!", "thumbs up: medium-dark skin tone", "Grinsendes Gesicht über 笑哭了",
           "médaille d’or", "flag: Côte d’Ivoire", "A dog jumps over the fence."]
  for t in texts:
    assert [wp.cls_id] + list(wp.encode(t)) + [wp.sep_id] == ref.encode(t), t
  assert wp.encode("hello world") == [7592, 2088]
  assert wp.decode([101, 7592, 2088, 102, 0]) == "hello world"
  assert wp.decode_tf(tf.constant([[7592, 2088, 0]])).numpy().tolist() == [b"hello world"]


def test_tasks_features_and_lengths(toy):
  corpus_dir, item_ids, codes = toy
  names = cart_tasks.register_corpus_tasks(corpus_dir, item_ids, codes, VOCAB, name="toy_t")
  assert names.query == "cart_toy_t_query" and names.caption == "cart_toy_t_caption"
  assert (names.eval_val, names.eval_test, names.caption_rate) == ("cart_toy_t_eval_val",
                                                                   "cart_toy_t_eval_test", 0.5)
  code_of = {iid: row for iid, row in zip(item_ids, codes)}
  task = seqio.get_mixture_or_task(names.query)
  assert set(task.splits) == {"train", "validation", "test"}
  exs = _examples(task.get_dataset(LENGTHS, split="test", shuffle=False))
  assert len(exs) == 6
  ex = exs[0]
  assert ex["inputs_pretokenized"] == b"red sphere" and ex["item_id"] == b"it0"
  assert ex["inputs"].tolist() == [101, 2417, 10336, 102]
  assert ex["targets"].tolist() == VOCAB.codes_to_tokens(code_of["it0"]).tolist()
  assert _examples(seqio.get_mixture_or_task(names.eval_test).get_dataset(
      LENGTHS, split="test", shuffle=False))[0]["inputs_pretokenized"] == b"red sphere"
  cap = _examples(seqio.get_mixture_or_task(names.caption).get_dataset(LENGTHS, split="train",
                                                                        shuffle=False))
  assert len(cap) == 18 and cap[0]["inputs_pretokenized"] == b"caption 0 of a red thing"

  converted = _examples(CartFeatureConverter()(
      task.get_dataset(LENGTHS, split="train", shuffle=False), LENGTHS))
  assert len(converted) == 12
  m = converted[0]
  assert set(m) == {"encoder_input_tokens", "decoder_target_tokens", "decoder_input_tokens",
                    "decoder_loss_weights"}
  assert m["encoder_input_tokens"].shape == (12,) and m["decoder_target_tokens"].shape == (4,)
  tgt = VOCAB.codes_to_tokens(code_of["it0"]).tolist()
  assert m["encoder_input_tokens"].tolist() == [101, 1037, 2417, 3608, 102] + [0] * 7  # a red ball
  assert m["decoder_target_tokens"].tolist() == tgt
  assert m["decoder_input_tokens"].tolist() == [START_ID] + tgt[:3]
  assert m["decoder_loss_weights"].tolist() == [1, 1, 1, 1]
  assert CartFeatureConverter().get_model_feature_lengths(LENGTHS)["decoder_input_tokens"] == 4


def test_truncation_keeps_special_tokens_and_byte_vocab(toy):
  corpus_dir, item_ids, codes = toy
  names = cart_tasks.register_corpus_tasks(corpus_dir, item_ids, codes, VOCAB, name="toy_b",
                                           input_vocab="byte")
  ds = seqio.get_mixture_or_task(names.query).get_dataset({"inputs": 6, "targets": 4},
                                                          split="test", shuffle=False)
  ex = _examples(ds, 1)[0]
  assert ex["inputs"].tolist() == [c + 3 for c in b"red s"] + [1]  # bytes + 3, EOS=1, trimmed
  names = cart_tasks.register_corpus_tasks(corpus_dir, item_ids, codes, VOCAB, name="toy_w")
  ds = seqio.get_mixture_or_task(names.caption).get_dataset({"inputs": 4, "targets": 4},
                                                            split="train", shuffle=False)
  from cart_jax.models.text.tokenizer import WordPieceTokenizer
  ref = WordPieceTokenizer.from_file(input_vocabulary("wordpiece").vocab_path)
  want = ref.encode("caption 0 of a red thing", max_length=4)
  assert len(want) == 4 and want[0] == 101 and want[-1] == 102
  assert _examples(ds, 1)[0]["inputs"].tolist() == want  # [CLS] .. [SEP] survive truncation


def _kinds(name, n, seed=0):
  ds = seqio.get_mixture_or_task(name).get_dataset(LENGTHS, split="train", shuffle=True, seed=seed,
                                                   passthrough_features=["kind"])
  return collections.Counter(ex["kind"].decode() for ex in _examples(ds, n))


def test_mixture_rates(toy):
  corpus_dir, item_ids, codes = toy
  names = cart_tasks.register_corpus_tasks(corpus_dir, item_ids, codes, VOCAB, name="toy_m",
                                           caption_rate=0.3, input_vocab="byte")  # cheap tokens
  n = 2000
  kinds = _kinds(names.train, n)
  sigma = math.sqrt(0.3 * 0.7 / n)
  assert abs(kinds["caption"] / n - 0.3) < 4 * sigma, kinds
  other = cart_tasks.register_caption_mixture(names, 0.8, "toy_m_080")
  n = 1000
  assert abs(_kinds(other, n, seed=1)["caption"] / n - 0.8) < 4 * math.sqrt(0.8 * 0.2 / n)
  ablation = cart_tasks.register_caption_mixture(names, 0.0, "toy_m_nocap")
  assert _kinds(ablation, 200) == {"query": 200}
  assert [t.name for t in seqio.get_mixture_or_task(ablation).tasks] == [names.query]
  with pytest.raises(ValueError, match=r"caption_rate must be in \[0, 1\]"):
    cart_tasks.register_caption_mixture(names, 1.5)


def test_no_test_text_in_any_training_example(toy):
  corpus_dir, item_ids, codes = toy
  names = cart_tasks.register_corpus_tasks(corpus_dir, item_ids, codes, VOCAB, name="toy_leak")
  held = set()
  for name, split in ((names.eval_val, "validation"), (names.eval_test, "test")):
    held |= {normalize_text(ex["inputs_pretokenized"].decode())
             for ex in _examples(seqio.get_mixture_or_task(name).get_dataset(LENGTHS, split=split,
                                                                              shuffle=False))}
  assert len(held) == 12
  train = set()
  for name in (names.query, names.caption):
    train |= {normalize_text(ex["inputs_pretokenized"].decode())
              for ex in _examples(seqio.get_mixture_or_task(name).get_dataset(
                  LENGTHS, split="train", shuffle=False))}
  assert len(train) == 30 and not held & train


def test_captions_file_and_errors(toy, tmp_path):
  corpus_dir, item_ids, codes = toy
  caps = tmp_path / "caps.jsonl"
  caps.write_text('{"item_id": "it2", "text": "a green ball made by a captioner"}\n'
                  '{"item_id": "it3", "text": "yellow sphere"}\n')  # a test query: dropped
  names = cart_tasks.register_corpus_tasks(corpus_dir, item_ids, codes, VOCAB, name="toy_c",
                                           captions_file=caps, caption_rate=0.25)
  exs = _examples(seqio.get_mixture_or_task(names.caption).get_dataset(LENGTHS, split="train",
                                                                        shuffle=False))
  assert [e["inputs_pretokenized"] for e in exs] == [b"a green ball made by a captioner"]
  with pytest.raises(ValueError, match="1 corpus items have no identifier"):
    cart_tasks.register_corpus_tasks(corpus_dir, item_ids[:5], codes[:5], VOCAB, name="toy_e")
  bad = codes.copy()
  bad[0, 1] = 8
  with pytest.raises(ValueError, match="out of range"):
    cart_tasks.register_corpus_tasks(corpus_dir, item_ids, bad, VOCAB, name="toy_e")
  assert cart_tasks.identifier_accuracy([(1, 2), (3, 4)], [(1, 2), (3, 5)]) == {"recall@1": 50.0}
  # the metric sees targets (pretokenized code strings) and predictions (decoded tuples) alike
  task = seqio.get_mixture_or_task(names.eval_test)
  ex = _examples(task.get_dataset(LENGTHS, split="test", shuffle=False), 1)[0]
  target = task.postprocess_fn(ex["targets_pretokenized"], example=ex, is_target=True)
  pred = task.postprocess_fn(task.output_features["targets"].vocabulary.decode(ex["targets"]),
                             example=ex, is_target=False)
  assert target == pred == tuple(int(c) for c in codes[item_ids.index("it0")])
  assert task.metric_fns[0]([target], [pred]) == {"recall@1": 100.0}


def test_tfds_builder(toy, tmp_path):
  pytest.importorskip("importlib_resources", reason="tensorflow-datasets needs importlib_resources "
                      "(pulled by etils[epath]); add it to the data extra")
  from cart_seqio.tfds_corpus import CartCorpus
  corpus_dir, _, _ = toy
  builder = CartCorpus(corpus_dir=corpus_dir, data_dir=str(tmp_path / "tfds"), include_media=True)
  builder.download_and_prepare()
  assert {s: builder.info.splits[s].num_examples for s in ("train", "validation", "test")} == {
      "train": 30, "validation": 6, "test": 6}
  ex = sorted(_examples(builder.as_dataset(split="test")), key=lambda e: e["item_id"])[0]
  assert ex["item_id"] == b"it0" and ex["text"] == b"red sphere" and ex["kind"] == 0
  assert ex["media"] == b"media/it0.png" and ex["media_bytes"] == b"png"


def test_importing_tasks_registers_nothing():
  assert _CART_TASKS_AT_IMPORT == []  # recorded right after importing tasks.* above
