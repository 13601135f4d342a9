"""Online hard example mining (OHEM) cross-entropy with static shapes.

Follows mmseg's `OHEMPixelSampler` with a probability threshold: a labelled
pixel is kept when the softmax probability of its true class is below `thresh`,
and at least `min_kept` pixels of the whole batch are kept, which raises the
threshold to the probability of the `min_kept`-th hardest pixel. Differences
from mmseg, chosen to make "at least `min_kept`" hold exactly:

* `min_kept` counts pixels of the whole input (all leading axes together);
  mmseg multiplies its `min_kept` by the batch size, so pass
  `min_kept * batch_size` to reproduce it.
* The `min_kept` hardest pixels are kept by rank (ties broken by position), so
  equal probabilities (e.g. saturated at 1.0) cannot drop the count below
  `min_kept`; with fewer labelled pixels than `min_kept`, all are kept (mmseg
  then drops the easiest one). Without ties the kept sets are the same.
"""
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from segjax.losses import common
from segjax.losses.cross_entropy import cross_entropy


def ohem_keep_mask(logits: jax.Array, labels: jax.Array, ignore_index: int = 255,
                   thresh: float = 0.7, min_kept: int = 100000) -> jax.Array:
  """Boolean mask (shaped like `labels`) of the pixels OHEM trains on.

  Kept: labelled pixels whose true-class probability is < `thresh`, plus the
  `min_kept` labelled pixels with the lowest true-class probability. Ignored
  pixels are never kept. The selection carries no gradient.
  """
  common.num_classes_of(logits, labels, "ohem_cross_entropy")
  if not 0.0 < thresh <= 1.0:
    raise ValueError(f"ohem_cross_entropy: thresh must be in (0, 1], got {thresh}.")
  if isinstance(min_kept, bool) or not isinstance(min_kept, (int, np.integer)) or min_kept < 0:
    raise ValueError(f"ohem_cross_entropy: min_kept must be a non-negative int, got {min_kept!r}.")
  valid, safe_labels = common.valid_and_safe(labels, ignore_index)
  probs = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
  true_prob = jnp.take_along_axis(probs, safe_labels[..., None], axis=-1)[..., 0]
  keep = valid & (true_prob < thresh)
  count = min(int(min_kept), labels.size)
  if count:
    # Ignored pixels sort after every labelled one (probabilities are <= 1).
    hardness = -jnp.where(valid, true_prob, 2.0).reshape(-1)
    _, hardest = jax.lax.top_k(hardness, count)
    by_rank = jnp.zeros(labels.size, bool).at[hardest].set(True).reshape(labels.shape)
    keep = keep | (by_rank & valid)
  return keep


def ohem_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int = 255,
                       class_weights: Optional[jax.Array] = None, thresh: float = 0.7,
                       min_kept: int = 100000, label_smoothing: float = 0.0) -> jax.Array:
  """Cross-entropy averaged over the pixels `ohem_keep_mask` keeps.

  The kept pixels are the only ones counted, in the numerator and in the
  (class-weighted, as in `cross_entropy`) denominator, so the loss is the mean
  over the hard pixels, not over all labelled ones. 0 when none is labelled.
  """
  keep = ohem_keep_mask(logits, labels, ignore_index, thresh, min_kept)
  return cross_entropy(logits, labels, ignore_index, class_weights, label_smoothing,
                       pixel_weights=keep.astype(jnp.float32))
