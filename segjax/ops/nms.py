"""Greedy non-maximum suppression with static shapes (torchvision.ops.nms semantics).

Boxes are visited in descending score order; a box is suppressed when its IoU
with an already kept box is strictly greater than the threshold. The result is
a fixed-size array of kept indices padded with -1, so it is jittable and
vmap-able.

Scheme (blocked, after TF's non_max_suppression_padded): the score-sorted boxes
are cut into blocks of `block_size`. For each block in turn, (1) boxes
overlapping an already kept box are removed, comparing against a compact buffer
of kept boxes one block-sized chunk at a time, then (2) the block suppresses
itself by iterating `keep = init & ~any(kept earlier in block & IoU > t)` to its
fixed point, which is exactly the sequential greedy result (position k is final
after k iterations and the fixed point is unique), in practice after a few
iterations. Memory is O(block_size^2); work is at most O(N * min(N, K)) IoUs for
K = max_output_size, and the loop stops once K boxes are kept.
"""
import jax
import jax.numpy as jnp

from segjax.ops.boxes import pairwise_iou

_DEFAULT_BLOCK = 256


def _check_inputs(boxes, scores, max_output_size, iou_threshold):
  if boxes.ndim != 2 or boxes.shape[-1] != 4:
    raise ValueError(f"boxes must be [N, 4] (x1, y1, x2, y2), got shape {boxes.shape}; "
                     "use jax.vmap for batches.")
  if scores.shape != boxes.shape[:1]:
    raise ValueError(f"scores must be [N] = {boxes.shape[:1]}, got shape {scores.shape}.")
  if not isinstance(max_output_size, int) or max_output_size < 1:
    raise ValueError(f"max_output_size must be a positive Python int (a static shape), got "
                     f"{max_output_size!r}.")
  if isinstance(iou_threshold, (int, float)) and not 0 <= iou_threshold <= 1:
    raise ValueError(f"iou_threshold must lie in [0, 1], got {iou_threshold}.")


