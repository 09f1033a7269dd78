"""Query tokenisation cost: the pure-Python WordPiece vs the fast batch path, per batch.

Methods (all give the same ids and mask; the run checks it on every text it times):

  python      WordPieceTokenizer.encode_batch_python: the reference rules, text by text
  rust        FastWordPiece.encode_batch: every text through the Hugging Face `tokenizers`
              WordPiece built from the same vocab.txt (characters that tokenise differently there
              send their text to the Python rules)
  fast        WordPieceTokenizer.encode_batch, the default: encode_batch_cached (C-level string
              operations with each character's and each word's result remembered) for almost
              every text, `rust` for the texts it leaves
  fast_cold   `fast` with its word cache emptied before every call (each call pays the WordPiece
              split of every distinct word it holds: the first sight of a vocabulary; the
              per-character table, a few thousand entries at most in practice, stays)

Texts: ``synthetic`` (benchmarks/throughput.py's make_texts: 8-20 English words) and ``corpus``
(the built-in corpora's texts, 20,000 drawn: emoji names in English and 13 languages, instrument
queries; about half are not ASCII). Batch sizes 1, 100, 1000; max_length 32. Each call gets other texts of the
set (batch 1 walks 200 of them). Rounds alternate the method order (ABBA: A B C D, D C B A, ...)
so a load change on the shared machine hits every method alike; per-call times are medians over
rounds. One process, one thread: `tokenizers` runs single-threaded here
(TOKENIZERS_PARALLELISM=false, RAYON_NUM_THREADS=1, set before it imports) so that the figures
are per-core costs comparable with the Python ones, and the run does not take the second core
of a 2-core machine; a batch spread over its thread pool would divide the `rust` time by up to
the core count.

  python benchmarks/tokenizer_bench.py --json benchmarks/results/tokenizer_cpu.json
  python benchmarks/tokenizer_bench.py --rounds 2 --json /tmp/t.json   # a quick look
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

METHODS = ("python", "rust", "fast", "fast_cold")
BATCHES = (1, 100, 1000)
MAX_LENGTH = 32


from throughput import make_texts  # noqa: E402  the throughput benchmark's synthetic queries


def corpus_texts() -> list[str]:
  """The built-in corpora's texts: every emoji's English wordings and 13 languages' names (as
  the emoji corpus builds them), and the instruments corpus's queries."""
  texts = []
  try:
    import emoji  # pylint: disable=g-import-not-at-top
    from cart_jax.data.datasets import emoji as emoji_ds  # pylint: disable=g-import-not-at-top
    emoji.config.load_language(list(emoji_ds.CAPTION_LANGUAGES))
    for e, d in emoji.EMOJI_DATA.items():
      texts += [t for t, _ in emoji_ds.english_wordings(e, d)]
      texts += [emoji_ds._readable(d[lang]) for lang in emoji_ds.CAPTION_LANGUAGES if lang in d]  # pylint: disable=protected-access
  except ImportError:
    print("emoji is not installed: the corpus set has the instrument texts only", file=sys.stderr)
  from cart_jax.data.datasets import instruments  # pylint: disable=g-import-not-at-top
  for attrs in instruments.instrument_items():
    texts += [t.text for t in instruments.instrument_texts(attrs)]
  return texts


