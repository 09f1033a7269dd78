"""Not Python code: this file makes gin's package reader resolve includes of gin_configs/
(see cart_jax/cli/gin_bridge.py)."""
