"""Logical axis rules, the sharding golden for `small`, and sharded == single-device loss on 8 fake CPUs."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from cart_jax import partitioning
from cart_jax.models.cart.config import get_config
from cart_jax.models.cart.network import CARTNetwork

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "goldens", "partition_specs_small.json")


def test_rules_map_logical_names_to_mesh_axes():
  assert partitioning.logical_to_mesh_axes(("embed", "mlp")) == P(None, "model")
  assert partitioning.logical_to_mesh_axes(("batch", "length", "embed")) == P("data", None, None)
  assert partitioning.logical_to_mesh_axes(("heads", "kv", "embed")) == P("model", None, None)
  # a mesh axis is used once per spec: the second "model" dimension is replicated
  assert partitioning.logical_to_mesh_axes(("vocab", "mlp")) == P("model", None)
  with pytest.raises(KeyError, match="no rule"):
    partitioning.logical_to_mesh_axes(("nonsense",))
  with pytest.raises(ValueError, match="twice"):
    partitioning.rules_dict((("a", None), ("a", "data")))


def test_partition_spec_replicates_undivisible_dims():
  mesh = AbstractMesh((4, 2), ("data", "model"))
  assert partitioning.partition_spec(("vocab", "embed"), (1314, 512), mesh) == P("model", None)
  assert partitioning.partition_spec(("vocab", "embed"), (1315, 512), mesh) == P(None, None)
  assert partitioning.partition_spec(("batch", "length"), (6, 3), mesh) == P(None, None)  # 6 % 4 != 0
  assert partitioning.partition_spec(("batch", "length"), (8, 3), mesh) == P("data", None)


def test_logical_constraint_is_noop_without_mesh():
  x = np.ones((4, 3), np.float32)
  assert partitioning.with_logical_constraint(x, ("batch", "embed")) is x


@pytest.mark.parametrize("preset", ["tiny", "small", "base", "minilm_small"])
@pytest.mark.parametrize("fusion", ["none", "both"])
def test_every_parameter_has_logical_axes(preset, fusion):
  cfg = get_config(preset, fusion=fusion)
  state = nnx.state(nnx.eval_shape(lambda: CARTNetwork(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  known = partitioning.rules_dict()
  flat = list(nnx.to_flat_state(state))
  assert flat
  for path, var in flat:
    axes = partitioning.variable_logical_axes(var)
    assert axes is not None, path
    assert len(axes) == len(var.get_value().shape), path
    assert all(a in known for a in axes), (path, axes)


def test_partition_spec_golden_small():
  spec = importlib.util.spec_from_file_location("regen", os.path.join(ROOT, "scripts", "regen_sharding_golden.py"))
  regen = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(regen)
  current = regen.build()
  with open(GOLDEN) as f:
    golden = json.load(f)
  changed = {k: (golden["params"].get(k), v) for k, v in current["params"].items() if golden["params"].get(k) != v}
  removed = sorted(set(golden["params"]) - set(current["params"]))
  assert not changed and not removed, (
      f"partition specs differ from {GOLDEN} (changed {dict(list(changed.items())[:5])}, removed {removed[:5]}); "
      "if intended, run scripts/regen_sharding_golden.py and review the diff")
  assert golden["rules"] == [list(r) for r in partitioning.LOGICAL_AXIS_RULES]
  assert regen.render(current) == open(GOLDEN).read()
  # the golden is not vacuous: tensor-parallel dims are on "model"
  g = golden["params"]
  assert g["decoder_layers/0/mlp/wi_0/kernel"]["spec"] == [None, "model"]
  assert g["encoder/layers/0/attention/query/kernel"]["spec"] == [None, "model", None]
  assert g["decoder_embedder/embedding"]["spec"] == ["model", None]


SHARDED_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from cart_jax.index.vocab import IdentifierVocab
    from cart_jax.models.cart.config import tiny, with_vocab
    from cart_jax.models.cart.losses import compute_loss
    from cart_jax.models.cart.network import create_model
    from cart_jax.partitioning import make_mesh

    assert jax.device_count() == 8, jax.devices()
    vocab = IdentifierVocab((6, 4, 4, 2))  # vocab_size 18: divisible by model = 2
    cfg = with_vocab(tiny(input_vocab_size=64, num_decoder_layers=1, dropout_rate=0.1), vocab)
    mesh = make_mesh(data=4, model=2)
    # born sharded: jitted init with out_shardings (a small module: XLA's RNG compile is slow on CPU)
    from cart_jax.models.cart.layers import GatedGeluMlp
    from cart_jax.partitioning import create_sharded
    mlp = create_sharded(lambda: GatedGeluMlp(16, 32, dropout_rate=0.0, rngs=nnx.Rngs(0)), mesh)
    born = mlp.wi_1.kernel.get_value()
    # the network: numpy init, then placed by the same rules
    model = create_model(cfg, seed=0, mesh=mesh, host_init=True)
    graphdef, state = nnx.split(model)
    wi = model.decoder_layers[0].mlp.wi_0.kernel.get_value()
    rs = np.random.RandomState(0)
    inputs = rs.randint(1, 64, (8, 6)).astype(np.int32); inputs[5, 3:] = 0
    codes = np.stack([rs.randint(0, s, 8) for s in vocab.level_sizes], -1)
    batch = {"inputs": inputs, "targets": vocab.codes_to_tokens(codes)}
    key = jax.random.key(0)  # threefry: the same bits whatever the sharding

    def loss_fn(state, batch, key):
      loss, aux = compute_loss(nnx.merge(graphdef, state), batch, omega=0.5, dropout_rng=key)
      return loss, aux["ce"], aux["kl"]

    with jax.set_mesh(mesh):
      sharded_batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
      sharded = jax.jit(loss_fn)(state, sharded_batch, key)
    one = jax.devices()[0]
    single_state = jax.device_put(state, one)
    single = jax.jit(loss_fn)(single_state, jax.device_put(batch, one), key)
    print("RESULT" + json.dumps({
        "sharded": [float(x) for x in sharded], "single": [float(x) for x in single],
        "wi_spec": [s for s in wi.sharding.spec], "wi_shard": list(wi.addressable_shards[0].data.shape),
        "wi_shape": list(wi.shape), "num_devices_state": len(wi.sharding.device_set),
        "born_spec": [s for s in born.sharding.spec], "born_shard": list(born.addressable_shards[0].data.shape),
    }))
""")


def test_sharded_loss_equals_single_device_loss():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  r = json.loads(line[len("RESULT"):])
  assert r["num_devices_state"] == 8
  assert r["born_spec"] == [None, "model"] and r["born_shard"] == [16, 16]
  assert r["wi_spec"] == [None, "model"] and r["wi_shard"] == [r["wi_shape"][0], r["wi_shape"][1] // 2]
  assert r["sharded"][2] > 1e-5  # KL: both dropout passes ran and differ
  np.testing.assert_allclose(r["sharded"], r["single"], atol=1e-5, rtol=0)
