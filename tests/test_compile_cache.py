"""The persistent compilation cache (issue 18 item 4): a second ``cart search`` in a fresh process
loads the programs the first one compiled, and the cache can be turned off.

Behaviour, not time: the counts come from JAX's own cache events (``compile_cache.stats``) and
the files in the cache directory. The start-up times are measured by benchmarks/start_time.py.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cart_jax.core import compile_cache

pytestmark = pytest.mark.integration  # trains or loads a real CART run (still in `make test`)

# Runs `cart search` through the console entry point in this fresh process and prints the cache's
# counts for it and the search program's entries.
SCRIPT = """
import json, sys
from cart_jax.cli.main import main
from cart_jax.core import compile_cache
rc = main(sys.argv[1:])
st = compile_cache.stats()
print(json.dumps({"rc": rc, "dir": str(compile_cache.enabled_dir()), "requests": st.requests,
                  "hits": st.hits, "writes": st.writes}))
"""


def _search(run: Path, cache: Path, *flags: str) -> dict:
  env = dict(os.environ, CART_JAX_CACHE_DIR=str(cache))
  env.pop(compile_cache.ENV_SWITCH, None)
  argv = [*flags, "search", "--model-dir", str(run), "smiling cat", "a red heart", "-k", "3",
          "--quiet", "--json", os.devnull]
  proc = subprocess.run([sys.executable, "-c", SCRIPT, *argv], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return dict(json.loads(proc.stdout.strip().splitlines()[-1]), stderr=proc.stderr)


def _search_programs(cache: Path) -> set[str]:
  return {p.name for p in compile_cache.cache_entries(cache) if p.name.startswith("jit_search")}


@pytest.fixture(scope="module")
def run(tiny_run):
  return tiny_run  # the session's tiny run (tests/conftest.py), shared with test_export


def test_second_search_loads_what_the_first_compiled(run, tmp_path):
  cache = tmp_path / "jax-cache"
  first = _search(run, cache)
  assert first["rc"] == 0 and first["dir"] == str(cache.resolve())
  assert first["hits"] == 0 and first["writes"] > 0
  entries = compile_cache.cache_entries(cache)
  assert len(entries) == first["writes"]
  assert len(_search_programs(cache)) == 1  # the beam search program is among them
  assert oct(cache.stat().st_mode & 0o777) == "0o700"  # JAX trusts its cache: private

  second = _search(run, cache)
  assert second["rc"] == 0
  if second["hits"] == 0 and "doesn't match the machine type for execution" in second["stderr"]:
    # XLA:CPU refuses to load its own executables on some CPUs (jax-ml/jax#38445): no gain there
    pytest.skip("this CPU's XLA rejects its own cached executables (jax-ml/jax#38445)")
  assert second["hits"] >= len(entries) and second["writes"] == 0  # nothing compiled again
  assert len(compile_cache.cache_entries(cache)) == len(entries)


def test_no_compile_cache_flag_and_env_turn_it_off(run, tmp_path):
  cache = tmp_path / "jax-cache"
  off = _search(run, cache, "--no-compile-cache")
  assert off["rc"] == 0 and off["dir"] == "None" and off["requests"] == 0
  assert compile_cache.cache_entries(cache) == []


def test_where_the_cache_goes(tmp_path, monkeypatch):
  for name in (compile_cache.ENV_DIR, compile_cache.ENV_JAX, compile_cache.ENV_ROOT,
               "XDG_CACHE_HOME", compile_cache.ENV_SWITCH):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert compile_cache.default_cache_dir() == tmp_path / "home" / ".cache" / "cart-jax" / "jax"
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache.default_cache_dir() == tmp_path / "xdg" / "cart-jax" / "jax"
  monkeypatch.setenv(compile_cache.ENV_ROOT, str(tmp_path / "cart"))
  assert compile_cache.default_cache_dir() == tmp_path / "cart" / "jax"
  monkeypatch.setenv(compile_cache.ENV_JAX, str(tmp_path / "jax-own"))
  assert compile_cache.default_cache_dir() == tmp_path / "jax-own"
  monkeypatch.setenv(compile_cache.ENV_DIR, str(tmp_path / "mine"))
  assert compile_cache.default_cache_dir() == tmp_path / "mine"
  for off in ("0", "off", "False"):
    monkeypatch.setenv(compile_cache.ENV_SWITCH, off)
    assert compile_cache.is_disabled_by_env()
  monkeypatch.setenv(compile_cache.ENV_SWITCH, "1")
  assert not compile_cache.is_disabled_by_env()


def test_an_unwritable_cache_dir_falls_back_to_the_run(tmp_path, monkeypatch):
  """A subprocess: enabling changes this process's JAX configuration."""
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  script = (
      "import sys\n"
      "from cart_jax.core import compile_cache as c\n"
      f"print(c.enable_compilation_cache(cache_dir={str(blocker / 'jax')!r}, model_dir={str(model_dir)!r}))\n"
      f"print(c.enable_compilation_cache(cache_dir={str(blocker / 'jax')!r}))\n"
      f"print(c.enable_compilation_cache(cache_dir={str(blocker / 'jax')!r}, model_dir={str(tmp_path / 'typo')!r}))\n"
      "import jax; print(jax.config.jax_compilation_cache_dir)\n")
  env = {k: v for k, v in os.environ.items() if k != compile_cache.ENV_SWITCH}
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  fallback = str((model_dir / compile_cache.MODEL_DIR_SUBDIR).resolve())
  assert proc.stdout.split() == [fallback, "None", "None", fallback]
  assert not (tmp_path / "typo").exists()  # a missing MODEL_DIR is never created
  assert "compilation cache off: cannot write" in proc.stderr
