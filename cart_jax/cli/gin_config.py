"""gin at the edge: the only module that imports gin and registers configurables.

Configurables (each bound in one place, see ``gin_configs/``):

  ModelConfig       cart_jax.models.cart.config.ModelConfig       gin_configs/models/*.gin
  TrainConfig       cart_jax.train.trainer.TrainConfig      gin_configs/runs/train.gin
  InputConfig       cart_jax.train.input_pipeline.InputConfig  gin_configs/runs/train.gin
  IdentifierConfig  cart_jax.index.identifiers.IdentifierConfig  gin_configs/runs/build_ids.gin
  train_job         cart_jax.train.jobs.train_job           gin_configs/runs/train.gin
  EvalConfig        (beam_size, batch_size, split, limit)    gin_configs/runs/eval.gin

Macros used by the run files: ``MODEL_DIR``, ``CORPUS_DIR``, ``INDEX_DIR``, ``EMBEDDINGS``.
``--gin.X=V`` flags are bindings; a bare path value (``--gin.MODEL_DIR=/tmp/run``) is quoted
for you, so both ``'/tmp/run'`` and ``/tmp/run`` work.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import gin

REPO_ROOT = Path(__file__).resolve().parents[1]
_REGISTERED = False
_SEARCH_PATHS: set[str] = set()


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  split: str = "test"
  beam_size: int = 10
  batch_size: int = 64
  limit: int | None = None


def register() -> None:
  """Registers the configurables (idempotent)."""
  global _REGISTERED
  if _REGISTERED:
    return
  from cart_jax.index.identifiers import IdentifierConfig  # pylint: disable=g-import-not-at-top
  from cart_jax.models.cart.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from cart_jax.train import jobs  # pylint: disable=g-import-not-at-top
  from cart_jax.train.input_pipeline import InputConfig  # pylint: disable=g-import-not-at-top
  from cart_jax.train.trainer import TrainConfig  # pylint: disable=g-import-not-at-top

  gin.external_configurable(ModelConfig, "ModelConfig")
  gin.external_configurable(TrainConfig, "TrainConfig")
  gin.external_configurable(InputConfig, "InputConfig")
  gin.external_configurable(IdentifierConfig, "IdentifierConfig")
  gin.external_configurable(EvalConfig, "EvalConfig")
  gin.external_configurable(jobs.train_job, "train_job",
                            denylist=["progress", "stop_after", "log", "operative_config"])
  _REGISTERED = True


def _binding(flag: str) -> str:
  """``X=V`` -> a gin binding, quoting a bare path/word value that is not a gin literal."""
  if "=" not in flag:
    raise ValueError(f"--gin.{flag}: expected --gin.NAME=VALUE")
  name, value = flag.split("=", 1)
  v = value.strip()
  literal = (v[:1] in "'\"[({@%-" or v[:1].isdigit() or v in ("True", "False", "None"))
  if not literal:
    v = repr(v)
  return f"{name.strip()} = {v}"


def parse(gin_files: Sequence[str], bindings: Sequence[str], *, finalize: bool = True) -> None:
  """Clears gin, registers, then parses files (searched also under the repository root)."""
  register()
  gin.clear_config()
  for d in (str(Path.cwd()), str(REPO_ROOT)):
    if d not in _SEARCH_PATHS:
      gin.add_config_file_search_path(d)
      _SEARCH_PATHS.add(d)
  gin.parse_config_files_and_bindings(list(gin_files), [_binding(b) for b in bindings],
                                      finalize_config=finalize)


def split_gin_args(argv_extra: Sequence[str]) -> list[str]:
  """``["--gin.A=1", "--gin.B=x"]`` (unknown argparse args) -> ``["A=1", "B=x"]``."""
  out = []
  for a in argv_extra:
    if not a.startswith("--gin."):
      raise ValueError(f"unrecognized argument {a!r} (gin bindings are --gin.NAME=VALUE)")
    out.append(a[len("--gin."):])
  return out


def run_train(progress: bool = True) -> dict:
  """Calls the gin-configured ``train_job`` and saves the operative config with it."""
  train_job = gin.get_configurable("train_job")
  # The parsed config is written into MODEL_DIR up front (a crashed run still documents
  # itself); once the job returns, gin's operative config (what was actually used) replaces it.
  summary = train_job(operative_config=gin.config_str(), progress=progress)
  out = Path(summary["model_dir"]) / "config.gin"
  tmp = out.with_name(".config.gin.tmp")
  tmp.write_text(gin.operative_config_str(), encoding="utf-8")
  tmp.replace(out)
  return summary


def eval_config() -> EvalConfig:
  return gin.get_configurable("EvalConfig")()
