"""Reads the tensors of a `torch.save` checkpoint without PyTorch, as numpy arrays.

So that pretrained weights (`resolve_init_from`) convert where only JAX is installed.
Both formats `torch.save` writes are read:

  * zip (the default since PyTorch 1.6): `<name>/data.pkl` is a pickle whose tensors
    refer by key to raw little-endian storages in `<name>/data/<key>`;
  * legacy (`_use_new_zipfile_serialization=False`, and files from before 1.6): four
    pickles in a row (magic number, protocol version, system info, the object), a
    pickled list of storage keys, then each storage as an int64 element count and
    its raw bytes, in that order.

A tensor is pickled as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
...)` (elements, not bytes); a parameter wraps one in `_rebuild_parameter`. Nothing in
the file is executed: any other global (e.g. metadata objects of a training framework)
unpickles to an inert `Opaque` placeholder, and only tensors, dicts, lists, tuples and
plain values come out usable.
"""
import collections
import io
import pickle
import zipfile
from typing import Any, BinaryIO, Dict, Tuple

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class Opaque:
  """Stands in for any object of a global this reader does not know."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state


class _StorageType:
  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


class _Tensor:
  """A tensor whose storage may not be read yet (legacy files store them last)."""

  def __init__(self, storage_key, offset, size, stride):
    self.storage_key, self.offset, self.size, self.stride = storage_key, offset, size, stride


def _rebuild_tensor(storage, offset, size, stride, *args):
  del args  # requires_grad, backward hooks, metadata
  return _Tensor(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *args):
  del args
  return data


class _Unpickler(pickle.Unpickler):
  """Resolves torch's globals to the stand-ins above; records each storage's dtype."""

  def __init__(self, file: BinaryIO, storages: Dict[str, Tuple[np.dtype, int]]):
    super().__init__(file)
    self.storages = storages  # key -> (dtype, element count)

  def find_class(self, module: str, name: str):
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    return type(name, (Opaque,), {"__module__": module})

  def persistent_load(self, pid):
    # zip: ('storage', type, key, location, numel); legacy: (..., numel, view_metadata).
    if not (isinstance(pid, tuple) and pid[0] == "storage" and len(pid) in (5, 6)):
      raise ValueError(f"Unknown persistent object {pid!r} in a torch checkpoint.")
    storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
    if not isinstance(storage_type, _StorageType):
      raise ValueError(f"Unsupported tensor storage {pid[1]!r}.")
    if len(pid) == 6 and pid[5] is not None:
      raise ValueError("Storage views of very old torch checkpoints are not supported.")
    self.storages[key] = (storage_type.dtype, numel)
    return key


def read_torch_checkpoint(path: str) -> Any:
  """The object `torch.save` wrote to `path`, with every tensor as a numpy array.

  Raises ValueError for a file that is neither format (e.g. TorchScript archives,
  or the tar files of PyTorch before 0.4) or uses tensors beyond dense storages.
  """
  with open(path, "rb") as f:
    if zipfile.is_zipfile(f):
      f.seek(0)
      with zipfile.ZipFile(f) as archive:
        return _read_zip(archive, path)
    f.seek(0)
    return _read_legacy(f, path)


def _read_zip(archive: zipfile.ZipFile, path: str) -> Any:
  pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(pickles) != 1:
    raise ValueError(f"{path} is a zip file but no torch.save checkpoint (no <name>/data.pkl).")
  prefix = pickles[0][:-len("data.pkl")]
  if prefix + "byteorder" in archive.namelist():
    if archive.read(prefix + "byteorder").strip() != b"little":
      raise ValueError(f"{path} stores big-endian tensors, which this reader does not read.")
  storages: Dict[str, Tuple[np.dtype, int]] = {}
  obj = _Unpickler(io.BytesIO(archive.read(pickles[0])), storages).load()
  data = {key: np.frombuffer(archive.read(f"{prefix}data/{key}"), dtype)[:numel]
          for key, (dtype, numel) in storages.items()}
  return _materialize(obj, data)


def _read_legacy(f: BinaryIO, path: str) -> Any:
  try:
    magic = pickle.load(f)
    protocol = pickle.load(f)
    pickle.load(f)  # system info
  except Exception as e:  # any unpickling failure means this is no legacy checkpoint
    raise ValueError(f"{path} is not a torch.save checkpoint this reader knows "
                     "(install PyTorch to read it).") from e
  if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
    raise ValueError(f"{path} is not a torch.save checkpoint (magic number {magic!r}).")
  storages: Dict[str, Tuple[np.dtype, int]] = {}
  obj = _Unpickler(f, storages).load()
  data = {}
  for key in pickle.load(f):
    dtype, numel = storages[str(key)]
    count = int(np.frombuffer(f.read(8), "<i8")[0])
    if count != numel:
      raise ValueError(f"{path}: storage {key} holds {count} elements, its tensors {numel}.")
    raw = f.read(count * dtype.itemsize)
    if len(raw) != count * dtype.itemsize:
      raise ValueError(f"{path} is truncated (storage {key}).")
    data[str(key)] = np.frombuffer(raw, dtype)
  return _materialize(obj, data)


def _materialize(obj: Any, storages: Dict[str, np.ndarray]) -> Any:
  """Replaces every `_Tensor` in nested dicts, lists and tuples by its array (a copy)."""
  if isinstance(obj, _Tensor):
    flat = storages[obj.storage_key]
    if 0 in obj.size:
      return np.zeros(obj.size, flat.dtype)
    last = obj.offset + sum((n - 1) * s for n, s in zip(obj.size, obj.stride))
    if obj.offset < 0 or min(obj.stride, default=0) < 0 or last >= flat.size:
      raise ValueError(f"A tensor of shape {obj.size} runs past its storage.")
    view = np.lib.stride_tricks.as_strided(
        flat[obj.offset:], obj.size, tuple(s * flat.dtype.itemsize for s in obj.stride))
    return np.array(view)
  if isinstance(obj, dict):
    return type(obj)((k, _materialize(v, storages)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v, storages) for v in obj)
  return obj
