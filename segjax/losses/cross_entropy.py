"""Pixel-wise softmax cross-entropy: ignore index, class and pixel weights,
label smoothing."""
from typing import Optional

import jax
import jax.numpy as jnp

from segjax.losses import common


def cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int = 255,
                  class_weights: Optional[jax.Array] = None, label_smoothing: float = 0.0,
                  pixel_weights: Optional[jax.Array] = None) -> jax.Array:
  """Weighted mean softmax cross-entropy over the non-ignored pixels.

  Matches PyTorch's `F.cross_entropy(weight=, ignore_index=, label_smoothing=)`
  with mean reduction. With eps = `label_smoothing`, the target is
  (1 - eps) one-hot + eps / C, class weights w and pixel weights v (1 if not
  given), the loss is

    sum_i v_i [(1 - eps) w_{y_i} (-log p_{i,y_i}) + eps / C sum_c w_c (-log p_ic)]
    / sum_i v_i w_{y_i}

  over the non-ignored pixels i: as in PyTorch the smoothing term weighs each
  class by its own weight but is normalised, like the one-hot term, by the
  weights of the true classes.

  Args:
    logits: (..., C) float logits.
    labels: (...) integer labels in [0, C); `ignore_index` marks unlabelled pixels.
    ignore_index: the label value that contributes neither loss nor gradient.
    class_weights: optional (C,) weights.
    label_smoothing: eps in [0, 1].
    pixel_weights: optional non-negative per-pixel weights shaped like `labels`
      (e.g. a U-Net weight map); they scale numerator and denominator alike.
  Returns:
    A float32 scalar; 0 (with zero gradients) when every pixel is ignored.
  """
  num_classes = common.num_classes_of(logits, labels, "cross_entropy")
  if not 0.0 <= label_smoothing <= 1.0:
    raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}.")
  weights_c = common.class_weight_vector(class_weights, num_classes, "cross_entropy")
  pixel_w = common.pixel_weight_map(pixel_weights, labels, "cross_entropy")
  valid, safe_labels = common.valid_and_safe(labels, ignore_index)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  weights = valid.astype(jnp.float32)
  if pixel_w is not None:
    weights = weights * pixel_w
  true_class_weight = 1.0 if weights_c is None else weights_c[safe_labels]
  if label_smoothing == 0.0:
    losses = true_class_weight * nll
  else:
    all_classes = -(log_probs if weights_c is None else log_probs * weights_c).sum(-1)
    losses = ((1.0 - label_smoothing) * true_class_weight * nll
              + (label_smoothing / num_classes) * all_classes)
  return common.safe_ratio(jnp.sum(losses * weights), jnp.sum(true_class_weight * weights))


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int = 255,
                        class_weights: Optional[jax.Array] = None) -> jax.Array:
  """Mean cross-entropy over the pixels whose label is not `ignore_index`.

  Args:
    logits: (..., C) float logits.
    labels: (...) integer labels; `ignore_index` marks pixels without a label.
    ignore_index: the label value that contributes neither loss nor gradient.
    class_weights: optional (C,) weights; the mean is then weighted as in
      PyTorch's `cross_entropy(weight=...)` (divided by the summed weights).
  Returns:
    A scalar. 0 when every pixel is ignored.
  """
  return cross_entropy(logits, labels, ignore_index, class_weights)


def weighted_pixel_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                                 ignore_index: int = 255,
                                 class_weights: Optional[jax.Array] = None) -> jax.Array:
  """Cross-entropy with a per-pixel weight map (U-Net, see `segjax.data.unet_weights`).

  The weighted mean sum_i v_i w_{y_i} (-log p_{i,y_i}) / sum_i v_i w_{y_i} over
  the non-ignored pixels, v = `weights` (shaped like `labels`), w =
  `class_weights` (1 if not given). Normalising by the summed weights keeps the
  loss scale independent of the map's overall magnitude; only the relative
  emphasis of pixels changes.
  """
  return cross_entropy(logits, labels, ignore_index, class_weights, pixel_weights=weights)
