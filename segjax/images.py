"""Image files to uint8 RGB, without clipping: what predict.py, eval.py's callers and the
classical CLI read.

PIL's `convert("RGB")` clips the pixels of 16-bit grayscale images (mode I;16 / I) to 255
and maps float images (mode F, e.g. TIFF) to 0 or 255. Here 16-bit images are scaled to
0..255 by their dtype's range (x * 255 / 65535) and float images in [0, 1] by 255; other
float ranges and 32-bit integer images are refused with a sentence, never clipped.
"""
import numpy as np
from PIL import Image

class UnsupportedImageError(ValueError):
  """An image whose pixel values cannot be mapped to 8 bits without guessing."""


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb8(image: Image.Image, path: str) -> np.ndarray:
  """uint8 [H, W, 3] of an open PIL image (`path` names it in UnsupportedImageError)."""
  mode = image.mode
  if mode not in _SIXTEEN_BIT + ("I", "F"):
    return np.asarray(image.convert("RGB"))
  values = np.asarray(image)
  if mode in _SIXTEEN_BIT or (mode == "I" and image.format == "PNG"):  # a PNG's I is 16-bit
    gray = values.astype(np.float64) * (255.0 / 65535.0)
  elif mode == "I":
    raise UnsupportedImageError(
        f"{path} has 32-bit integer pixels, which have no standard range to scale to 8 "
        "bits; convert it to an 8- or 16-bit image first.")
  else:
    values = values.astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not np.isfinite(values).all() or low < 0 or high > 1:
      raise UnsupportedImageError(
          f"{path} has floating-point pixels in [{low:g}, {high:g}], not in [0, 1]; scale "
          "it to [0, 1] or convert it to 8 bits first.")
    gray = values * 255.0
  gray = np.clip(np.round(gray), 0, 255).astype(np.uint8)
  return np.repeat(gray[..., None], 3, axis=-1)
