"""Mesh, logical axis rules and shardings: the one place that maps names to devices.

Every parameter of the network carries a tuple of *logical* axis names in its
``nnx.Param`` metadata (key ``logical_axes``, e.g. ``("embed", "mlp")``), and key
activations are constrained with :func:`with_logical_constraint`. One rules table,
:data:`LOGICAL_AXIS_RULES`, maps each logical name to a mesh axis (``data``,
``model``) or to ``None`` (replicated). Nothing else in the code base names mesh
axes.

Creating state already sharded::

  mesh = make_mesh(data=-1, model=1)
  model = create_sharded(lambda: CARTNetwork(cfg, rngs=nnx.Rngs(0)), mesh)

``create_sharded`` traces the constructor with ``nnx.eval_shape`` (no memory),
derives a ``NamedSharding`` per variable, then runs the constructor under
``jax.jit(..., out_shardings=...)`` so every array is born on its shards.

A dimension whose size is not divisible by its mesh axis is replicated instead
(e.g. an identifier vocabulary of 1314 rows on ``model = 4``); the golden file
records the rules' intent, :func:`partition_spec` the shape-checked result.

No gin, no TensorFlow.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from cart_jax.core.errors import CartError

DATA = "data"
MODEL = "model"

# logical axis name -> mesh axis (or None = replicated). Megatron-style tensor
# parallelism on ``model`` (heads, MLP width, vocabularies), data parallelism on ``data``.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", DATA),          # examples / queries
    ("beam", None),           # beams of one query stay on the query's device
    ("length", None),         # sequence positions (input or identifier)
    ("embed", None),          # d_model (residual stream), replicated
    ("heads", MODEL),         # attention heads
    ("kv", None),             # per-head width
    ("mlp", MODEL),           # gated-GELU hidden width
    ("vocab", MODEL),         # input and identifier vocabularies
    ("layers", None),         # encoder layers stacked for fine fusion
    ("fused_embed", None),    # concatenated encoder layers [E_1; ...; E_S] (S * width)
    ("relpos_buckets", None), # relative position buckets
    ("positions", None),      # MiniLM absolute positions
    ("token_types", None),    # MiniLM token types
    ("encoder_embed", None),  # width of a pretrained encoder (MiniLM: 384)
)


def rules_dict(rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES) -> dict[str, str | None]:
  names = [r[0] for r in rules]
  if len(set(names)) != len(names):
    raise ValueError(f"logical axis rules name an axis twice: {names}")
  return dict(rules)


def logical_to_mesh_axes(logical_axes: Sequence[str | None],
                         rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES) -> PartitionSpec:
  """Logical names -> ``PartitionSpec`` by the rules table (no shape check).

  A mesh axis is used at most once per spec: a later dimension asking for an axis
  already taken is replicated.
  """
  table = rules_dict(rules)
  used: set[str] = set()
  out: list[str | None] = []
  for name in logical_axes:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
    axis = table[name]
    if axis is not None and axis in used:
      axis = None
    if axis is not None:
      used.add(axis)
    out.append(axis)
  return PartitionSpec(*out)


def partition_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                   mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
                   rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES) -> PartitionSpec:
  """Like :func:`logical_to_mesh_axes`, replicating dimensions the mesh axis does not divide."""
  spec = logical_to_mesh_axes(logical_axes, rules)
  if shape is None or mesh is None:
    return spec
  if len(shape) != len(spec):
    raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
  sizes = dict(mesh.shape)  # axis name -> size (Mesh and AbstractMesh alike)
  out = []
  for dim, axis in zip(shape, spec):
    if axis is not None and dim % sizes.get(axis, 1) != 0:
      axis = None
    out.append(axis)
  return PartitionSpec(*out)


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """A 2-D ``(data, model)`` mesh over all (or the given) devices; ``-1`` = the rest."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if model < 1 or n % model != 0:
    raise CartError(f"model={model} must be >= 1 and divide the {n} devices")
  if data == -1:
    data = n // model
  if data * model != n:
    raise CartError(f"mesh data={data} x model={model} needs {data * model} devices, have {n}")
  return jax.make_mesh((data, model), (DATA, MODEL),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names under the ambient mesh (``jax.set_mesh``); no-op without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = partition_spec(logical_axes, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, spec)


def variable_logical_axes(variable: Any) -> tuple | None:
  """The ``logical_axes`` metadata of an ``nnx.Variable`` (None when it has none)."""
  meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
  axes = meta.get("logical_axes")
  return None if axes is None else tuple(axes)


def state_partition_specs(state: Any, mesh: jax.sharding.Mesh | None = None) -> Any:
  """``nnx.State`` -> same tree of ``PartitionSpec`` (replicated where no logical axes)."""
  from flax import nnx

  def spec(v):
    axes = variable_logical_axes(v)
    shape = np.shape(v.get_value()) if hasattr(v, "get_value") else np.shape(v)
    if axes is None:
      return PartitionSpec()
    if len(axes) != len(shape):
      raise ValueError(f"variable with logical axes {axes} has shape {shape}")
    return partition_spec(axes, shape, mesh)

  return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: Any, mesh: jax.sharding.Mesh) -> Any:
  """``nnx.State`` -> same tree of ``NamedSharding`` on ``mesh``."""
  specs = state_partition_specs(state, mesh)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def create_sharded(constructor: Callable[[], Any], mesh: jax.sharding.Mesh) -> Any:
  """Builds an NNX module whose arrays are created directly with their shardings."""
  from flax import nnx

  abstract = nnx.eval_shape(constructor)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh)

  init = jax.jit(lambda: nnx.split(constructor())[1], out_shardings=shardings)
  with jax.set_mesh(mesh):
    state = init()
  return nnx.merge(graphdef, state)


