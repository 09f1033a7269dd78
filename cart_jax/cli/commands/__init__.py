"""Subcommands of the ``cart`` console script, one module each (see ``cart_jax.cli.main``).

Command modules import heavy libraries (jax) inside ``run`` so ``cart --help`` is fast.
"""
