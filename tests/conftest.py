"""Session-wide test settings."""
import atexit
import os
import shutil
import tempfile

# Encoder-state caches (cart_jax/train/state_cache.py) of the test runs go to a fresh directory,
# never into the user's ~/.cache, and are removed when the session ends (they can be hundreds of MiB).
if "CART_CACHE_DIR" not in os.environ:
  os.environ["CART_CACHE_DIR"] = _cache = tempfile.mkdtemp(prefix="cart-test-cache-")
  atexit.register(shutil.rmtree, _cache, True)
