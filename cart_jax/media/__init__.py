"""Media readers: host-side code that turns image, audio and video files into the fixed-shape
numpy arrays the item towers take (``image.load_images``, ``audio.load_audio``,
``video.load_video``). They use numpy, Pillow, soundfile/scipy and PyAV (each imported when a file
is read) and never flax or ``cart_jax.models``: a reader is configured by the tower config object
it is given (any object with the fields it names) or by plain ints.
``cart_jax.models.towers.registry.load_media`` picks the reader for a corpus's modality.
"""
from cart_jax.core.errors import CartError


class MediaError(CartError):
  """A media file (image, audio, video) is missing, unreadable or empty; the message names it."""