def shard_state(state: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places an existing (host or single-device) state on ``mesh`` by the rules."""
  return jax.device_put(state, state_shardings(state, mesh))


def param_logical_axes_table(state: Any) -> dict[str, dict]:
  """``{"path/to/param": {"shape": [...], "logical": [...], "spec": [...]}}`` for goldens."""
  from flax import nnx

  out = {}
  for path, v in nnx.to_flat_state(state):
    if not isinstance(v, nnx.Param):
      continue
    axes = variable_logical_axes(v)
    key = "/".join(str(p) for p in path)
    spec = logical_to_mesh_axes(axes) if axes is not None else None
    out[key] = {
        "shape": [int(d) for d in v.get_value().shape],
        "logical": None if axes is None else list(axes),
        "spec": None if spec is None else [s for s in spec],
    }
  return out


# --------------------------------------------------------------------------- processes
#
# Multi-host (``jax.distributed``): every process runs the same program; arrays on a mesh that
# spans several processes are *global* (each process holds only its addressable shards). The
# helpers below are the only ways host data enters and leaves such arrays, and the only barrier.
# With one process they reduce to ``device_put`` / ``np.asarray`` and no-ops.


def is_primary() -> bool:
  """Whether this is process 0: the one that writes shared artefacts (MODEL_DIR, summaries)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """A barrier across all processes (no-op with one); ``name`` must be the same on all."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def agree(ok: bool, what: str) -> None:
  """Raises on every process when any process's ``ok`` is False (with one process: when ``ok`` is).

  Work done by one process (process 0 writing MODEL_DIR) can fail there only; the others would
  then wait for it at the next collective for ever. Each process says whether its part worked
  and all raise together. ``what``: the part, for the message of the processes that did not fail.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = np.asarray(multihost_utils.process_allgather(np.asarray(bool(ok), np.int32)))  # [processes]
  failed = [int(i) for i in np.flatnonzero(flags == 0)]
  if failed and ok:
    raise CartError(f"{what} failed on process(es) {failed} (this is process "
                    f"{jax.process_index()}); see that process's error")


def host_to_global(x: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """A host array that every process holds whole -> an array with ``sharding``.

  Each process places only its addressable shards (``make_array_from_callback``), so this is
  right on one process and on many, for a replicated or a sharded ``sharding``.
  """
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def process_local_to_global(local: np.ndarray, sharding: jax.sharding.Sharding,
                            global_shape: Sequence[int]) -> jax.Array:
  """This process's rows of a batch sharded over its leading axis -> the global array.

  ``local`` holds the rows of this process's devices (``process_slice``); with one process it
  is the whole batch.
  """
  if jax.process_count() == 1:
    return jax.device_put(np.asarray(local), sharding)
  return jax.make_array_from_process_local_data(sharding, np.asarray(local), tuple(global_shape))


def process_slice(global_batch: int, sharding: jax.sharding.Sharding) -> slice:
  """The rows ``[start, stop)`` of a batch sharded over its leading axis that this process holds.

  Read from the sharding (``addressable_devices_indices_map``), not assumed from the process
  index, so any device order of the mesh is right. The rows must be contiguous (they are for a
  mesh built by :func:`make_mesh`).
  """
  if jax.process_count() == 1:
    return slice(0, global_batch)
  idx = sharding.addressable_devices_indices_map((global_batch,))
  starts = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop)
                   for s in idx.values()})
  lo, hi = starts[0][0], starts[-1][1]
  covered = sum(b - a for a, b in starts)
  if covered != hi - lo:
    raise CartError(f"this process's rows of a batch of {global_batch} are not contiguous "
                    f"({starts}): build the mesh with partitioning.make_mesh")
  return slice(lo, hi)


