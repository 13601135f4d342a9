"""Pixel-wise softmax cross-entropy with an ignore index."""
from typing import Optional

import jax
import jax.numpy as jnp


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
  valid = labels != ignore_index
  safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  weights = valid.astype(jnp.float32)
  if class_weights is not None:
    weights = weights * jnp.asarray(class_weights, jnp.float32)[safe_labels]
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1e-12)
