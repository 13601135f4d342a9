"""Soft multi-class Dice loss (mmseg's `DiceLoss` definition)."""
from typing import Optional

import jax
import jax.numpy as jnp

from segjax.losses import common


def dice_loss(logits: jax.Array, labels: jax.Array, ignore_index: int = 255,
              class_weights: Optional[jax.Array] = None, smooth: float = 1.0,
              exponent: float = 2.0, per_image: bool = True) -> jax.Array:
  """1 - the (weighted) mean over classes of the soft Dice coefficient.

  mmseg's `DiceLoss` (v0.x): with p = softmax(logits), t = one-hot labels and
  the sums over the non-ignored pixels of one image,

    dice_c = (2 sum(p_c t_c) + smooth) / (sum(p_c^exponent) + sum(t_c^exponent) + smooth)
    loss = sum_c w_c (1 - dice_c) / C,

  averaged over the images. w = `class_weights` (1 if not given; as in mmseg the
  sum is divided by C, not by sum(w)). Unlike mmseg, ignored pixels are also
  left out of the denominator sums, so they contribute nothing at all. A class
  absent from an image has dice 1 / (sum(p_c^exponent) + smooth), which pushes
  its probabilities to 0; an image without labelled pixels has loss 0.

  Args:
    logits: (..., C) float logits; with `per_image` the first axis is the image.
    labels: (...) integer labels in [0, C) or `ignore_index`.
    ignore_index: the label of pixels that are left out.
    class_weights: optional (C,) weights.
    smooth: the additive smoothing term (> 0 keeps every ratio finite).
    exponent: the power of probabilities and targets in the denominator.
    per_image: Dice per image (the first axis) averaged over images, as in
      mmseg; False pools all pixels of the batch into one Dice per class.
  Returns:
    A float32 scalar.
  """
  num_classes = common.num_classes_of(logits, labels, "dice")
  weights = common.class_weight_vector(class_weights, num_classes, "dice")
  if smooth <= 0:
    raise ValueError(f"dice: smooth must be > 0 so that empty classes stay finite, got {smooth}.")
  if exponent <= 0:
    raise ValueError(f"dice: exponent must be > 0, got {exponent}.")
  if per_image and labels.ndim < 1:
    raise ValueError("dice: per_image needs labels with a leading image axis, got a scalar label.")
  valid, safe_labels = common.valid_and_safe(labels, ignore_index)
  mask = valid.astype(jnp.float32)[..., None]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  targets = jax.nn.one_hot(safe_labels, num_classes, dtype=jnp.float32)
  groups = labels.shape[0] if per_image else 1  # images with one Dice per class each
  probs, targets, mask = (x.reshape(groups, -1, num_classes)
                          for x in (probs, targets, jnp.broadcast_to(mask, probs.shape)))
  intersection = jnp.sum(probs * targets * mask, axis=1)
  denominator = jnp.sum((probs ** exponent + targets ** exponent) * mask, axis=1)
  dice = (2.0 * intersection + smooth) / (denominator + smooth)
  per_class = 1.0 - dice
  if weights is not None:
    per_class = per_class * weights
  return jnp.mean(jnp.sum(per_class, axis=-1) / num_classes)
