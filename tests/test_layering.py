"""The import rule of docs/architecture.md: every import in cart_jax/ runs down the layers, and no
modules import each other in a circle.

  core < index, media, partitioning < models < data < runs < train | inference < jobs < serve < api
       < cli

Every ``import`` / ``from ... import`` statement counts, at module level or inside a function
(also under ``if TYPE_CHECKING:``): a function-local import is an import all the same. Read with
``ast``; nothing is imported.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cart_jax"

# Low to high. A module may import its own package (the first name under cart_jax/) and any layer
# below its own; never a layer above, never another package of its own layer.
LAYERS = (
    ("core",),
    ("index", "media", "partitioning"),
    ("models",),
    ("data",),
    ("runs",),
    ("train", "inference"),
    ("jobs",),
    ("serve",),
    ("api",),
    ("cli",),  # the edge: the console script, gin (cli/gin_bridge.py) and the demo's recipes
)
SAME_ROOM: set[tuple[str, str]] = set()
# Imports against the order that are tolerated (none).
ALLOWED: set[tuple[str, str]] = set()
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
  """The module of ours ``name`` (a module, or a name inside one) stands for."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def imports_of(module: str) -> list[tuple[str, int]]:
  """``(imported module of ours, line)`` for every import statement of ``module``, at any depth."""
  path = MODULES[module]
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  found = []
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")[:len(package.split(".")) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
      else:
        source = node.module or ""
      # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod.
      names = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
    else:
      continue
    for name in names:
      if name == "cart_jax" or name.startswith("cart_jax."):
        target = _resolve(name)
        if target is not None and target != module:
          found.append((target, node.lineno))
  return found


def _room(module: str) -> str:
  """The first name under cart_jax/ (``cart_jax.train.trainer`` -> ``train``); ``""`` for the
  package itself (its ``__init__`` holds the version and imports nothing)."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
  rooms = {_room(m) for m in MODULES} - {""}
  assert not rooms - set(LAYER_OF), f"add to LAYERS (and docs/architecture.md): {rooms - set(LAYER_OF)}"


def test_the_package_root_imports_nothing_of_ours():
  assert GRAPH["cart_jax"] == []


def test_imports_run_down_the_layers():
  bad = []
  for module, targets in GRAPH.items():
    room = _room(module)
    for target, line in targets:
      other = _room(target)
      if not room or not other or other == room or (module, target) in ALLOWED:
        continue
      if (room, other) in SAME_ROOM:
        continue
      if LAYER_OF[other] >= LAYER_OF[room]:
        bad.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} imports {target} "
                   f"({other} is {'above' if LAYER_OF[other] > LAYER_OF[room] else 'beside'} {room})")
  assert not bad, "imports against the layering (docs/architecture.md):\n" + "\n".join(bad)


def test_no_import_circles():
  edges = {m: sorted({t for t, _ in ts if (m, t) not in ALLOWED}) for m, ts in GRAPH.items()}
  index, low, stack, on_stack, circles = {}, {}, [], set(), []
  counter = [0]

  def visit(v):  # Tarjan's strongly connected components
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in edges[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        circles.append(sorted(comp))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  assert not circles, "modules that import each other in a circle:\n" + "\n".join(map(str, circles))


def test_the_checker_sees_function_level_imports():
  # runs/restore.py imports the checkpoints only inside restore_for_inference: counted all the same.
  assert any(t == "cart_jax.core.checkpointing" for t, _ in GRAPH["cart_jax.runs.restore"])
