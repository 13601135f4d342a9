"""Training losses of the RPN, the Fast R-CNN box head and the Mask R-CNN mask head.

Normalisations follow torchvision's `models.detection` (`RegionProposalNetwork.compute_loss`,
`fastrcnn_loss`, `maskrcnn_loss`), which differ from detectron2's in the box losses:

* RPN: objectness BCE is the mean over the sampled anchors of the whole batch, and the box loss
  (smooth L1, beta = 1/9) is summed over sampled positives and divided by the number of sampled
  anchors. detectron2 divides both sums by the fixed `batch_size_per_image * num_images` and uses
  plain L1 (beta = 0) by default.
* Fast R-CNN: cross-entropy mean over the sampled RoIs; box loss (smooth L1, beta = 1/9) of the
  foreground rows' own-class deltas, divided by the number of sampled RoIs. detectron2 has the
  same denominator but plain L1 by default.
* Mask: BCE with logits of each foreground RoI's own class channel, mean over all their pixels
  (both libraries). Mask targets follow detectron2 (`BitMasks.crop_and_resize`: aligned RoIAlign
  of the 0/1 mask, then a threshold); torchvision uses unaligned RoIAlign without a threshold.

Static shapes: the sampled sets are fixed-size arrays with masks (`RpnTargets.weights`,
`RoiTargets.valid`, labels) instead of the variable-length index lists torchvision gathers, so
every loss is a masked sum over a fixed-size batch divided by a count clamped to >= 1. That keeps
the functions jittable (one compilation for every batch, as XLA on TPU needs) and finite, with
finite gradients, when nothing is sampled or no image has ground truth.
"""
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from segjax.ops.roi_align import roi_align
from segjax.ops.targets import RoiTargets, RpnTargets

# torchvision's smooth L1 transition point in both box losses.
BOX_LOSS_BETA = 1.0 / 9.0


def _smooth_l1(diff: jax.Array, beta: float) -> jax.Array:
  """Elementwise smooth L1: 0.5 d^2 / beta for |d| < beta, else |d| - 0.5 beta."""
  abs_diff = jnp.abs(diff)
  return jnp.where(abs_diff < beta, 0.5 * diff * diff / beta, abs_diff - 0.5 * beta)


