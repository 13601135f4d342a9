"""Binary cross-entropy with logits, for masks (instance masks, binary maps)."""
from typing import Optional

import jax
import jax.numpy as jnp

from segjax.losses import common


def binary_cross_entropy_with_logits(logits: jax.Array, targets: jax.Array,
                                     valid_mask: Optional[jax.Array] = None,
                                     pos_weight: Optional[jax.Array] = None) -> jax.Array:
  """Mean binary cross-entropy of sigmoid(logits) against targets in [0, 1].

  Equals PyTorch's `F.binary_cross_entropy_with_logits(logits, targets,
  pos_weight=pos_weight)` (mean reduction) when `valid_mask` is None:
  l = -[pos_weight t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))], computed
  stably for large |x|.

  Args:
    logits: float logits of any shape.
    targets: float targets shaped like `logits`.
    valid_mask: optional mask (or non-negative weights) broadcastable to
      `logits`; the mean is then sum(l * m) / sum(m), and 0 when it is empty.
    pos_weight: optional weight of the positive term, broadcastable to `logits`
      (e.g. one per channel on the last axis).
  Returns:
    A float32 scalar.
  """
  if tuple(targets.shape) != tuple(logits.shape):
    raise ValueError(f"binary_cross_entropy: targets shape {tuple(targets.shape)} must equal "
                     f"the logits shape {tuple(logits.shape)}.")
  logits = logits.astype(jnp.float32)
  targets = targets.astype(jnp.float32)
  # -log sigmoid(x) = softplus(-x); -log(1 - sigmoid(x)) = softplus(-x) + x.
  neg_log_p = jax.nn.softplus(-logits)
  if pos_weight is None:
    losses = neg_log_p + (1.0 - targets) * logits
  else:
    pos_weight = jnp.asarray(pos_weight, jnp.float32)
    losses = (pos_weight * targets + 1.0 - targets) * neg_log_p + (1.0 - targets) * logits
  if valid_mask is None:
    return jnp.mean(losses)
  return common.weighted_mean(losses, jnp.broadcast_to(
      jnp.asarray(valid_mask, jnp.float32), losses.shape))
