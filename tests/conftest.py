"""Session-wide test settings."""
import os
import tempfile

# Encoder-state caches (cart_jax/train/state_cache.py) of the test runs go to a fresh directory,
# never into the user's ~/.cache.
os.environ.setdefault("CART_CACHE_DIR", tempfile.mkdtemp(prefix="cart-test-cache-"))
