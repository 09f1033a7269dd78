"""Built-in data sets (emoji, instruments, emoji_motion, synthetic): each writes a corpus."""
from cart_jax.core.errors import CartError


class MissingDependencyError(CartError, RuntimeError):
  """A package or system tool a data set needs is not installed; the message says how to."""
