"""benchmarks/ablations.py: a tiny two-variant sweep end to end, its resume, and its argument errors.

Numbers are not judged (3 steps of a 16-wide decoder on 24 emoji): only that every run records
finite metrics and identifier diagnostics, the summary and the plot exist, and a second invocation
trains nothing.
"""
import json
import math
from pathlib import Path

import pytest

from helpers import TINY_DRIVER_BINDINGS, TINY_DRIVER_ID_BINDINGS, extra_bindings, load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "ablations.py"


abl = load_script("ablations_bench", SCRIPT)

TINY = [*TINY_DRIVER_BINDINGS, 'InputConfig.pipeline="numpy"', *TINY_DRIVER_ID_BINDINGS]


def test_two_variants_run_then_resume_skips_them(tmp_path, capsys):
  out = tmp_path / "abl.json"
  argv = ["--dataset", "emoji", "--limit", "24", "--variants", "full,no_rdrop", "--seeds", "0",
          "--steps", "3", "--embed-steps", "2", "--workdir", str(tmp_path / "work"), "--json", str(out),
          "--quiet"]
  argv += extra_bindings(TINY)
  assert abl.main(argv) == 0
  report = json.loads(out.read_text())
  assert report["format"] == "cart-ablations"
  runs = {r["variant"]: r for r in report["runs"]}
  assert set(runs) == {"full", "no_rdrop"} and len(report["runs"]) == 2
  for name, r in runs.items():
    assert r["seed"] == 0 and r["steps"] == 3 and r["dataset"] == "emoji" and r["limit"] == 24
    assert r["train"]["step"] == 3 and r["train"]["wall_seconds"] > 0 and r["eval_seconds"] > 0
    for split in ("val", "test"):
      m = r[split]
      assert m["num_queries"] > 0 and m["qps"] > 0
      for k in ("r@1", "r@5", "r@10", "mrr@10"):
        assert math.isfinite(m[k]) and 0.0 <= m[k] <= 1.0, (name, split, k, m[k])
      assert m["r@1"] <= m["r@5"] <= m["r@10"]
    ids = r["identifiers"]
    for k in ("collision_rate", "max_counter", "unique_prefixes", "codebook_usage_per_level"):
      assert ids[k] is not None, k
    assert 0.0 <= ids["collision_rate"] <= 1.0 and len(ids["codebook_usage_per_level"]) == 1
    cfg = r["config"]
    assert cfg["identifier_config"]["seed"] == 0 and cfg["identifier_config"]["rq_steps"] == 10
    assert 'ModelConfig.fusion="both"' in cfg["bindings"] and "TrainConfig.eval_every=0" in cfg["bindings"]
    assert "InputConfig.caption_rate=0.1" in cfg["bindings"]  # emoji has captions
    assert r["machine"]["cpu_count"] >= 1
  # each ablation changes one thing: no_rdrop differs from full only in omega
  diff = set(runs["full"]["config"]["bindings"]) ^ set(runs["no_rdrop"]["config"]["bindings"])
  assert {b for b in diff if not b.startswith("MODEL_DIR=")} == {"TrainConfig.omega=1.0",
                                                                    "TrainConfig.omega=0.0"}
  assert runs["full"]["index_dir"] == runs["no_rdrop"]["index_dir"]  # one index, shared
  summary = report["summary"]["variants"]
  assert set(summary) == {"full", "no_rdrop"}
  assert summary["no_rdrop"]["verdict"]["r@1"] in ("worse", "better", "tie")
  assert summary["no_rdrop"]["single_seed"] is True
  assert report["comparison"]["paper_order"] == ["no_rdrop"]
  png = out.with_suffix(".png")
  assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  printed = capsys.readouterr().out
  assert "2 run(s) trained, 0 skipped" in printed and "no_rdrop" in printed and "verdict" in printed

  # Again: both runs are in the JSON, so nothing is trained (the run directories are untouched).
  stamps = {n: (Path(r["model_dir"]) / "train_summary.json").stat().st_mtime_ns for n, r in runs.items()}
  assert abl.main(argv) == 0
  printed = capsys.readouterr().out
  assert "skip full 0 (done)" in printed and "skip no_rdrop 0 (done)" in printed
  assert "0 run(s) trained, 2 skipped" in printed
  assert len(json.loads(out.read_text())["runs"]) == 2
  for n, r in runs.items():
    assert (Path(r["model_dir"]) / "train_summary.json").stat().st_mtime_ns == stamps[n]


def test_bad_variant_names_the_valid_ones(capsys):
  with pytest.raises(SystemExit) as e:
    abl.main(["--variants", "full,no_magic"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "no_magic" in err
  for name in ("full", "no_fusion", "coarse_only", "fine_only", "no_kmeans", "no_rqvae", "no_rdrop",
               "no_caption"):
    assert name in err


def test_extra_bindings_may_not_touch_what_the_variants_set(capsys):
  with pytest.raises(SystemExit):
    abl.main(["--extra-binding", "TrainConfig.omega=0.5"])
  assert "TrainConfig.omega" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    abl.main(["--extra-binding", "IdentifierConfig.no_such_field=1"])
  assert "no_such_field" in capsys.readouterr().err


def test_summary_verdicts_use_the_seed_spread():
  def run(variant, seed, r1):
    return {"variant": variant, "seed": seed, "test": {"r@1": r1, "r@10": r1, "mrr@10": r1},
            "val": {"r@1": r1}, "identifiers": {"collision_rate": 0.1}, "train": {"wall_seconds": 1.0}}
  runs = [run("full", 0, 0.80), run("full", 1, 0.82),
          run("no_fusion", 0, 0.70), run("no_fusion", 1, 0.74),   # 0.09 below, spread 0.04: worse
          run("no_rdrop", 0, 0.79), run("no_rdrop", 1, 0.82),     # 0.005 below, spread 0.03: tie
          run("no_kmeans", 0, 0.90), run("no_kmeans", 1, 0.91)]   # 0.095 above: better
  s = abl.summarise(runs)
  v = s["variants"]
  assert list(v) == ["full", "no_fusion", "no_kmeans", "no_rdrop"]  # the canonical order
  assert v["full"]["r@1"]["mean"] == pytest.approx(0.81) and v["full"]["r@1"]["std"] > 0
  assert v["no_fusion"]["verdict"]["r@1"] == "worse"
  assert v["no_rdrop"]["verdict"]["r@1"] == "tie"
  assert v["no_kmeans"]["verdict"]["r@1"] == "better"
  assert v["no_fusion"]["delta_vs_full"]["r@1"] == pytest.approx(-0.09)
  assert s["comparison"]["measured_order"] == ["no_fusion", "no_rdrop", "no_kmeans"]
  assert s["comparison"]["paper_order"] == ["no_fusion", "no_kmeans", "no_rdrop"]
  assert not s["comparison"]["same_order"]
  assert "no_fusion" in abl.table(s)


def test_variants_change_one_thing_each():
  full = abl.variant_bindings("full", True)
  for name, var in abl.VARIANTS.items():
    b = abl.variant_bindings(name, True)
    changed = {k for k in full if b[k] != full[k]} | {k for k, _ in var.ids}
    assert len(changed) == (0 if name == "full" else 1), name
  # a corpus without captions: full trains without them, and no_caption is not applicable
  assert abl.variant_bindings("full", False)["InputConfig.caption_rate"] == "0.0"
  assert abl.applicable("no_caption", False) and abl.applicable("no_caption", True) is None