def _nms_core(boxes, scores, classes, valid, iou_threshold, max_output_size, block_size):
  """Shared greedy pass; suppression only between boxes of equal `classes`."""
  n = boxes.shape[0]
  if n == 0:  # nothing to keep (torchvision returns an empty index list)
    return jnp.full((max_output_size,), -1, jnp.int32), jnp.int32(0)
  block = min(block_size, n)
  num_blocks = -(-n // block)
  pad = num_blocks * block - n
  key = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
  order = jnp.argsort(-key, stable=True).astype(jnp.int32)
  sboxes = jnp.pad(boxes.astype(jnp.float32)[order], ((0, pad), (0, 0)))
  sclasses = jnp.pad(classes.astype(jnp.int32)[order], (0, pad))
  svalid = jnp.pad(valid[order], (0, pad))
  sorder = jnp.pad(order, (0, pad), constant_values=-1)

  num_chunks = -(-max_output_size // block)
  kept_boxes = jnp.zeros((num_chunks * block, 4), jnp.float32)
  kept_classes = jnp.full((num_chunks * block,), -1, jnp.int32)
  out = jnp.full((max_output_size,), -1, jnp.int32)
  later = jnp.arange(block)[:, None] < jnp.arange(block)[None, :]

  def process_block(carry):
    b, count, kept_boxes, kept_classes, out = carry
    start = b * block
    bboxes = jax.lax.dynamic_slice_in_dim(sboxes, start, block)
    bclasses = jax.lax.dynamic_slice_in_dim(sclasses, start, block)
    init = jax.lax.dynamic_slice_in_dim(svalid, start, block)
    bidx = jax.lax.dynamic_slice_in_dim(sorder, start, block)

    def against_chunk(c, alive):
      cboxes = jax.lax.dynamic_slice_in_dim(kept_boxes, c * block, block)
      cclasses = jax.lax.dynamic_slice_in_dim(kept_classes, c * block, block)
      hit = (pairwise_iou(cboxes, bboxes) > iou_threshold) & (cclasses[:, None] == bclasses)
      return alive & ~jnp.any(hit, axis=0)

    used_chunks = jnp.minimum(-(-count // block), num_chunks)
    init = jax.lax.fori_loop(0, used_chunks, against_chunk, init)

    self_hit = ((pairwise_iou(bboxes, bboxes) > iou_threshold) & later
                & (bclasses[:, None] == bclasses[None, :]))

    def step(state):
      keep, _ = state
      new = init & ~jnp.any(self_hit & keep[:, None], axis=0)
      return new, jnp.any(new != keep)

    keep, _ = jax.lax.while_loop(lambda s: s[1], step, (init, jnp.array(True)))
    pos = jnp.where(keep, count + jnp.cumsum(keep) - 1, out.shape[0])
    out = out.at[pos].set(bidx, mode="drop")
    kpos = jnp.where(keep, pos, kept_boxes.shape[0])
    kept_boxes = kept_boxes.at[kpos].set(bboxes, mode="drop")
    kept_classes = kept_classes.at[kpos].set(bclasses, mode="drop")
    count = jnp.minimum(count + jnp.sum(keep, dtype=jnp.int32), max_output_size)
    return b + 1, count, kept_boxes, kept_classes, out

  def not_done(carry):
    b, count = carry[:2]
    return (b < num_blocks) & (count < max_output_size)

  init_carry = (jnp.int32(0), jnp.int32(0), kept_boxes, kept_classes, out)
  _, count, _, _, out = jax.lax.while_loop(not_done, process_block, init_carry)
  return out, count


def nms(boxes, scores, iou_threshold, max_output_size, valid=None, block_size=_DEFAULT_BLOCK):
  """Greedy NMS of boxes [N, 4] with scores [N].

  Args:
    boxes: [N, 4] boxes (x1, y1, x2, y2).
    scores: [N] scores; higher is visited first (ties: lower index first).
    iou_threshold: suppress boxes whose IoU with a kept box is > this (may be traced).
    max_output_size: static number of output slots.
    valid: optional [N] bool; False marks padding, never kept and never suppressing.
    block_size: static block length of the blocked greedy pass (memory ~ block_size^2).

  Returns:
    (indices [max_output_size] int32 into `boxes`, in descending score order, padded
    with -1; num_valid int32, the number of leading non-padding entries).
  """
  boxes, scores = jnp.asarray(boxes), jnp.asarray(scores)
  _check_inputs(boxes, scores, max_output_size, iou_threshold)
  valid = jnp.ones(scores.shape, bool) if valid is None else jnp.asarray(valid, bool)
  classes = jnp.zeros(scores.shape, jnp.int32)
  return _nms_core(boxes, scores, classes, valid, iou_threshold, max_output_size, block_size)


def batched_nms(boxes, scores, classes, iou_threshold, max_output_size, valid=None,
                block_size=_DEFAULT_BLOCK):
  """Class-aware NMS: like `nms`, but a box suppresses only boxes of the same class.

  Equal to torchvision.ops.batched_nms: one pass in global score order where
  suppression is masked by class equality (exact, unlike the coordinate-offset
  trick, which perturbs IoUs in float32 for large offsets).

  Args:
    classes: [N] integer class of each box. Other arguments as in `nms`.
  """
  boxes, scores, classes = jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(classes)
  _check_inputs(boxes, scores, max_output_size, iou_threshold)
  if classes.shape != scores.shape or not jnp.issubdtype(classes.dtype, jnp.integer):
    raise ValueError(f"classes must be an integer array of shape {scores.shape}, got "
                     f"{classes.dtype} {classes.shape}.")
  valid = jnp.ones(scores.shape, bool) if valid is None else jnp.asarray(valid, bool)
  return _nms_core(boxes, scores, classes, valid, iou_threshold, max_output_size, block_size)
