"""cart-jax: CART generative cross-modal retrieval in JAX/Flax.

Importing this package imports nothing heavy; the rooms are ``cart_jax.index``
(identifiers, trie), ``cart_jax.models.cart`` (network), ``cart_jax.inference.decoding``,
``cart_jax.data`` and ``cart_jax.cli.commands`` (the ``cart`` console script).
"""
__version__ = "0.1.0"
