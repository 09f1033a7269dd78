"""The model core imports with gin and TensorFlow made unimportable (they belong at the edge)."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import sys
    for name in ("gin", "tensorflow", "tensorflow_text", "seqio", "torch"):
      sys.modules[name] = None  # `import name` now raises ImportError
    import cart_jax.models.cart.config, cart_jax.models.cart.layers, cart_jax.models.cart.fusion
    import cart_jax.models.cart.network, cart_jax.models.cart.losses, cart_jax.models.text.minilm
    import cart_jax.models.text.tokenizer, cart_jax.models.cart.flops, cart_jax.partitioning
    from flax import nnx
    from cart_jax.models.cart.config import tiny
    from cart_jax.models.cart.network import CARTNetwork
    nnx.eval_shape(lambda: CARTNetwork(tiny(), rngs=nnx.Rngs(0)))  # builds without them too
    try:
      import gin
    except ImportError:
      pass
    else:
      raise SystemExit("gin should be blocked")
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("gin", "tensorflow", "seqio", "torch")
                   and sys.modules[m] is not None)
    print("OK", heavy)
""")


def test_core_imports_without_gin_and_tensorflow():
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == "OK []"
