"""The machinery every PyTorch -> segjax weight converter shares, and the
variables <-> .npz file format.

A converter maps each segjax module path to the PyTorch module that holds its
weights; `convert_state_dict` then fills every variable (conv weights OIHW ->
HWIO, BatchNorm weight/bias/running stats -> scale/bias/batch_stats) and
refuses a state dict with missing, unknown or misshapen keys.
"""
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from segjax import paths
from segjax.registry import Registry

# Architecture name -> fn(state_dict) -> variables, for `python -m segjax.convert`.
CONVERTERS: Registry = Registry("convertible architecture")

# Floating dtypes of torch tensors, read as float32 (as `tensor.float()`).
_FLOATS = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float64))

# (collection, flax leaf) -> torch BatchNorm attribute.
_BN_LEAVES = {("params", "scale"): "weight", ("params", "bias"): "bias",
              ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def convert_state_dict(state_dict: Mapping[str, Any], model,
                       torch_module: Callable[[str], str], ignored: Callable[[str], bool],
                       what: str) -> Dict[str, Any]:
  """Fills `model`'s variables from `state_dict`; `torch_module` maps a flax module
  path to the torch module name. Missing, unknown or misshapen keys are errors."""
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0),
                                              "dropout": jax.random.key(0)},
                                             jnp.zeros((1, 32, 32, 3)), train=True))
  expected = traverse_util.flatten_dict(shapes)
  sources = {}
  for path in expected:
    collection, *modules, leaf = path
    attr = "weight" if leaf == "kernel" else _BN_LEAVES[(collection, leaf)]
    sources[path] = f"{torch_module('/'.join(modules))}.{attr}"

  missing = sorted(set(sources.values()) - set(state_dict))
  unknown = sorted(k for k in set(state_dict) - set(sources.values()) if not ignored(k))
  if missing or unknown:
    raise ValueError(f"State dict does not fit {what}: missing keys {missing or 'none'}; "
                     f"unknown keys {unknown or 'none'}.")
  flat, misshapen = {}, []
  for path, key in sources.items():
    value = np.asarray(state_dict[key], dtype=np.float32)
    if path[-1] == "kernel":
      value = value.transpose(2, 3, 1, 0)
    if value.shape != expected[path].shape:
      misshapen.append(f"{key} has shape {value.shape} (after OIHW -> HWIO); "
                       f"{'/'.join(path)} needs {expected[path].shape}")
    flat[path] = value
  if misshapen:
    raise ValueError(f"State dict does not fit {what}: " + "; ".join(sorted(misshapen)) + ".")
  return traverse_util.unflatten_dict(flat)


def save_variables(variables: Mapping[str, Any], path: str) -> None:
  """Writes nested variables as an .npz of '/'-joined paths."""
  flat = traverse_util.flatten_dict(dict(variables), sep="/")
  with open(path, "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})


def load_variables(path: str) -> Dict[str, Any]:
  """Reads an .npz written by `save_variables` (local or gs://) back into nested variables."""
  with np.load(io.BytesIO(paths.read_bytes(path)) if paths.is_url(path) else path) as data:
    return traverse_util.unflatten_dict({k: data[k] for k in data.files}, sep="/")


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads a flat name -> array dict from .npz, .safetensors or a torch checkpoint.

  A checkpoint that wraps its weights (mmcv's {'state_dict': ...}, {'model': ...})
  is unwrapped, and a 'module.' prefix on every key (saved from DataParallel) is
  removed, as mmcv's `load_checkpoint` does. Torch checkpoints are read with
  `torch.load` where PyTorch is installed, else by `torch_pickle.read_torch_checkpoint`.
  """
  return _strip_data_parallel(_read_state_dict(path))


def _strip_data_parallel(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Drops a 'module.' prefix that every key has."""
  if state and all(k.startswith("module.") for k in state):
    return {k[len("module."):]: v for k, v in state.items()}
  return state


_SIGNATURES = ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"),
               (b"GIF8", "a GIF image"), (b"%PDF", "a PDF document"),
               (b"\x1f\x8b", "a gzip file"), (b"PK", "a truncated or damaged zip archive"))


def _looks_like(path: str) -> str:
  """What the first bytes of `path` say it is, for error messages (called on files that
  are no readable zip archive, so a zip signature means a damaged one)."""
  with open(path, "rb") as f:
    head = f.read(512)
  if not head:
    return "an empty file"
  for signature, kind in _SIGNATURES:
    if head.startswith(signature):
      return kind
  try:
    head.decode("utf-8")
    return "a text file"
  except UnicodeDecodeError:
    return "an unknown binary file"


def _read_npz(path: str) -> Dict[str, np.ndarray]:
  """The arrays of an .npz; never unpickles (a pickled member is refused)."""
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path} is not a NumPy archive (.npz) but {_looks_like(path)}.")
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except ValueError as e:
    if "pickle" not in str(e):
      raise ValueError(f"{path} is not a readable NumPy archive ({e}).") from e
    raise ValueError(f"{path} holds pickled Python objects rather than plain arrays; "
                     "segjax reads only arrays from .npz files.") from e
  except (OSError, zipfile.BadZipFile, EOFError) as e:
    raise ValueError(f"{path} is not a readable NumPy archive (.npz): {e}.") from e


def _check_torch_file(path: str) -> None:
  """A torch.save file is a zip archive (PyTorch >= 1.6) or a pickle (protocol >= 2)."""
  if zipfile.is_zipfile(path):
    return
  with open(path, "rb") as f:
    if f.read(1) == b"\x80":
      return
  raise ValueError(f"{path} is not a PyTorch checkpoint but {_looks_like(path)}.")


def _read_state_dict(path: str) -> Dict[str, np.ndarray]:
  suffix = Path(path).suffix
  if suffix == ".npz":
    return _read_npz(path)
  if suffix == ".safetensors":
    try:
      from safetensors.numpy import load_file
    except ImportError as e:
      raise ImportError("Reading .safetensors needs the 'safetensors' package.") from e
    return load_file(path)
  _check_torch_file(path)
  try:
    import torch
  except ImportError:
    torch = None
  obj = None
  if torch is not None:
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # objects beyond tensors (e.g. a framework's metadata)
      torch = None  # read safely below; torch's advice to unpickle unsafely is not passed on
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
      raise ValueError(f"{path} is not a PyTorch checkpoint that can be read "
                       f"({type(e).__name__}); is it truncated or another kind of file?") from e
  if torch is None:  # read without PyTorch (segjax/convert/torch_pickle.py)
    from segjax.convert.torch_pickle import read_torch_checkpoint
    obj = read_torch_checkpoint(path)
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict.")
  for key in ("state_dict", "model"):
    if isinstance(obj.get(key), Mapping):
      obj = obj[key]
      break
  if torch is not None:
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in obj.items()}
  not_arrays = sorted(k for k, v in obj.items() if not isinstance(v, np.ndarray))
  if not_arrays:
    raise ValueError(f"{path} holds non-tensors at {not_arrays[:5]}; read it with PyTorch "
                     "installed, or save a plain state dict.")
  return {k: (v.astype(np.float32) if v.dtype in _FLOATS else v) for k, v in obj.items()}