def _calls(texts: list[str], batch: int) -> list[list[str]]:
  """The batches one measurement encodes: ~200 texts' worth for batch 1, else >= 2 batches."""
  n_calls = 200 if batch == 1 else max(2, 2000 // batch)
  return [[texts[(i * batch + j) % len(texts)] for j in range(batch)] for i in range(n_calls)]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--json", required=True, help="output JSON path")
  ap.add_argument("--rounds", type=int, default=12, help="ABBA rounds (even)")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)

  import tokenizers  # pylint: disable=g-import-not-at-top
  from cart_jax.core.artefacts import atomic_write_json  # pylint: disable=g-import-not-at-top
  from cart_jax.models.text.tokenizer import WordPieceTokenizer  # pylint: disable=g-import-not-at-top

  tok = WordPieceTokenizer.from_file()
  fast = tok.fast()
  if fast is None:
    print("the tokenizers package does not import", file=sys.stderr)
    return 1

  def cold(batch_texts):
    tok._word_ids = {}  # pylint: disable=protected-access
    return tok.encode_batch(batch_texts, MAX_LENGTH, fast=True)

  run = {"python": lambda t: tok.encode_batch_python(t, MAX_LENGTH),
         "rust": lambda t: fast.encode_batch(t, MAX_LENGTH),
         "fast": lambda t: tok.encode_batch(t, MAX_LENGTH, fast=True),
         "fast_cold": cold}
  rng = np.random.default_rng(args.seed)
  corpus = corpus_texts()
  sets = {"synthetic": make_texts(4000, seed=args.seed),
          "corpus": [corpus[i] for i in rng.permutation(len(corpus))[:20000]]}
  info = {}
  for name, texts in sets.items():  # same arrays from every method (and warm-up)
    want = run["python"](texts)
    for m in METHODS[1:]:
      got = run[m](texts)
      if not ((got[0] == want[0]).all() and (got[1] == want[1]).all()):
        print(f"{m} differs from python on {name}", file=sys.stderr)
        return 1
    info[name] = {"texts": len(texts), "ascii_fraction": round(float(np.mean([t.isascii() for t in texts])), 4),
                  "mean_chars": round(float(np.mean([len(t) for t in texts])), 1),
                  "mean_tokens_at_32": round(float(want[1].sum(1).mean()), 2),
                  "truncated_fraction": round(float((want[1].sum(1) == MAX_LENGTH).mean()), 4),
                  "rust_fallback_fraction": round(float(np.mean([not fast.text_ok(t) for t in texts])), 4),
                  "cached_path_left_fraction": round(len(tok.encode_batch_cached(texts, MAX_LENGTH)[2]) / len(texts), 4)}
  calls = {(s, b): _calls(texts, b) for s, texts in sets.items() for b in BATCHES}
  per_call = {key: {m: [] for m in METHODS} for key in calls}  # seconds per call, one per round
  load_before = os.getloadavg()
  t_start = time.perf_counter()
  for r in range(args.rounds):
    order = METHODS if r % 2 == 0 else METHODS[::-1]
    for key, batches in calls.items():
      for m in order:
        fn = run[m]
        t0 = time.perf_counter()
        for b in batches:
          fn(b)
        per_call[key][m].append((time.perf_counter() - t0) / len(batches))
  wall = time.perf_counter() - t_start
  load_after = os.getloadavg()

  rows = []
  for (s, b), by_m in per_call.items():
    py = statistics.median(by_m["python"])
    for m in METHODS:
      med = statistics.median(by_m[m])
      rows.append({"texts": s, "batch": b, "method": m, "ms_per_batch_median": round(med * 1e3, 4),
                   "ms_per_batch_min": round(min(by_m[m]) * 1e3, 4),
                   "ms_per_batch_max": round(max(by_m[m]) * 1e3, 4),
                   "us_per_query": round(med * 1e6 / b, 2), "queries_per_s": round(b / med),
                   "speedup_vs_python": round(py / med, 2)})
      print(f"{s:<10} B={b:<5} {m:<10} {med * 1e3:9.3f} ms/batch  {med * 1e6 / b:7.2f} us/query  "
            f"x{py / med:5.2f} vs python")
  result = {
      "what": "WordPiece tokenisation of query batches (ids + mask, max_length 32), per call",
      "command": "python benchmarks/tokenizer_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpus": os.cpu_count(), "python": platform.python_version()},
      "load_average_before": [round(x, 2) for x in load_before],
      "load_average_after": [round(x, 2) for x in load_after],
      "threads": {"TOKENIZERS_PARALLELISM": os.environ["TOKENIZERS_PARALLELISM"],
                  "RAYON_NUM_THREADS": os.environ["RAYON_NUM_THREADS"],
                  "why": "per-core cost, comparable with the single-threaded Python paths; the "
                         "machine's other core stays free"},
      "tokenizers_version": tokenizers.__version__, "max_length": MAX_LENGTH,
      "rounds": args.rounds, "order": "ABBA: rounds alternate the method order",
      "timed_seconds": round(wall, 1), "text_sets": info, "results": rows,
  }
  atomic_write_json(args.json, result)
  print(f"load {load_before[0]:.2f} -> {load_after[0]:.2f}; {wall:.1f} s timed; wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
