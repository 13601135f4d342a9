"""Box utilities in (x1, y1, x2, y2) form: area, IoU, clipping and the R-CNN box coder.

The coder follows torchvision's `models.detection._utils.BoxCoder`: widths are
`x2 - x1` (no +1), centres `x1 + 0.5 * w`, and decoded corners `c -/+ 0.5 * w`.
"""
import math

import jax.numpy as jnp

DEFAULT_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
DEFAULT_CLAMP = math.log(1000.0 / 16)


def _check_boxes(boxes, name):
  if boxes.ndim < 1 or boxes.shape[-1] != 4:
    raise ValueError(f"{name} must have a last axis of size 4 (x1, y1, x2, y2), got shape "
                     f"{boxes.shape}; reshape it to [..., 4].")


def _upcast(boxes):
  """Small dtypes widened as torchvision's box ops do, so that areas and products neither
  overflow (int8: a 100x100 box) nor underflow (float16 IoUs): floats below 32 bits to
  float32, integers other than int32/int64 to int32."""
  if jnp.issubdtype(boxes.dtype, jnp.floating):
    return boxes if boxes.dtype in (jnp.float32, jnp.float64) else boxes.astype(jnp.float32)
  return boxes if boxes.dtype in (jnp.int32, jnp.int64) else boxes.astype(jnp.int32)


def box_area(boxes):
  """Area `(x2 - x1) * (y2 - y1)` of boxes [..., 4] (small dtypes upcast, `_upcast`)."""
  boxes = _upcast(jnp.asarray(boxes))
  _check_boxes(boxes, "boxes")
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_iou(a, b):
  """IoU matrix [N, M] of boxes a [N, 4] and b [M, 4]; 0 where the union is empty
  (small dtypes upcast, `_upcast`)."""
  a, b = _upcast(jnp.asarray(a)), _upcast(jnp.asarray(b))
  _check_boxes(a, "a")
  _check_boxes(b, "b")
  lt = jnp.maximum(a[:, None, :2], b[None, :, :2])
  rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = jnp.clip(rb - lt, 0)
  inter = wh[..., 0] * wh[..., 1]
  union = box_area(a)[:, None] + box_area(b)[None, :] - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1), 0)


def clip_boxes(boxes, height, width):
  """Clips boxes [..., 4] to the image: x to [0, width], y to [0, height]."""
  boxes = jnp.asarray(boxes)
  _check_boxes(boxes, "boxes")
  x = jnp.clip(boxes[..., 0::2], 0, width)
  y = jnp.clip(boxes[..., 1::2], 0, height)
  return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def _centre_size(boxes):
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode_boxes(reference, proposals, weights=DEFAULT_WEIGHTS):
  """Regression targets [..., 4] that map `proposals` onto `reference` boxes.

  Args:
    reference: target (ground-truth) boxes [..., 4].
    proposals: boxes the deltas are relative to [..., 4], same shape.
    weights: (wx, wy, ww, wh) multipliers of (dx, dy, dw, dh).
  """
  reference, proposals = jnp.asarray(reference), jnp.asarray(proposals)
  _check_boxes(reference, "reference")
  _check_boxes(proposals, "proposals")
  wx, wy, ww, wh = weights
  gx, gy, gw, gh = _centre_size(reference)
  px, py, pw, ph = _centre_size(proposals)
  return jnp.stack([wx * (gx - px) / pw, wy * (gy - py) / ph,
                    ww * jnp.log(gw / pw), wh * jnp.log(gh / ph)], axis=-1)


def decode_boxes(deltas, reference, weights=DEFAULT_WEIGHTS, clamp=DEFAULT_CLAMP):
  """Boxes [..., 4] obtained by applying `deltas` [..., 4] to `reference` boxes [..., 4].

  dw and dh are clamped to `clamp` before the exponential, as in torchvision, so
  that large predicted deltas cannot overflow.
  """
  deltas, reference = jnp.asarray(deltas), jnp.asarray(reference).astype(jnp.asarray(deltas).dtype)
  _check_boxes(deltas, "deltas")
  _check_boxes(reference, "reference")
  wx, wy, ww, wh = weights
  cx, cy, w, h = _centre_size(reference)
  dx = deltas[..., 0] / wx
  dy = deltas[..., 1] / wy
  dw = jnp.minimum(deltas[..., 2] / ww, clamp)
  dh = jnp.minimum(deltas[..., 3] / wh, clamp)
  pcx = dx * w + cx
  pcy = dy * h + cy
  half_w = 0.5 * (jnp.exp(dw) * w)
  half_h = 0.5 * (jnp.exp(dh) * h)
  return jnp.stack([pcx - half_w, pcy - half_h, pcx + half_w, pcy + half_h], axis=-1)
