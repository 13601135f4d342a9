"""SAM's input and output transforms, as segment_anything does them:

- `ResizeLongestSide` (utils/transforms.py): the image is resized (PIL bilinear on
  uint8) so that its longest side is `image_size`, the other side rounded half up;
  point and box coordinates are scaled by the same per-axis factors.
- `Sam.preprocess`: (pixel - mean) / std in float32, zero-padded bottom-right to
  image_size x image_size.
- `Sam.postprocess_masks`: low-resolution logits upscaled bilinearly to image_size,
  cropped to the resized image, resized bilinearly to the original size (PyTorch's
  `F.interpolate`, align_corners=False, no antialiasing).
"""
from typing import Sequence, Tuple

import jax.numpy as jnp
import numpy as np
from PIL import Image

from segjax.layers.resize import resize_bilinear

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def preprocess_shape(height: int, width: int, long_side: int) -> Tuple[int, int]:
  """(new_height, new_width) with the longest side `long_side` (rounded half up)."""
  scale = long_side * 1.0 / max(height, width)
  return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_longest_side(image: np.ndarray, long_side: int = 1024) -> np.ndarray:
  """A uint8 [H, W, 3] image resized (PIL bilinear) so that its longest side is
  `long_side`."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"SAM's resize expects a uint8 RGB image [height, width, 3], got "
                     f"{image.dtype} of shape {image.shape}.")
  h, w = preprocess_shape(image.shape[0], image.shape[1], long_side)
  return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def apply_coords(coords, original_size: Sequence[int], long_side: int = 1024) -> np.ndarray:
  """[..., 2] (x, y) pixel coordinates of the original image -> the resized image's."""
  old_h, old_w = original_size
  new_h, new_w = preprocess_shape(old_h, old_w, long_side)
  coords = np.array(coords, dtype=float)
  coords[..., 0] = coords[..., 0] * (new_w / old_w)
  coords[..., 1] = coords[..., 1] * (new_h / old_h)
  return coords


def apply_boxes(boxes, original_size: Sequence[int], long_side: int = 1024) -> np.ndarray:
  """[..., 4] (x0, y0, x1, y1) boxes of the original image -> the resized image's."""
  boxes = np.asarray(boxes)
  return apply_coords(boxes.reshape(boxes.shape[:-1] + (2, 2)), original_size,
                      long_side).reshape(boxes.shape)


def normalize_and_pad(image, image_size: int = 1024, pixel_mean=PIXEL_MEAN,
                      pixel_std=PIXEL_STD) -> np.ndarray:
  """A resized [h, w, 3] image -> float32 [image_size, image_size, 3], normalized and
  zero-padded bottom-right."""
  image = np.asarray(image)
  h, w = image.shape[:2]
  if h > image_size or w > image_size:
    raise ValueError(f"An image of {h}x{w} does not fit SAM's {image_size}x{image_size} "
                     "input; resize its longest side first (resize_longest_side).")
  x = (image.astype(np.float32) - np.asarray(pixel_mean, np.float32)) / np.asarray(
      pixel_std, np.float32)
  return np.pad(x, ((0, image_size - h), (0, image_size - w), (0, 0)))


def preprocess(image: np.ndarray, image_size: int = 1024) -> Tuple[np.ndarray, Tuple[int, int]]:
  """uint8 [H, W, 3] -> (the model's float32 [image_size, image_size, 3] input, the
  resized (h, w) before padding, which `postprocess_masks` crops to)."""
  resized = resize_longest_side(image, image_size)
  return normalize_and_pad(resized, image_size), resized.shape[:2]


def postprocess_masks(masks, input_size: Sequence[int], original_size: Sequence[int],
                      image_size: int = 1024):
  """[..., h, w] low-resolution mask logits -> [..., H, W] at the original size:
  upscaled to image_size, cropped to `input_size` (the resized image), resized to
  `original_size`, bilinearly as PyTorch's F.interpolate (align_corners=False).
  Rows and columns the crop drops are never computed."""
  masks = jnp.asarray(masks, jnp.float32)
  lead, (h, w) = masks.shape[:-2], masks.shape[-2:]
  x = jnp.moveaxis(masks.reshape((-1, h, w)), 0, -1)[None]  # [1, h, w, n]
  x = _upscale_cropped(x, 1, image_size, int(input_size[0]))
  x = _upscale_cropped(x, 2, image_size, int(input_size[1]))
  x = resize_bilinear(x, (int(original_size[0]), int(original_size[1])), align_corners=False)
  return jnp.moveaxis(x[0], -1, 0).reshape(lead + x.shape[1:3])


def _upscale_cropped(x, axis: int, out_size: int, keep: int):
  """The first `keep` rows (along `axis`) of x resized bilinearly to `out_size`."""
  from segjax.layers.resize import _source_taps
  lo, hi, frac = _source_taps(x.shape[axis], out_size, align_corners=False)
  lo, hi, frac = lo[:keep], hi[:keep], frac[:keep]
  frac = frac.reshape((-1,) + (1,) * (x.ndim - axis - 1))
  take = lambda idx: jnp.take(x, idx, axis=axis)
  return take(lo) * (1 - frac) + take(hi) * frac