def _bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Elementwise binary cross-entropy of sigmoid(logits), stable for large |logits|."""
  return jax.nn.softplus(-logits) + (1.0 - targets) * logits


def _masked_mean(values: jax.Array, mask: jax.Array, count: jax.Array) -> jax.Array:
  """sum(values where mask) / max(count, 1): 0 with zero gradients when the mask is empty."""
  total = jnp.sum(jnp.where(mask, values, 0.0))
  return total / jnp.maximum(count, 1.0)


def _check_shape(name: str, array: jax.Array, shape: Tuple[int, ...], hint: str):
  if tuple(array.shape) != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(array.shape)}; {hint}")


def rpn_losses(objectness: jax.Array, deltas: jax.Array,
               targets: RpnTargets) -> Tuple[jax.Array, jax.Array]:
  """RPN objectness and box losses over a batch, as torchvision's RPN `compute_loss`.

  Args:
    objectness: [B, A] objectness logits of all anchors (levels concatenated like the anchors).
    deltas: [B, A, 4] predicted box deltas.
    targets: RpnTargets with leading [B] axes (e.g. `rpn_targets` vmapped over images).

  Returns:
    (objectness_loss, box_loss) float32 scalars: BCE with logits averaged over the sampled
    anchors (weights > 0) of the batch; smooth L1 (beta 1/9) summed over the sampled positives
    (labels == 1), divided by the number of sampled anchors. 0 when nothing is sampled.
  """
  if objectness.ndim != 2:
    raise ValueError(f"objectness must have shape [B, A], got {tuple(objectness.shape)}; flatten "
                     "the levels and anchors per image.")
  shape = tuple(objectness.shape)
  hint = "give targets with leading [B] axes for the same anchors (vmap rpn_targets)."
  _check_shape("deltas", deltas, shape + (4,), "one 4-vector per anchor.")
  _check_shape("targets.labels", targets.labels, shape, hint)
  _check_shape("targets.weights", targets.weights, shape, hint)
  _check_shape("targets.box_targets", targets.box_targets, shape + (4,), hint)
  sampled = targets.weights > 0
  positive = targets.labels == 1
  num_sampled = jnp.sum(sampled).astype(jnp.float32)
  bce = _bce_with_logits(objectness.astype(jnp.float32), positive.astype(jnp.float32))
  objectness_loss = _masked_mean(bce, sampled, num_sampled)
  box = jnp.sum(_smooth_l1(deltas.astype(jnp.float32) - targets.box_targets.astype(jnp.float32),
                           BOX_LOSS_BETA), axis=-1)
  box_loss = _masked_mean(box, positive, num_sampled)
  return objectness_loss, box_loss


def fast_rcnn_losses(class_logits: jax.Array, box_deltas: jax.Array,
                     targets: RoiTargets) -> Tuple[jax.Array, jax.Array]:
  """Box-head classification and regression losses, as torchvision's `fastrcnn_loss`.

  Args:
    class_logits: [B, S, K + 1] logits (channel 0 background) of the S sampled RoIs per image.
    box_deltas: [B, S, K + 1, 4] class-specific box deltas.
    targets: RoiTargets with leading [B] axes (e.g. `roi_targets` vmapped over images).

  Returns:
    (classifier_loss, box_loss) float32 scalars: cross-entropy mean over the valid rows of the
    batch; smooth L1 (beta 1/9) of each foreground row's deltas for its own label against
    `targets.box_targets`, summed and divided by the number of valid rows. 0 with no valid row.
  """
  if class_logits.ndim != 3:
    raise ValueError(f"class_logits must have shape [B, S, K + 1], got "
                     f"{tuple(class_logits.shape)}.")
  rows = tuple(class_logits.shape[:2])
  hint = "give targets with leading [B] axes for the same RoIs (vmap roi_targets)."
  _check_shape("box_deltas", box_deltas, tuple(class_logits.shape) + (4,),
               "one 4-vector per RoI and class, background included.")
  _check_shape("targets.labels", targets.labels, rows, hint)
  _check_shape("targets.valid", targets.valid, rows, hint)
  _check_shape("targets.box_targets", targets.box_targets, rows + (4,), hint)
  valid = targets.valid.astype(bool)
  labels = jnp.where(valid, targets.labels, 0).astype(jnp.int32)
  foreground = valid & (labels > 0)
  num_valid = jnp.sum(valid).astype(jnp.float32)
  log_probs = jax.nn.log_softmax(class_logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  classifier_loss = _masked_mean(nll, valid, num_valid)
  own = jnp.take_along_axis(box_deltas, labels[..., None, None], axis=2)[:, :, 0]
  box = jnp.sum(_smooth_l1(own.astype(jnp.float32) - targets.box_targets.astype(jnp.float32),
                           BOX_LOSS_BETA), axis=-1)
  box_loss = _masked_mean(box, foreground, num_valid)
  return classifier_loss, box_loss


def mask_targets(gt_masks: jax.Array, gt_frames: jax.Array, rois: jax.Array,
                 matched_idx: jax.Array, size: int = 28, threshold: Optional[float] = 0.5,
                 max_sampling: Optional[int] = None) -> jax.Array:
  """Mask targets of one image: each RoI's matched gt mask resampled on the RoI box.

  detectron2's `BitMasks.crop_and_resize`: RoIAlign (aligned, adaptive sampling, scale 1) of
  the 0/1 mask over the RoI, then `>= threshold`. Each mask lies in the image on its frame: a
  full-image mask has frame (0, 0, W, H) and shape (H, W); a mask cropped to its gt box and
  resized to Hm x Wm has that box as frame. RoIs map into mask coordinates as
  x' = (x - fx1) * Wm / (fx2 - fx1) (y likewise). Only each RoI's own mask is gathered and
  pooled, so the cost is O(S) masks whatever G. Use jax.vmap for a batch of images.

  Args:
    gt_masks: [G, Hm, Wm] 0/1 masks (any numeric or bool dtype), padded to a fixed G >= 1.
    gt_frames: [G, 4] (x1, y1, x2, y2) image region each mask covers. A frame with zero width
      or height (e.g. padding) gives all-zero targets.
    rois: [S, 4] RoI boxes in image coordinates.
    matched_idx: int [S] gt index of each RoI (`RoiTargets.matched_idx`).
    size: static output side M.
    threshold: binarisation threshold; None returns the resampled float values.
    max_sampling: static bound on RoIAlign's adaptive samples per bin and axis, in mask
      coordinates (see `roi_align`); the default is exact for RoIs that, mapped into mask
      coordinates, are no larger than the mask. Raise it for cropped masks, where RoIs larger
      than their gt box map onto more than Hm x Wm.

  Returns:
    float32 [S, size, size]: 0/1 targets, or resampled values when `threshold` is None.
  """
  gt_masks, gt_frames, rois = (jnp.asarray(a) for a in (gt_masks, gt_frames, rois))
  matched_idx = jnp.asarray(matched_idx)
  if gt_masks.ndim != 3 or gt_masks.shape[0] == 0:
    raise ValueError(f"gt_masks must have shape [G, Hm, Wm] with G >= 1, got "
                     f"{tuple(gt_masks.shape)}; pad to a fixed G >= 1 and vmap over images.")
  num_gt, mask_h, mask_w = gt_masks.shape
  _check_shape("gt_frames", gt_frames, (num_gt, 4), "one (x1, y1, x2, y2) frame per mask.")
  if rois.ndim != 2 or rois.shape[1] != 4:
    raise ValueError(f"rois must have shape [S, 4], got {tuple(rois.shape)}; vmap over images.")
  _check_shape("matched_idx", matched_idx, rois.shape[:1], "one gt index per RoI.")
  if not jnp.issubdtype(matched_idx.dtype, jnp.integer):
    raise ValueError(f"matched_idx must be integer gt indices, got dtype {matched_idx.dtype}.")
  idx = jnp.clip(matched_idx, 0, num_gt - 1)
  masks = gt_masks[idx].astype(jnp.float32)  # [S, Hm, Wm]
  frames = gt_frames[idx].astype(jnp.float32)
  rois = rois.astype(jnp.float32)
  frame_w = frames[:, 2] - frames[:, 0]
  frame_h = frames[:, 3] - frames[:, 1]
  has_area = (frame_w > 0) & (frame_h > 0)
  scale_x = mask_w / jnp.where(has_area, frame_w, 1.0)
  scale_y = mask_h / jnp.where(has_area, frame_h, 1.0)
  local = jnp.stack([(rois[:, 0] - frames[:, 0]) * scale_x, (rois[:, 1] - frames[:, 1]) * scale_y,
                     (rois[:, 2] - frames[:, 0]) * scale_x, (rois[:, 3] - frames[:, 1]) * scale_y],
                    axis=-1)
  local = jnp.where(has_area[:, None], local, 0.0)
  pooled = roi_align(masks[..., None], local[:, None], size, spatial_scale=1.0, sampling_ratio=0,
                     aligned=True, max_sampling=max_sampling)[:, 0, :, :, 0]
  if threshold is not None:
    pooled = (pooled >= threshold).astype(jnp.float32)
  return jnp.where(has_area[:, None, None], pooled, 0.0)


def mask_loss(mask_logits: jax.Array, labels: jax.Array, targets: jax.Array,
              weights: Optional[jax.Array] = None) -> jax.Array:
  """Mask-head loss, as torchvision's `maskrcnn_loss` on given targets.

  Args:
    mask_logits: [B, P, M, M, K + 1] per-class mask logits (channels last).
    labels: int [B, P]: the class channel of each foreground RoI; 0 for background RoIs and
      padding, which do not count.
    targets: [B, P, M, M] targets in [0, 1] (e.g. `mask_targets` vmapped over images).
    weights: optional float [B, P] weight of each foreground RoI (default 1), e.g. the
      n / slots of `segjax.ops.foreground_slots` when the RoIs are a random subset.

  Returns:
    float32 scalar: BCE with logits of each foreground RoI's own channel against its target,
    mean over all foreground pixels of the batch (weighted: sum of weight x pixel BCE over
    sum of weight x pixels); 0 (zero gradients) with no foreground RoI.
  """
  if mask_logits.ndim != 5 or mask_logits.shape[2] != mask_logits.shape[3]:
    raise ValueError(f"mask_logits must have shape [B, P, M, M, K + 1], got "
                     f"{tuple(mask_logits.shape)}.")
  rois = tuple(mask_logits.shape[:2])
  _check_shape("labels", labels, rois, "one class channel (0 = none) per RoI.")
  _check_shape("targets", targets, tuple(mask_logits.shape[:4]), "one M x M target per RoI.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integer class channels, got dtype {labels.dtype}.")
  total, count = mask_loss_sums(mask_logits, labels, targets, weights)
  return total / jnp.maximum(count, 1.0)


def mask_loss_sums(mask_logits: jax.Array, labels: jax.Array, targets: jax.Array,
                   weights: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
  """`mask_loss`'s numerator and denominator (float32 scalars), to add up over chunks of RoIs:
  the sum of weight x pixel BCE over the foreground RoIs and the sum of weight x pixels."""
  rois = tuple(mask_logits.shape[:2])
  foreground = labels > 0
  channel = jnp.where(foreground, labels, 0).astype(jnp.int32)
  logits = jnp.take_along_axis(mask_logits, channel[:, :, None, None, None], axis=-1)[..., 0]
  bce = _bce_with_logits(logits.astype(jnp.float32), targets.astype(jnp.float32))
  pixels = mask_logits.shape[2] * mask_logits.shape[3]
  if weights is None:
    weights = foreground.astype(jnp.float32)
  else:
    _check_shape("weights", weights, rois, "one weight per RoI.")
    weights = jnp.where(foreground, weights.astype(jnp.float32), 0.0)
  total = jnp.sum(jnp.where(foreground[:, :, None, None], bce * weights[:, :, None, None], 0.0))
  return total, jnp.sum(weights) * pixels