def global_to_host(tree: Any) -> Any:
  """Arrays (global or local) -> numpy with the full value, on every process.

  ``np.asarray`` cannot fetch an array that spans devices of other processes; those are
  gathered with ``multihost_utils.process_allgather(tiled=True)`` (a collective: every process
  must call this in the same order).
  """
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(fetch, tree)


def local_copy(tree: Any) -> Any:
  """Replicated global arrays -> the same values on this process's first device only.

  For work one process does alone (a per-host cache); sharded arrays are gathered first.
  """
  device = jax.local_devices()[0]

  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return x
    if x.is_fully_replicated:
      return jax.device_put(x.addressable_data(0), device)
    return jax.device_put(global_to_host(x), device)
  return jax.tree.map(one, tree)


def maybe_initialize_distributed() -> bool:
  """``jax.distributed.initialize()`` when the environment says this is a multi-host launch.

  Detected from ``JAX_COORDINATOR_ADDRESS`` (launch/multi_gpu.sh), SLURM with several tasks, or
  a TPU VM pod slice (``TPU_WORKER_HOSTNAMES`` with several hosts). ``CART_DISTRIBUTED=0``
  disables it, ``CART_DISTRIBUTED=1`` forces it. Idempotent (``cart train``, ``cart eval`` and the
  library calls may each ask); returns whether this process is part of a distributed run.
  ``CART_DISTRIBUTED_TIMEOUT``: seconds to wait for the other processes at start-up (300).
  Must run before any JAX computation.
  """
  env = os.environ
  if jax.distributed.is_initialized():
    return True
  if env.get("CART_DISTRIBUTED") == "0":
    return False
  multi = bool(env.get("JAX_COORDINATOR_ADDRESS")) or int(env.get("SLURM_NTASKS", "1") or 1) > 1 \
      or "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("CART_DISTRIBUTED") == "1"
  if not multi:
    return False
  timeout = int(env.get("CART_DISTRIBUTED_TIMEOUT", "300"))
  if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(env["JAX_NUM_PROCESSES"]),
                               process_id=int(env.get("JAX_PROCESS_ID", "0")),
                               initialization_timeout=timeout)
  else:
    jax.distributed.initialize(initialization_timeout=timeout)  # TPU pod slices, SLURM: detected
  return True
