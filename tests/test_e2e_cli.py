"""Tiny end to end through the command modules: data prepare (--limit) -> embed -> build-ids ->
train (gin, a few steps) -> eval -> search, plus the user-error paths.

Commands run in this process through each module's own argparse parser (as ``cart`` does), which
saves a JAX start-up per command. Resume through MODEL_DIR is covered by test_trainer.py.
"""
import argparse
import importlib
import json

import pytest

from cart_jax.core.errors import CartError


def cart(*argv: str) -> int:
  """``cart ARGV`` in process: parse with the command module's parser, run, map CartError to 2."""
  name = argv[0]
  mod = importlib.import_module(f"cart_jax.cli.commands.{name.replace('-', '_')}")
  parser = argparse.ArgumentParser(prog="cart")
  sub = parser.add_subparsers()
  mod.register(sub, name, name)
  args = parser.parse_args(list(argv))
  try:
    return int(args.func(args) or 0)
  except CartError as e:
    print(f"cart {name}: error: {e}")
    return 2


def test_tiny_pipeline_through_the_cli(tmp_path, capsys):
  corpus, emb, index, run = tmp_path / "corpus", tmp_path / "emb" / "e.npy", tmp_path / "index", tmp_path / "run"
  assert cart("data", "prepare", "emoji", "--out", str(corpus), "--limit", "24") == 0
  assert cart("embed", "--corpus", str(corpus), "--out", str(emb), "--steps", "3", "--batch-size", "16",
              "--checkpoint-every", "0", "--no-progress") == 0
  assert cart("build-ids", "--embeddings", str(emb), "--item-ids", str(emb.with_suffix(".ids.txt")),
              "--out", str(index), "--clusters", "3", "--levels", "1", "--codebook-size", "4",
              "--rq-steps", "10", "--rq-latent-dim", "8", "--quiet") == 0
  capsys.readouterr()
  gin = ["--gin_file=gin_configs/experiments/emoji_demo.gin", f"--gin.MODEL_DIR={run}",
         f"--gin.CORPUS_DIR={corpus}", f"--gin.INDEX_DIR={index}", "--gin.ModelConfig.d_model=16",
         "--gin.ModelConfig.d_ff=16", "--gin.ModelConfig.num_heads=2", "--gin.ModelConfig.head_dim=8",
         "--gin.InputConfig.batch_size=8", "--gin.InputConfig.input_length=16",
         "--gin.TrainConfig.warmup_steps=1", "--gin.TrainConfig.checkpoint_every=2",
         "--gin.TrainConfig.log_every=1"]
  assert cart("train", *gin, "--gin.TrainConfig.num_steps=2", "--no-progress",
              "--json", str(tmp_path / "t1.json")) == 0
  s1 = json.loads((tmp_path / "t1.json").read_text())
  assert s1["start_step"] == 0 and s1["step"] == 2 and s1["input"]["pipeline"] == "numpy"
  # MODEL_DIR layout: everything eval/search need.
  for name in ("run.json", "config.gin", "index/meta.json", "checkpoints/2", "metrics.jsonl",
               "train_summary.json", "tensorboard"):
    assert (run / name).exists(), name
  assert "ModelConfig.d_model = 16" in (run / "config.gin").read_text()
  losses = [json.loads(l)["train/loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert len(losses) == 2 and all(l > 0 for l in losses)
  # A different model in the same MODEL_DIR is refused.
  assert cart("train", *gin, "--gin.ModelConfig.d_model=32", "--no-progress") == 2
  assert "another model config" in capsys.readouterr().out

  assert cart("eval", "--model_dir", str(run), "--split", "test", "--json", str(tmp_path / "ev.json")) == 0
  ev = json.loads((tmp_path / "ev.json").read_text())
  assert ev["step"] == 2 and ev["num_queries"] == 24 and ev["num_items"] == 24
  assert 0.0 <= ev["r@1"] <= ev["r@5"] <= ev["r@10"] <= 1.0 and ev["qps"] > 0
  # (2 steps: no quality bar here; tests/test_cart_learns.py has one. "R@10 >= 10/24" is not an
  # invariant: queries that get different beams can all miss their own item.)
  # --json -: stdout is the JSON alone; the library call gives the same recall
  capsys.readouterr()
  assert cart("eval", "--model-dir", str(run), "--json", "-", "--quiet") == 0
  piped = json.loads(capsys.readouterr().out)
  from cart_jax import api
  lib = api.evaluate(run, split="test")
  for key in ("r@1", "r@5", "r@10", "mrr@10", "num_queries", "step"):
    assert piped[key] == ev[key] == lib[key], key

  capsys.readouterr()
  assert cart("search", "--model_dir", str(run), "grinning face", "-k", "3",
              "--json", str(tmp_path / "s.json")) == 0
  res = json.loads((tmp_path / "s.json").read_text())["queries"][0]["results"]
  assert [r["rank"] for r in res] == [1, 2, 3]
  assert len({r["item_id"] for r in res}) == 3 and all(r["media"].endswith(".png") for r in res)
  assert res[0]["score"] >= res[1]["score"] >= res[2]["score"]
  assert "grinning face" in capsys.readouterr().out
  assert cart("search", "--model-dir", str(run), "grinning face", "-k", "3", "--json", "-") == 0
  assert json.loads(capsys.readouterr().out)["queries"] == api.search(run, ["grinning face"], k=3)


def test_user_errors(tmp_path, capsys):
  assert cart("eval", "--model_dir", str(tmp_path)) == 2
  assert "not a CART model directory" in capsys.readouterr().out
  assert cart("search", "--model_dir", str(tmp_path), "x") == 2
  assert cart("train", "--gin.MODEL_DIR=/tmp/x") == 2
  assert "--gin-file is required" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    cart("eval", "--model_dir", str(tmp_path), "--split", "nope")


def test_missing_model_dir_and_unbound_gin_are_one_line_errors(tmp_path, capsys):
  """Through the console entry point: exit 2, one line on stderr, no traceback."""
  from cart_jax.cli.main import main
  missing = str(tmp_path / "nowhere")
  for argv in (["eval", "--model-dir", missing], ["search", "--model-dir", missing, "x"]):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{missing}: no such directory" in err, err
  # emoji_demo.gin leaves MODEL_DIR = None: said so before anything runs (no TypeError read back)
  assert main(["train", "--gin-file", "gin_configs/experiments/emoji_demo.gin"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "gin config incomplete: MODEL_DIR is None" in err, err
  assert main(["train", "--gin-file", "gin_configs/models/tiny.gin"]) == 2
  assert "train_job.model_dir is not bound" in capsys.readouterr().err


def test_old_flag_spellings_work_but_are_hidden(capsys):
  """Kebab-case flags; the old spellings parse to the same option and stay out of --help."""
  from cart_jax.cli.main import build_parser
  parser = build_parser()
  old = {"baseline": (["--corpus", "c", "--embeddings", "e.npy", "--ids", "i.txt", "--query-batch", "7",
                       "--no-progress"], {"item_ids": "i.txt", "batch_size": 7, "quiet": True}),
         "eval": (["--model_dir", "m", "--batch", "5"], {"model_dir": "m", "batch_size": 5}),
         "embed": (["--corpus", "c", "--out", "e.npy", "--ids", "i.txt"], {"item_ids": "i.txt"}),
         "model-info": (["--src_len", "9", "--cost_analysis"], {"src_len": 9, "cost_analysis": True}),
         "train": (["--gin_file", "g.gin", "--no-progress"], {"gin_file": ["g.gin"], "quiet": True})}
  for command, (argv, want) in old.items():
    args = parser.parse_args([command] + argv)
    assert {k: getattr(args, k) for k in want} == want, command
    with pytest.raises(SystemExit):
      parser.parse_args([command, "--help"])
    text = capsys.readouterr().out
    for flag in ("--ids ", "--query-batch", "--no-progress", "--model_dir ", "--batch ", "--src_len",
                 "--cost_analysis"):
      assert flag not in text, (command, flag)
    assert "--json PATH" in text and "--quiet" in text
