"""Pooling ops with PyTorch semantics that flax does not provide (NHWC).

- `max_pool_with_indices` / `max_unpool`: SegNet's decoder puts each value back
  where its encoder max came from; indices are flat `h * W + w` positions within
  each (batch, channel) plane, as `F.max_pool2d(..., return_indices=True)` and
  `F.max_unpool2d` use them.
- `adaptive_avg_pool`: `nn.AdaptiveAvgPool2d` bins (possibly overlapping, and
  defined for inputs smaller than the number of bins), used by PSPNet's PPM.
"""
from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np


def max_pool_with_indices(x, window: int = 2, stride: int = 2):
  """Max pool without padding (output size floored, as PyTorch) that also
  returns the flat input position of each max (int32). Ties go to the first
  position in row-major order within the window. Gradients reach only those
  positions."""
  _, h, w, _ = x.shape
  out_h, out_w = (h - window) // stride + 1, (w - window) // stride + 1
  if out_h < 1 or out_w < 1:
    raise ValueError(f"max_pool_with_indices: {h}x{w} input is smaller than window {window}.")
  # The window's taps, row-major, stacked on a new axis 3.
  taps = jnp.stack(
      [x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
       for i in range(window) for j in range(window)], axis=3)
  best = jnp.argmax(taps, axis=3)
  pooled = jnp.take_along_axis(taps, best[:, :, :, None], axis=3)[:, :, :, 0]
  rows = (stride * np.arange(out_h))[:, None, None] + best // window
  cols = (stride * np.arange(out_w))[None, :, None] + best % window
  return pooled, (rows * w + cols).astype(jnp.int32)


def max_unpool(x, indices, output_hw: Sequence[int]):
  """Scatters NHWC `x` to flat positions `indices` of an (output_hw) map per
  (batch, channel), zeros elsewhere (`F.max_unpool2d`). For distinct indices
  (pooling with window <= stride) the gradient with respect to `x` is the output
  gradient gathered at `indices`; where indices repeat, one value is written."""
  if x.shape != indices.shape:
    raise ValueError(f"max_unpool: values {x.shape} and indices {indices.shape} differ in shape.")
  n, h, w, c = x.shape
  out_h, out_w = output_hw
  batch = np.arange(n)[:, None, None]
  channel = np.arange(c)[None, None, :]
  out = jnp.zeros((n, out_h * out_w, c), x.dtype)
  out = out.at[batch, indices.reshape(n, h * w, c), channel].set(x.reshape(n, h * w, c))
  return out.reshape(n, out_h, out_w, c)


def _bin_matrix(size: int, bins: int) -> np.ndarray:
  """(bins, size) 0/1 matrix: bin i covers [floor(i*size/bins), ceil((i+1)*size/bins))."""
  i = np.arange(bins)
  start = (i * size) // bins
  end = -((-(i + 1) * size) // bins)
  pos = np.arange(size)
  return ((pos >= start[:, None]) & (pos < end[:, None])).astype(np.float32)


def adaptive_avg_pool(x, bins: Union[int, Tuple[int, int]]):
  """`nn.AdaptiveAvgPool2d(bins)` for NHWC `x`: means over each bin's window,
  summed in float32 and returned in `x`'s dtype."""
  bins_h, bins_w = (bins, bins) if isinstance(bins, int) else bins
  rows, cols = _bin_matrix(x.shape[1], bins_h), _bin_matrix(x.shape[2], bins_w)
  sums = jnp.einsum("ih,nhwc,jw->nijc", rows.astype(x.dtype), x, cols.astype(x.dtype),
                    precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  counts = rows.sum(1)[:, None, None] * cols.sum(1)[None, :, None]
  return (sums / counts).astype(x.dtype)
