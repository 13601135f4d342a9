"""Pastes RoI mask probabilities into the image with static shapes.

Reproduces torchvision's `roi_heads.paste_masks_in_image` arithmetic:
1. the M x M mask is zero-padded to P = M + 2p and its box is scaled about the
   centre by P / M, then truncated to integers (x1, y1, x2, y2);
2. the padded mask is resized to h = max(y2 - y1 + 1, 1) rows and
   w = max(x2 - x1 + 1, 1) columns with bilinear interpolation,
   align_corners=False (source `max((i + 0.5) * P / h - 0.5, 0)`, next index
   clamped to P - 1);
3. resized pixel (r, c) lands on image pixel (y1 + r, x1 + c), clipped to the
   image; everything else is 0.
Here the resize is evaluated only at the image pixels the box covers: each image
row/column gets its two source indices and weights (separable bilinear, the same
`(v00 * wx0 + v01 * wx1) * wy0 + (v10 * wx0 + v11 * wx1) * wy1` order as PyTorch's
CPU kernel), so the output is [R, H, W] for any box sizes.
"""
import jax.numpy as jnp


def _axis_weights(lo, hi, size, padded):
  """Source indices and weights [R, size] along one image axis for integer box edges."""
  length = jnp.maximum(hi - lo + 1, 1)
  pixel = jnp.arange(size, dtype=jnp.int32)[None, :]
  rel = pixel - lo[:, None]
  inside = (rel >= 0) & (pixel <= hi[:, None]) & (rel < length[:, None])
  scale = jnp.float32(padded) / length.astype(jnp.float32)
  src = scale[:, None] * (rel.astype(jnp.float32) + jnp.float32(0.5)) - jnp.float32(0.5)
  src = jnp.maximum(src, 0)
  i0 = jnp.clip(src.astype(jnp.int32), 0, padded - 1)
  i1 = jnp.where(i0 < padded - 1, i0 + 1, i0)
  w1 = jnp.clip(src - i0.astype(jnp.float32), 0, 1)
  w0 = jnp.float32(1) - w1
  return i0, i1, w0, w1, inside


def paste_masks(masks, boxes, image_size, padding=1, threshold=None):
  """Image-sized masks [R, H, W] from RoI masks [R, M, M] and boxes [R, 4].

  Args:
    masks: [R, M, M] mask probabilities (e.g. sigmoid of the class channel).
    boxes: [R, 4] boxes (x1, y1, x2, y2) in image pixels.
    image_size: static (H, W).
    padding: zero border added to the mask before pasting (torchvision uses 1).
    threshold: if given, returns the bool mask `probability > threshold`;
      otherwise the float32 probabilities.
  """
  masks, boxes = jnp.asarray(masks, jnp.float32), jnp.asarray(boxes, jnp.float32)
  if masks.ndim != 3 or masks.shape[1] != masks.shape[2]:
    raise ValueError(f"masks must be [R, M, M], got shape {masks.shape}.")
  if boxes.shape != (masks.shape[0], 4):
    raise ValueError(f"boxes must be [R, 4] = [{masks.shape[0]}, 4], got {boxes.shape}.")
  im_h, im_w = (int(v) for v in image_size)
  m = masks.shape[-1]
  padded = m + 2 * padding
  scale = float(padded) / m
  masks = jnp.pad(masks, ((0, 0), (padding, padding), (padding, padding)))
  half_w = (boxes[:, 2] - boxes[:, 0]) * jnp.float32(0.5) * jnp.float32(scale)
  half_h = (boxes[:, 3] - boxes[:, 1]) * jnp.float32(0.5) * jnp.float32(scale)
  cx = (boxes[:, 2] + boxes[:, 0]) * jnp.float32(0.5)
  cy = (boxes[:, 3] + boxes[:, 1]) * jnp.float32(0.5)
  x1, x2 = (cx - half_w).astype(jnp.int32), (cx + half_w).astype(jnp.int32)
  y1, y2 = (cy - half_h).astype(jnp.int32), (cy + half_h).astype(jnp.int32)

  xi0, xi1, xw0, xw1, xin = _axis_weights(x1, x2, im_w, padded)
  yi0, yi1, yw0, yw1, yin = _axis_weights(y1, y2, im_h, padded)
  take_cols = lambda idx: jnp.take_along_axis(masks, idx[:, None, :], axis=2)
  cols = take_cols(xi0) * xw0[:, None, :] + take_cols(xi1) * xw1[:, None, :]  # [R, P, W]
  take_rows = lambda idx: jnp.take_along_axis(cols, idx[:, :, None], axis=1)
  out = take_rows(yi0) * yw0[:, :, None] + take_rows(yi1) * yw1[:, :, None]  # [R, H, W]
  out = jnp.where(yin[:, :, None] & xin[:, None, :], out, 0)
  return out if threshold is None else out > threshold
