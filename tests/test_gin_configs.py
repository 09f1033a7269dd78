"""Every gin file parses, its configurables build, and each ablation changes what it claims."""
from pathlib import Path

import gin
import jax
import pytest
from flax import nnx

from cart_jax.cli import gin_bridge
from cart_jax.index.vocab import IdentifierVocab
from cart_jax.models.cart.config import with_vocab
from cart_jax.models.cart.network import CARTNetwork

ROOT = Path(__file__).resolve().parents[1] / "gin_configs"
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.gin"))
RUNS = sorted((ROOT / "runs").glob("*.gin"))
MODELS = sorted((ROOT / "models").glob("*.gin"))
VOCAB = IdentifierVocab((64, 64, 64, 22))


def _build(files, bindings=()):
  gin_bridge.parse([str(f) for f in files], list(bindings))
  made = {name: gin.get_configurable(name)() for name in ("ModelConfig", "TrainConfig", "InputConfig")}
  made["macros"] = {m: gin.query_parameter(f"%{m}") for m in ("MODEL_DIR", "CORPUS_DIR", "INDEX_DIR")}
  try:
    made["IdentifierConfig"] = gin.query_parameter("train_job.identifier_config") and \
        gin.get_configurable("IdentifierConfig")()
  except ValueError:
    made["IdentifierConfig"] = None
  return made


def _params(model_config) -> int:
  abstract = nnx.eval_shape(lambda: CARTNetwork(with_vocab(model_config, VOCAB), rngs=nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_every_file_is_found():
  names = {p.name for p in EXPERIMENTS}
  for want in ("emoji_demo.gin", "emoji_cart.gin", "flickr30k.gin", "mscoco.gin", "clotho.gin",
               "audiocaps.gin", "msrvtt.gin", "msvd.gin"):
    assert want in names
  assert {p.name for p in RUNS} == {"train.gin", "eval.gin", "build_ids.gin"}
  for p in EXPERIMENTS + RUNS:  # each opens with what it is, then the command that runs it
    lines = p.read_text().splitlines()
    assert lines[0].startswith("# ") and any(l.startswith("#   cart ") for l in lines[:6]), p.name
    assert any("Expected" in l for l in lines[:12]), p.name


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_parses_and_builds(path):
  made = _build([path], ["MODEL_DIR=/tmp/x"])
  assert made["macros"]["MODEL_DIR"] == "/tmp/x"  # bare paths are quoted for the user
  assert made["macros"]["CORPUS_DIR"] and made["macros"]["INDEX_DIR"]
  assert made["TrainConfig"].num_steps >= 1000 and made["InputConfig"].batch_size >= 64
  assert _params(made["ModelConfig"]) > 100_000


def test_runs_and_models_parse():
  for m in MODELS:
    made = _build([m, ROOT / "runs" / "train.gin"])
    assert made["ModelConfig"].d_model >= 32
  gin_bridge.parse([str(ROOT / "runs" / "eval.gin")], ["EvalConfig.split='val'"])
  # batch_size None: the searcher picks the device's default (64 per CPU device, 1024 per GPU/TPU).
  assert gin_bridge.eval_config() == gin_bridge.EvalConfig(split="val", beam_size=10, batch_size=None)


def test_ablations_change_one_thing_each():
  full = _build([ROOT / "experiments" / "emoji_cart.gin"])
  assert full["ModelConfig"].fusion == "both" and full["TrainConfig"].omega > 0
  assert full["InputConfig"].caption_rate > 0 and full["IdentifierConfig"] is None
  ab = {p.stem.split("ablation_")[1]: _build([p]) for p in EXPERIMENTS if "ablation" in p.stem}
  assert set(ab) == {"no_fusion", "no_rdrop", "no_caption", "no_kmeans", "no_rqvae"}
  assert ab["no_fusion"]["ModelConfig"].fusion == "none"
  assert ab["no_rdrop"]["TrainConfig"].omega == 0.0
  assert ab["no_caption"]["InputConfig"].caption_rate == 0.0
  assert ab["no_kmeans"]["IdentifierConfig"].use_kmeans is False
  assert ab["no_rqvae"]["IdentifierConfig"].use_rqvae is False
  for name in ("no_kmeans", "no_rqvae"):  # their own index, never the full recipe's
    assert ab[name]["macros"]["INDEX_DIR"] != full["macros"]["INDEX_DIR"]
  for name, made in ab.items():  # everything else as in the full recipe
    for key in ("ModelConfig", "TrainConfig", "InputConfig"):
      diff = {f for f in vars(full[key]) if getattr(full[key], f) != getattr(made[key], f)}
      assert len(diff) <= 1, (name, key, diff)
  assert _params(ab["no_fusion"]["ModelConfig"]) < _params(full["ModelConfig"])


def test_bad_binding_is_a_clear_error():
  with pytest.raises(ValueError, match="NAME=VALUE"):
    gin_bridge.parse([str(ROOT / "runs" / "eval.gin")], ["EvalConfig.split"])


def test_includes_resolve_from_any_directory_without_error_logs(tmp_path, monkeypatch, caplog):
  monkeypatch.chdir(tmp_path)  # outside the repository: includes are found under REPO_ROOT
  assert (gin_bridge.REPO_ROOT / "gin_configs").is_dir()
  with caplog.at_level("INFO"):
    made = _build([ROOT / "experiments" / "emoji_demo.gin"], ["MODEL_DIR=/tmp/x"])
  assert made["TrainConfig"].num_steps >= 1000
  assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_run_train_without_model_dir_is_a_one_line_user_error():
  from cart_jax.core.errors import CartError
  gin_bridge.parse([str(ROOT / "experiments" / "emoji_demo.gin")], [])
  with pytest.raises(CartError, match=r"^MODEL_DIR is not set: pass --gin.MODEL_DIR=DIR"):
    gin_bridge.run_train(progress=False)


def test_written_config_holds_the_resolved_values():
  from cart_jax.jobs import train as jobs
  text = "MODEL_DIR = 'run'\nModelConfig.output_vocab_size = 1314\nModelConfig.d_model = 16\n" \
         "train_job.model_dir = %MODEL_DIR\n"
  summary = {"model_dir": "/abs/run", "corpus_dir": "/abs/corpus", "index_dir": None,
             "embeddings": "/abs/e.npy", "model_config": {"output_vocab_size": 29, "d_model": 16,
                                                          "fusion": "both"}}
  out = jobs.resolve_config(text, summary)
  assert "1314" not in out and "MODEL_DIR = 'run'" not in out
  gin_bridge.register()
  gin.clear_config()
  gin.parse_config(out, skip_unknown=True)
  assert gin.query_parameter("%MODEL_DIR") == "/abs/run" and gin.query_parameter("%INDEX_DIR") is None
  made = gin.get_configurable("ModelConfig")()
  assert made.output_vocab_size == 29 and made.d_model == 16 and made.fusion == "both"
