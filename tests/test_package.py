"""The wheel (issue 18 item 6): what it holds, its metadata, and that an installed copy finds the
gin configs through package resources from any directory.

The sources are copied to a temporary directory and built there (``pip wheel --no-deps
--no-build-isolation``: offline, nothing written into the checkout), then installed with ``pip
install --no-deps --target`` and imported from another working directory.
"""
import email
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import cart_jax

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "README.md", "LICENSE", "cart_jax", "tasks", "gin_configs")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  root = tmp_path_factory.mktemp("package")
  src = root / "src"
  src.mkdir()
  for name in SOURCES:
    path = REPO / name
    if path.is_dir():
      shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
      shutil.copy(path, src / name)
  proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                         "--no-index", "-q", "-w", str(root / "dist"), str(src)],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (whl,) = (root / "dist").glob("*.whl")
  return root, whl


def test_wheel_contents_and_metadata(wheel):
  _, whl = wheel
  assert whl.name.startswith(f"cart_jax-{cart_jax.__version__}-py3-none-any")
  names = zipfile.ZipFile(whl).namelist()
  tops = {n.split("/")[0] for n in names}
  dist_info = f"cart_jax-{cart_jax.__version__}.dist-info"
  assert tops == {"cart_jax", "cart_seqio", dist_info}  # no top-level tasks or gin_configs
  for f in ("cart_jax/api.py", "cart_jax/py.typed", "cart_jax/inference/exported.py",
            "cart_seqio/__init__.py", "cart_seqio/tasks.py", "cart_seqio/vocabularies.py",
            "cart_jax/gin_configs/models/tiny.gin", "cart_jax/gin_configs/runs/train.gin",
            "cart_jax/gin_configs/experiments/emoji_demo.gin"):
    assert f in names, f
  gin_in_repo = {p.relative_to(REPO).as_posix() for p in (REPO / "gin_configs").rglob("*.gin")}
  gin_in_wheel = {n[len("cart_jax/"):] for n in names if n.endswith(".gin")}
  assert gin_in_wheel == gin_in_repo  # every config, none left behind
  meta = email.message_from_string(zipfile.ZipFile(whl).read(f"{dist_info}/METADATA").decode())
  assert meta["Name"] == "cart-jax" and meta["Version"] == cart_jax.__version__
  assert meta["License"] == "Apache-2.0"
  assert "License :: OSI Approved :: Apache Software License" in meta.get_all("Classifier")
  assert meta["Description-Content-Type"] == "text/markdown"
  assert "# cart-jax" in meta.get_payload()  # the README is the long description
  requires = meta.get_all("Requires-Dist")
  assert 'jax[cuda12]>=0.7; extra == "gpu"' in requires and 'jax[tpu]>=0.7; extra == "tpu"' in requires
  assert not [r for r in requires if 'extra == "all"' in r and ("cuda" in r or "tpu" in r)]
  licences = [n for n in names if n.startswith(dist_info) and n.rsplit("/", 1)[-1] == "LICENSE"]
  assert licences and zipfile.ZipFile(whl).read(licences[0]) == (REPO / "LICENSE").read_bytes()
  assert b"Apache License" in (REPO / "LICENSE").read_bytes()[:200]


def test_installed_copy_finds_gin_configs_from_any_directory(wheel, tmp_path):
  root, whl = wheel
  target = root / "site"
  proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                         "--target", str(target), str(whl)], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  script = """
import json, gin
import cart_jax
from cart_jax.cli import gin_bridge
gin_bridge.parse(["gin_configs/experiments/emoji_demo.gin"], ["MODEL_DIR='/tmp/x'"], finalize=False)
print(json.dumps({"file": cart_jax.__file__, "repo_root_has_gin": (gin_bridge.REPO_ROOT / "gin_configs").is_dir(),
                  "installed": str(gin_bridge.installed_gin_configs()),
                  "paths": [str(p) for p in gin_bridge.gin_search_paths()],
                  "steps": gin.query_parameter("TrainConfig.num_steps"),
                  "encoder": gin.query_parameter("ModelConfig.encoder")}))
"""
  env = dict(os.environ, PYTHONPATH=str(target))
  proc = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json
  doc = json.loads(proc.stdout.strip().splitlines()[-1])
  assert doc["file"] == str(target / "cart_jax" / "__init__.py")  # the installed copy, not the checkout
  assert not doc["repo_root_has_gin"]  # no repository to fall back on
  assert doc["installed"] == str(target / "cart_jax" / "gin_configs")
  assert doc["paths"] == [str(elsewhere), str(target / "cart_jax")]
  # emoji_demo.gin includes gin_configs/models/minilm_frozen.gin and gin_configs/runs/train.gin
  assert doc["steps"] == 1000 and doc["encoder"] == "minilm"
  # the console script's module runs from the installed copy
  proc = subprocess.run([sys.executable, "-m", "cart_jax.cli.main", "--help"], cwd=elsewhere, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and "export" in proc.stdout and "--no-compile-cache" in proc.stdout
  assert (target / "bin" / "cart").is_file()
