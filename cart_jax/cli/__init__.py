"""The ``cart`` console script: ``main`` parses flags and calls one command module.

Each command in :mod:`cart_jax.cli.commands` parses its flags, makes one call into the library
(:mod:`cart_jax.api` and the packages under it) and prints the result.
"""
