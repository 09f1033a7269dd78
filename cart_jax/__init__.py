"""cart-jax: CART generative cross-modal retrieval in JAX/Flax.

Importing this package imports nothing heavy; the rooms are ``cart_jax.index``
(identifiers, trie), ``cart_jax.model`` (network), ``cart_jax.decoding``,
``cart_jax.data`` and ``cart_jax.commands`` (the ``cart`` console script).
"""
__version__ = "0.1.0"
