"""Focal losses (Lin et al. 2017): softmax multi-class and sigmoid (RetinaNet)."""
from typing import Optional, Union

import jax
import jax.numpy as jnp

from segjax.losses import common

# (1 - p)^gamma is evaluated at >= this value: for gamma < 1 its derivative at
# p = 1 is infinite and would turn the zero loss of a perfect pixel into NaN
# gradients. The value changes by at most tiny^gamma times a zero log.
_TINY = float(jnp.finfo(jnp.float32).tiny)


def _modulation(one_minus_p: jax.Array, gamma: float) -> jax.Array:
  return jnp.maximum(one_minus_p, _TINY) ** gamma


def _check_gamma(gamma: float, loss: str) -> None:
  if gamma < 0:
    raise ValueError(f"{loss}: gamma must be >= 0, got {gamma}.")


def softmax_focal_loss(logits: jax.Array, labels: jax.Array, ignore_index: int = 255,
                       class_weights: Optional[jax.Array] = None, gamma: float = 2.0,
                       alpha: Union[None, float, jax.Array] = None,
                       pixel_weights: Optional[jax.Array] = None) -> jax.Array:
  """Multi-class focal loss -alpha_t (1 - p_t)^gamma log p_t, p_t = softmax prob
  of the true class.

  Averaged over the non-ignored pixels like `cross_entropy`: with class weights
  w and pixel weights v, sum_i v_i w_{y_i} l_i / sum_i v_i w_{y_i}. `alpha`
  (a scalar, or (C,) per class giving alpha_t = alpha[y]) scales each pixel's
  loss but, as in RetinaNet, not the normaliser. gamma = 0 and no alpha give
  `cross_entropy`.
  """
  num_classes = common.num_classes_of(logits, labels, "focal")
  _check_gamma(gamma, "focal")
  weights_c = common.class_weight_vector(class_weights, num_classes, "focal")
  pixel_w = common.pixel_weight_map(pixel_weights, labels, "focal")
  valid, safe_labels = common.valid_and_safe(labels, ignore_index)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  log_pt = jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  losses = -_modulation(-jnp.expm1(log_pt), gamma) * log_pt
  if alpha is not None:
    alpha = jnp.asarray(alpha, jnp.float32)
    if alpha.shape not in ((), (num_classes,)):
      raise ValueError(f"focal: alpha must be a scalar or have shape ({num_classes},), got "
                       f"shape {tuple(alpha.shape)}.")
    losses = losses * (alpha if alpha.ndim == 0 else alpha[safe_labels])
  weights = valid.astype(jnp.float32)
  if weights_c is not None:
    weights = weights * weights_c[safe_labels]
  if pixel_w is not None:
    weights = weights * pixel_w
  return common.weighted_mean(losses, weights)


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, alpha: Optional[float] = 0.25,
                       gamma: float = 2.0, valid_mask: Optional[jax.Array] = None) -> jax.Array:
  """Binary focal loss of RetinaNet, mean over the valid elements.

  Equals `torchvision.ops.sigmoid_focal_loss(logits, targets, alpha, gamma,
  reduction="mean")` when `valid_mask` is None (alpha=None stands for its -1):
  l = BCE(x, t) (1 - p_t)^gamma alpha_t with p = sigmoid(x), p_t = p t +
  (1 - p)(1 - t), alpha_t = alpha t + (1 - alpha)(1 - t).

  Args:
    logits: float logits of any shape.
    targets: float targets in [0, 1], shaped like `logits`.
    alpha: weight of the positives in [0, 1], or None for no weighting.
    gamma: the focusing exponent, >= 0.
    valid_mask: optional mask (or non-negative weights) broadcastable to
      `logits`; the mean is sum(l * m) / sum(m), 0 when the mask is empty.
  """
  _check_gamma(gamma, "sigmoid_focal")
  if alpha is not None and not 0.0 <= alpha <= 1.0:
    raise ValueError(f"sigmoid_focal: alpha must be in [0, 1] or None, got {alpha}.")
  if tuple(targets.shape) != tuple(logits.shape):
    raise ValueError(f"sigmoid_focal: targets shape {tuple(targets.shape)} must equal the "
                     f"logits shape {tuple(logits.shape)}.")
  logits = logits.astype(jnp.float32)
  targets = targets.astype(jnp.float32)
  bce = jax.nn.softplus(-logits) + (1.0 - targets) * logits
  probs = jax.nn.sigmoid(logits)
  p_t = probs * targets + (1.0 - probs) * (1.0 - targets)
  losses = bce * _modulation(1.0 - p_t, gamma)
  if alpha is not None:
    losses = losses * (alpha * targets + (1.0 - alpha) * (1.0 - targets))
  if valid_mask is None:
    return jnp.mean(losses)
  return common.weighted_mean(losses, jnp.broadcast_to(
      jnp.asarray(valid_mask, jnp.float32), losses.shape))
