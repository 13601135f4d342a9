"""Input checks and reductions shared by the segmentation losses.

Every loss takes logits shaped (..., C) (NHWC for images) and integer labels
shaped (...), where `ignore_index` marks pixels that contribute neither loss
nor gradient. The checks run at trace time on static shapes.
"""
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

# Floor of a mean's denominator: a mean over no pixel is 0 (numerator 0), not NaN.
_MIN_DENOMINATOR = 1e-12


def num_classes_of(logits: jax.Array, labels: jax.Array, loss: str) -> int:
  """The class count C of (..., C) logits matching (...) integer labels."""
  if logits.ndim < 1 or logits.shape[-1] < 1:
    raise ValueError(f"{loss}: logits must be shaped (..., num_classes), got shape "
                     f"{tuple(logits.shape)}.")
  if tuple(labels.shape) != tuple(logits.shape[:-1]):
    raise ValueError(f"{loss}: labels shape {tuple(labels.shape)} must equal the logits shape "
                     f"without its class axis, {tuple(logits.shape[:-1])}; resize or crop the "
                     "labels to the logits first.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"{loss}: labels must be integer class ids, got dtype {labels.dtype}.")
  return logits.shape[-1]


def valid_and_safe(labels: jax.Array, ignore_index: int) -> Tuple[jax.Array, jax.Array]:
  """A bool mask of labelled pixels and int32 labels with ignored pixels set to 0
  (any valid index, so that gathers stay in range; their terms are masked)."""
  valid = labels != ignore_index
  return valid, jnp.where(valid, labels, 0).astype(jnp.int32)


def class_weight_vector(class_weights, num_classes: int, loss: str) -> Optional[jax.Array]:
  """`class_weights` as a float32 (C,) array, or None when not given."""
  if class_weights is None:
    return None
  weights = jnp.asarray(class_weights, jnp.float32)
  if weights.shape != (num_classes,):
    raise ValueError(f"{loss}: class_weights must have one entry per class, shape "
                     f"({num_classes},), got shape {tuple(weights.shape)}.")
  return weights


def pixel_weight_map(pixel_weights, labels: jax.Array, loss: str) -> Optional[jax.Array]:
  """`pixel_weights` as a float32 array shaped like the labels, or None."""
  if pixel_weights is None:
    return None
  weights = jnp.asarray(pixel_weights, jnp.float32)
  if weights.shape != labels.shape:
    raise ValueError(f"{loss}: pixel_weights shape {tuple(weights.shape)} must equal the labels "
                     f"shape {tuple(labels.shape)}.")
  return weights


def safe_ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """numerator / denominator for a non-negative denominator that is 0 only when
  the numerator is: then 0, with finite gradients."""
  return numerator / jnp.maximum(denominator, _MIN_DENOMINATOR)


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(values * weights) / sum(weights); 0 when every weight is 0."""
  return safe_ratio(jnp.sum(values * weights), jnp.sum(weights))


def binary_targets(labels: jax.Array, num_channels: int) -> jax.Array:
  """Float targets for per-channel sigmoid losses: the labels themselves (0/1)
  for a single channel, their one-hot encoding for several."""
  if num_channels == 1:
    return labels[..., None].astype(jnp.float32)
  return jax.nn.one_hot(labels, num_channels, dtype=jnp.float32)
