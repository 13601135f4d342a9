"""What every preprocessing op shares: the example keys, the op registry and
the `register_op` decorator, argument checks and spatial-size helpers."""
import functools
import inspect
from typing import Any, Callable, Dict, Tuple

import numpy as np

from segjax.registry import Registry

Example = Dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]

PREPROCESS_OPS: Registry = Registry("preprocessing op")

LABEL_KEYS = ("label", "instance_ids", "panoptic")
# Spatial key -> index of its H axis.
_SPATIAL_AXIS = {"image": 0, **{key: 0 for key in LABEL_KEYS}, "masks": 1}
INSTANCE_KEYS = ("boxes", "classes", "is_crowd", "masks", "box_masks", "instance_valid")
SEGMENT_KEYS = ("segment_ids", "segment_classes", "segment_is_thing", "segment_is_crowd",
                "segment_areas", "segment_valid")


class BoundOp:
  """An op built by a registered factory: `fn(example, rng) -> example` that
  remembers the factory's name and arguments, so a pipeline of such ops has a
  spec string and pickles by rebuilding each op from them (grain ships
  pipelines to worker processes; the closures inside ops do not pickle)."""

  def __init__(self, name: str, kwargs: Dict[str, Any], fn: Op):
    self.name = name
    self.kwargs = kwargs
    self._fn = fn

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    return self._fn(example, rng)

  @property
  def spec(self) -> str:
    """The op as pipeline-spec text, e.g. "pad(size=(512, 512))"."""
    if not self.kwargs:
      return self.name
    return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())})"

  def __reduce__(self):
    return _rebuild, (self.name, self.kwargs)

  def __repr__(self) -> str:
    return f"<op {self.spec}>"


def _rebuild(name: str, kwargs: Dict[str, Any]) -> BoundOp:
  return PREPROCESS_OPS.get(name)(**kwargs)


def register_op(name: str):
  """Registers an op factory under `name`; calling the factory (directly or
  from a spec) then returns a `BoundOp`. The factory keeps its signature, which
  the spec parser checks arguments against."""
  def decorator(factory: Callable[..., Op]) -> Callable[..., BoundOp]:
    signature = inspect.signature(factory)

    @functools.wraps(factory)
    def build(*args, **kwargs) -> BoundOp:
      arguments = dict(signature.bind(*args, **kwargs).arguments)
      return BoundOp(name, arguments, factory(*args, **kwargs))
    PREPROCESS_OPS.register(name)(build)
    return build
  return decorator


# Argument checks, run once when an op is built.


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_pair(value, op: str, arg: str) -> Tuple[int, int]:
  if (not isinstance(value, (tuple, list)) or len(value) != 2 or not all(
      isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
    raise ValueError(f"{op}: `{arg}` must be a pair of positive ints, got {value!r}.")
  return int(value[0]), int(value[1])


def _range(value, op: str, arg: str) -> Tuple[float, float]:
  if (not isinstance(value, (tuple, list)) or len(value) != 2 or
      not all(_is_number(v) for v in value) or not 0 <= value[0] <= value[1]):
    raise ValueError(
        f"{op}: `{arg}` must be a pair (low, high) with 0 <= low <= high, got {value!r}.")
  return float(value[0]), float(value[1])


def _check(ok: bool, op: str, arg: str, expected: str, value) -> None:
  if not ok:
    raise ValueError(f"{op}: `{arg}` must be {expected}, got {value!r}.")


def _check_int(value, op: str, arg: str, low: int = 0) -> None:
  _check(isinstance(value, int) and not isinstance(value, bool) and value >= low,
         op, arg, f"an int >= {low}", value)


# Geometry shared by the ops.


def _require(example: Example, key: str, op: str):
  if key not in example:
    raise KeyError(f"{op} needs `{key}` but the example only has keys {sorted(example)}.")
  return example[key]


def _map_index(key: str, rows, cols) -> tuple:
  """Index applying `rows`, `cols` to the spatial axes of the map `key`."""
  return (slice(None),) * _SPATIAL_AXIS[key] + (rows, cols)


def _sizes(example: Example) -> Dict[str, Tuple[int, int]]:
  """(H, W) of every spatial key present."""
  return {key: tuple(example[key].shape[axis:axis + 2])
          for key, axis in _SPATIAL_AXIS.items() if key in example}


def _spatial_size(example: Example) -> Tuple[int, int]:
  """(H, W) of the example, from `image` or else the first label map present."""
  sizes = _sizes(example)
  if not sizes:
    raise KeyError(f"example has no spatial key ({', '.join(_SPATIAL_AXIS)}); "
                   f"it has keys {sorted(example)}.")
  return next(iter(sizes.values()))


def _aligned_size(example: Example, op: str) -> Tuple[int, int]:
  """(H, W) shared by all spatial keys; a geometric op on maps of different
  sizes (left by `resize(resize_labels=False)`) would misalign them."""
  sizes = _sizes(example)
  size = _spatial_size(example)
  if any(s != size for s in sizes.values()):
    shown = ", ".join(f"{key} {h}x{w}" for key, (h, w) in sizes.items())
    raise ValueError(
        f"{op} needs all spatial keys at one size but got (HxW) {shown}; after "
        "resize(resize_labels=False) only pad(label_size=...) may follow.")
  return size

