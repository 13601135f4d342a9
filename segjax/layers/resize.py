"""Bilinear resizing with PyTorch's `F.interpolate(mode="bilinear")` semantics.

Pretrained heads and the mmseg/torchvision recipes assume PyTorch's sampling
grid, and `jax.image.resize` differs from it when downsampling (it antialiases).
Here every output pixel reads the two nearest input pixels per axis, for up- and
downsampling alike. Sampling positions are computed with NumPy from the static
sizes, so the traced computation is two gathers and a weighted sum per axis.
"""
from typing import Sequence

import jax.numpy as jnp
import numpy as np


def _source_taps(in_size: int, out_size: int, align_corners: bool):
  """Per output index: the two input indices and the weight of the second."""
  # float32 arithmetic in PyTorch's order, so that positions round alike.
  f32 = np.float32
  dst = np.arange(out_size, dtype=f32)
  if align_corners:
    scale = f32(in_size - 1) / f32(out_size - 1) if out_size > 1 else f32(0)
    src = scale * dst
  else:
    # Pixel centres; PyTorch clamps positions left of the first centre to it.
    src = np.maximum(f32(in_size) / f32(out_size) * (dst + f32(0.5)) - f32(0.5), f32(0))
  lo = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi, src - lo.astype(f32)


def _resize_axis(x, axis: int, out_size: int, align_corners: bool):
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  if in_size == 1:  # Every tap reads the single input pixel.
    shape = list(x.shape)
    shape[axis] = out_size
    return jnp.broadcast_to(x, shape)
  lo, hi, frac = _source_taps(in_size, out_size, align_corners)
  frac = frac.reshape((-1,) + (1,) * (x.ndim - axis - 1))
  take = lambda idx: jnp.take(x, idx, axis=axis, mode="clip")
  return take(lo) * (1 - frac) + take(hi) * frac


def resize_bilinear(x, size: Sequence[int], align_corners: bool):
  """Resizes NHWC `x` to spatial `size` (height, width) like PyTorch's bilinear
  `F.interpolate` (no antialiasing). Weights are applied in float32; the result
  has `x`'s dtype."""
  if x.ndim != 4:
    raise ValueError(f"resize_bilinear expects NHWC input, got shape {x.shape}.")
  out_h, out_w = (int(s) for s in size)
  y = _resize_axis(x, 1, out_h, align_corners)
  y = _resize_axis(y, 2, out_w, align_corners)
  return y.astype(x.dtype)
