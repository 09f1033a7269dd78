"""gin at the edge: the only module that imports gin and registers configurables.

Configurables (each bound in one place, see ``gin_configs/``):

  ModelConfig       cart_jax.models.cart.config.ModelConfig       gin_configs/models/*.gin
  TrainConfig       cart_jax.train.trainer.TrainConfig      gin_configs/runs/train.gin
  InputConfig       cart_jax.train.input_pipeline.InputConfig  gin_configs/runs/train.gin
  IdentifierConfig  cart_jax.index.identifiers.IdentifierConfig  gin_configs/runs/build_ids.gin
  train_job         cart_jax.api.train (-> jobs.train.train_job) gin_configs/runs/train.gin
  EvalConfig        (beam_size, batch_size, split, limit)    gin_configs/runs/eval.gin

Macros used by the run files: ``MODEL_DIR``, ``CORPUS_DIR``, ``INDEX_DIR``, ``EMBEDDINGS``.
``--gin.X=V`` flags are bindings; a bare path value (``--gin.MODEL_DIR=/tmp/run``) is quoted
for you, so both ``'/tmp/run'`` and ``/tmp/run`` work.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import gin

from cart_jax.core.errors import CartError, ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]  # cart_jax/cli/gin_bridge.py -> the repository
GIN_PACKAGE = "cart_jax.gin_configs"  # gin_configs/ as installed by the wheel (setup.py)
_REGISTERED = False
_SEARCH_PATHS: set[str] = set()


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  split: str = "test"
  beam_size: int = 10
  batch_size: int | None = None  # None: the device's default (searcher.default_batch_size)
  limit: int | None = None


def register() -> None:
  """Registers the configurables (idempotent)."""
  global _REGISTERED
  if _REGISTERED:
    return
  from cart_jax.index.identifiers import IdentifierConfig  # pylint: disable=g-import-not-at-top
  from cart_jax.models.cart.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from cart_jax import api  # pylint: disable=g-import-not-at-top
  from cart_jax.train.input_pipeline import InputConfig  # pylint: disable=g-import-not-at-top
  from cart_jax.train.trainer import TrainConfig  # pylint: disable=g-import-not-at-top

  gin.external_configurable(ModelConfig, "ModelConfig")
  gin.external_configurable(TrainConfig, "TrainConfig")
  gin.external_configurable(InputConfig, "InputConfig")
  gin.external_configurable(IdentifierConfig, "IdentifierConfig")
  gin.external_configurable(EvalConfig, "EvalConfig")
  # `cart train` calls the typed library function with the configs gin built.
  gin.external_configurable(api.train, "train_job",
                            denylist=["progress", "log", "operative_config"])
  _REGISTERED = True


def _binding(flag: str) -> str:
  """``X=V`` -> a gin binding, quoting a bare path/word value that is not a gin literal."""
  if "=" not in flag:
    raise ConfigError(f"--gin.{flag}: expected --gin.NAME=VALUE")
  name, value = flag.split("=", 1)
  v = value.strip()
  literal = (v[:1] in "'\"[({@%-" or v[:1].isdigit() or v in ("True", "False", "None"))
  if not literal:
    v = repr(v)
  return f"{name.strip()} = {v}"


class _NoProbeErrors(logging.Filter):
  """Drops gin's ``ERROR Path not found`` records.

  The run files include each other by repository-relative paths (``gin_configs/...``). Launched
  from outside the repository, gin first probes the working directory, where its Python-package
  reader logs that error although a later search path (``REPO_ROOT``) has the file. A file found
  nowhere still fails, naming every path tried. (``gin_configs/**/__init__.py`` let that reader
  resolve the includes when the repository is on ``sys.path``, instead of crashing on a
  namespace package.)
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.msg == "Path not found: %s" and record.module == "resource_reader")


def gin_search_paths() -> list[Path]:
  """Directories holding ``gin_configs/``: where ``gin_configs/...`` paths and includes resolve.

  The working directory first (a user's own ``gin_configs/``), then the repository root of this
  checkout, then the installed package's copy (``cart_jax/gin_configs`` in the wheel, found
  through package resources), so ``--gin-file=gin_configs/experiments/emoji_demo.gin`` works
  from any directory with an installed ``cart`` too.
  """
  paths = [Path.cwd()]
  if (REPO_ROOT / "gin_configs").is_dir():
    paths.append(REPO_ROOT)
  installed = installed_gin_configs()
  if installed is not None and installed.parent not in paths:
    paths.append(installed.parent)
  return paths


def installed_gin_configs() -> Path | None:
  """The ``gin_configs`` folder of the installed package (``None``: not installed as one)."""
  import importlib.resources  # pylint: disable=g-import-not-at-top
  try:
    root = importlib.resources.files(GIN_PACKAGE)
  except ModuleNotFoundError:
    return None
  path = Path(str(root))
  # gin reads files by path: the package's folder must exist as one (not a zip) and, to resolve
  # includes written as 'gin_configs/...', be named gin_configs.
  return path if path.name == "gin_configs" and path.is_dir() else None


