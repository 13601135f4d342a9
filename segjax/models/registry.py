"""The model registry and the config -> module constructor."""
from typing import Any, Mapping

import flax.linen as nn

from segjax.layers import resolve_dtype
from segjax.registry import Registry

MODELS: Registry = Registry("model")


def build_model(name: str, num_classes: int, kwargs: Mapping[str, Any],
                dtype: str = "float32", param_dtype: str = "float32") -> nn.Module:
  """Instantiates registered model `name` with config keyword arguments."""
  cls = MODELS.get(name)
  known = set(cls.__dataclass_fields__) - {"parent", "name", "num_classes", "dtype",
                                           "param_dtype"}
  unknown = sorted(set(kwargs) - known)
  if unknown:
    raise ValueError(f"Model {name!r} has no option(s) {unknown}; its options are "
                     f"{sorted(known)}.")
  return cls(num_classes=num_classes, dtype=resolve_dtype(dtype),
             param_dtype=resolve_dtype(param_dtype), **dict(kwargs))


def check_images(images, model: str, multiple_of: int = 1) -> None:
  """Rejects inputs that are not a float NHWC batch of RGB images whose height
  and width are multiples of the model's total stride."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"Expected a batch of RGB images shaped (batch, height, width, 3), "
                     f"got shape {tuple(images.shape)}.")
  if images.dtype.kind != "f":
    raise ValueError(f"Expected normalized floating-point images, got dtype {images.dtype}; "
                     "normalize uint8 images first with segjax.data.device.normalize (as the "
                     "train, eval and predict steps do).")
  if images.shape[1] % multiple_of or images.shape[2] % multiple_of:
    raise ValueError(f"{model} needs height and width divisible by {multiple_of}, got "
                     f"{images.shape[1]}x{images.shape[2]}; pad or crop the images.")
