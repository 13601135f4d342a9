"""Lovasz-softmax loss (Berman, Rannen Triki and Blaschko, CVPR 2018).

A convex surrogate of the per-class Jaccard loss: for class c the errors
e_i = |[y_i = c] - p_ic| are sorted in decreasing order and dotted with the
gradient of the Lovasz extension of the Jaccard loss at that order,

  g_k = J_k - J_{k-1} (J_0 = 0),  J_k = 1 - I_k / U_k,
  I_k = |fg| - (#fg among the first k),  U_k = |fg| + (#bg among the first k).

Static shapes: every pixel is sorted, but ignored pixels are given a sort key
below any error so they come last, and they add neither to |fg| nor to the
background counts, so the Jaccard gradient at every labelled position is the
one of the labelled pixels alone; their own error is 0 and their g is 0, so
they contribute nothing, not even gradient.
"""
from typing import Optional

import jax
import jax.numpy as jnp

from segjax.losses import common


def _lovasz_per_class(probs: jax.Array, targets: jax.Array, valid: jax.Array) -> jax.Array:
  """(G, C) losses of (G, N, C) probabilities, one-hot targets and a 0/1 mask."""
  errors = jnp.abs(targets - probs) * valid
  order = jnp.argsort(-jnp.where(valid > 0, errors, -1.0), axis=1)
  errors_sorted = jnp.take_along_axis(errors, order, axis=1)
  fg_sorted = jnp.take_along_axis(targets * valid, order, axis=1)
  bg_sorted = jnp.take_along_axis((1.0 - targets) * valid, order, axis=1)
  num_fg = jnp.sum(fg_sorted, axis=1, keepdims=True)
  intersection = num_fg - jnp.cumsum(fg_sorted, axis=1)
  union = num_fg + jnp.cumsum(bg_sorted, axis=1)
  # union is 0 only where no labelled pixel precedes (and then none exists at all).
  jaccard = jnp.where(union > 0, 1.0 - intersection / jnp.maximum(union, 1.0), 0.0)
  grad = jnp.diff(jaccard, axis=1, prepend=0.0)
  return jnp.sum(errors_sorted * jax.lax.stop_gradient(grad), axis=1)


def lovasz_softmax(logits: jax.Array, labels: jax.Array, ignore_index: int = 255,
                   class_weights: Optional[jax.Array] = None, per_image: bool = False,
                   classes: str = "present") -> jax.Array:
  """Lovasz-softmax loss of softmax(logits) against integer labels.

  As in the authors' reference code: the per-class losses are averaged over the
  classes present in the labels (`classes="present"`) or over all classes
  (`"all"`); with `per_image` each image (the first axis) gets its own loss and
  these are averaged over all images, an image without labelled pixels counting
  as 0. Optional (C,) class weights turn the class mean into
  sum_c w_c L_c / sum_c w_c over the same classes. 0 when nothing is labelled.

  Args:
    logits: (..., C) float logits; with `per_image` the first axis is the image.
    labels: (...) integer labels in [0, C) or `ignore_index`.
    ignore_index: the label of pixels that are left out.
    class_weights: optional (C,) weights of the class mean.
    per_image: one loss per image, averaged, instead of one over the batch.
    classes: "present" or "all".
  Returns:
    A float32 scalar.
  """
  num_classes = common.num_classes_of(logits, labels, "lovasz_softmax")
  weights = common.class_weight_vector(class_weights, num_classes, "lovasz_softmax")
  if classes not in ("present", "all"):
    raise ValueError(f"lovasz_softmax: classes must be 'present' or 'all', got {classes!r}.")
  if per_image and labels.ndim < 1:
    raise ValueError("lovasz_softmax: per_image needs labels with a leading image axis.")
  valid, safe_labels = common.valid_and_safe(labels, ignore_index)
  groups = labels.shape[0] if per_image else 1
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(groups, -1, num_classes)
  targets = jax.nn.one_hot(safe_labels, num_classes, dtype=jnp.float32).reshape(probs.shape)
  mask = valid.astype(jnp.float32).reshape(groups, -1, 1)
  losses = _lovasz_per_class(probs, targets, mask)
  class_mean = jnp.ones_like(losses) if weights is None else jnp.broadcast_to(weights, losses.shape)
  if classes == "present":
    class_mean = class_mean * (jnp.sum(targets * mask, axis=1) > 0)
  return jnp.mean(common.safe_ratio(jnp.sum(losses * class_mean, axis=-1),
                                    jnp.sum(class_mean, axis=-1)))