def parse(gin_files: Sequence[str], bindings: Sequence[str], *, finalize: bool = True) -> None:
  """Clears gin, registers, then parses files (searched also under the repository root and the
  installed package, so the ``gin_configs/`` paths and includes resolve from any working
  directory: :func:`gin_search_paths`)."""
  register()
  gin.clear_config()
  for d in map(str, gin_search_paths()):
    if d not in _SEARCH_PATHS:
      gin.add_config_file_search_path(d)
      _SEARCH_PATHS.add(d)
  quiet = _NoProbeErrors()
  logging.getLogger().addFilter(quiet)
  try:
    gin.parse_config_files_and_bindings(list(gin_files), [_binding(b) for b in bindings],
                                        finalize_config=finalize)
  finally:
    logging.getLogger().removeFilter(quiet)


def _require_macro(name: str) -> None:
  """``NAME`` (a macro the run files use) is bound and not None, else a one-line CartError."""
  try:
    value = gin.query_parameter(f"{name}/macro.value")
  except ValueError:
    value = None
  if value is None:
    raise CartError(f"{name} is not set: pass --gin.{name}=DIR (or bind it in a gin file)")


def train(gin_files: Sequence[str], bindings: Sequence[str] = (), *, progress: bool = True) -> dict:
  """Parses ``gin_files`` + ``bindings`` and runs the configured ``train_job`` (``cart train``:
:func:`cart_jax.api.train` with the configs gin built)."""
  try:
    parse(gin_files, bindings)
  except (ValueError, OSError) as e:  # gin reports a bad file or binding as these
    raise CartError(f"gin: {e}") from None
  _check_train_bindings()
  return run_train(progress=progress)


def _check_train_bindings() -> None:
  """Every argument ``train_job`` needs is bound, and MODEL_DIR / CORPUS_DIR are not None."""
  import inspect  # pylint: disable=g-import-not-at-top

  from cart_jax.api import train as train_job  # pylint: disable=g-import-not-at-top
  hint = "(bind it, e.g. --gin.MODEL_DIR=/tmp/run)"
  for name, param in inspect.signature(train_job).parameters.items():
    if param.default is not inspect.Parameter.empty or name == "operative_config":
      continue
    try:
      value = gin.query_parameter(f"train_job.{name}")
    except ValueError:
      raise CartError(f"gin config incomplete: train_job.{name} is not bound {hint}") from None
    macro = str(value)[1:] if str(value).startswith("%") else None
    if macro and name in ("model_dir", "corpus_dir") and \
        gin.query_parameter(f"{macro}/macro.value") is None:
      raise CartError(f"gin config incomplete: {macro} is None {hint}")


def run_train(progress: bool = True) -> dict:
  """Calls the gin-configured ``train_job`` and saves the operative config with it.

  ``MODEL_DIR/config.gin`` is gin's operative config (what was actually used) with the values
  the run resolved itself (absolute paths, ``output_vocab_size`` from the index:
  :func:`cart_jax.jobs.train.resolve_config`), so parsing it again reproduces the run.
  Written by process 0 only, atomically.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from cart_jax.jobs import train as jobs  # pylint: disable=g-import-not-at-top
  for name in ("MODEL_DIR", "CORPUS_DIR"):
    _require_macro(name)
  train_job = gin.get_configurable("train_job")
  # The parsed config is written into MODEL_DIR up front (a crashed run still documents
  # itself); once the job returns, gin's operative config replaces it.
  try:
    summary = train_job(operative_config=gin.config_str(), progress=progress)
  except CartError as e:
    raise _without_gin_context(e) from None
  from cart_jax import partitioning  # pylint: disable=g-import-not-at-top
  from cart_jax.core import paths  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    paths.write_text(paths.absolute(summary["model_dir"]) / jobs.CONFIG_FILE,
                     jobs.resolve_config(gin.operative_config_str(), summary))
  partitioning.sync("cart-train-config")  # config.gin is final when any process returns
  return summary


def _without_gin_context(e: CartError) -> CartError:
  """The user error as raised: gin appends "In call to configurable 'train_job' (<function ...>)"
  to an exception's text (through a proxy subclass of its class), which is noise on a one-line error."""
  message = str(e).split("\n  In call to configurable")[0]
  cls = type(e)
  if len(cls.__mro__) > 1 and cls.__mro__[1].__name__ == cls.__name__:  # gin's proxy of the real class
    e.__class__ = cls.__mro__[1]
  e.args = (message,)
  return e


def eval_config() -> EvalConfig:
  return gin.get_configurable("EvalConfig")()
