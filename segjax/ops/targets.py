"""Static-shape target assignment and sampling for the RPN and R-CNN box heads.

Follows torchvision's `models.detection` training path (`Matcher`,
`BalancedPositiveNegativeSampler`, `RegionProposalNetwork.assign_targets_to_anchors`,
`RoIHeads.select_training_samples`), rewritten so that every shape is fixed: ground truth is
padded to a fixed count G with a `gt_valid` mask, random subsets come from top-k on random
scores, and the sampled RoIs are a fixed-size set padded with invalid rows. Every function is
jittable and vmap-able over a batch of images (one PRNG key per image).

Crowd boxes (`gt_is_crowd`, COCO `iscrowd`) never match; as in Detectron, predictions that are
not positive and lie mostly inside a crowd box (intersection over the prediction's own area
>= `crowd_ioa`) are ignored rather than used as negatives.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from segjax.ops.boxes import box_area, encode_boxes, pairwise_iou

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


class RpnTargets(NamedTuple):
  """RPN training targets for A anchors of one image.

  Attributes:
    labels: int32 [A]: 1 sampled positive, 0 sampled negative, -1 not sampled.
    box_targets: float [A, 4]: encoded matched gt boxes for sampled positives, 0 elsewhere.
    weights: float [A]: 1 for sampled anchors (positive or negative), 0 elsewhere.
  """
  labels: jax.Array
  box_targets: jax.Array
  weights: jax.Array


class RoiTargets(NamedTuple):
  """R-CNN head training targets: S = `batch_size_per_image` sampled RoIs of one image.

  Rows are the sampled candidates in ascending candidate order (proposals, then appended gt),
  followed by invalid padding rows.

  Attributes:
    boxes: float [S, 4]: sampled RoI boxes; 0 on padding rows.
    labels: int32 [S]: 0 background (and padding), gt class + 1 for foreground.
    box_targets: float [S, 4]: encoded matched gt box for foreground rows, 0 elsewhere.
    matched_idx: int32 [S]: index of the matched gt (for mask targets) on foreground rows; 0
      elsewhere, as torchvision's clamped indices. Use `labels > 0` to select foreground.
    valid: bool [S]: False on padding rows (fewer than S candidates could be sampled).
  """
  boxes: jax.Array
  labels: jax.Array
  box_targets: jax.Array
  matched_idx: jax.Array
  valid: jax.Array


def _check_thresholds(high, low):
  if not low <= high:
    raise ValueError(f"low threshold {low} must be <= high threshold {high}; swap them.")


def _check_gt(gt_boxes, gt_valid, gt_is_crowd):
  """Returns (gt_boxes, gt_valid, gt_is_crowd) as arrays after checking their shapes."""
  gt_boxes = jnp.asarray(gt_boxes)
  if gt_boxes.ndim != 2 or gt_boxes.shape[1] != 4 or gt_boxes.shape[0] == 0:
    raise ValueError(f"gt_boxes must have shape [G, 4] with G >= 1, got {gt_boxes.shape}; pad "
                     "ground truth to a fixed count G >= 1 and mark padding in gt_valid.")
  num_gt = gt_boxes.shape[0]
  gt_valid = jnp.asarray(gt_valid).astype(bool)
  if gt_valid.shape != (num_gt,):
    raise ValueError(f"gt_valid must have shape [{num_gt}] (one flag per gt box), got "
                     f"{gt_valid.shape}.")
  if gt_is_crowd is None:
    gt_is_crowd = jnp.zeros((num_gt,), bool)
  gt_is_crowd = jnp.asarray(gt_is_crowd).astype(bool)
  if gt_is_crowd.shape != (num_gt,):
    raise ValueError(f"gt_is_crowd must have shape [{num_gt}] (one flag per gt box), got "
                     f"{gt_is_crowd.shape}.")
  return gt_boxes, gt_valid, gt_is_crowd


def match(quality, high, low, allow_low_quality_matches=False, gt_valid=None):
  """Matches each of N predictions to its best ground truth, as torchvision's `Matcher`.

  Args:
    quality: match quality (usually IoU) [G, N] between G gt and N predicted boxes.
    high: quality >= `high` is a match.
    low: quality < `low` gives BELOW_LOW_THRESHOLD (-1); `low <= quality < high` gives
      BETWEEN_THRESHOLDS (-2).
    allow_low_quality_matches: if True, every prediction that has the highest quality (ties
      included) for some valid gt keeps its best-gt match even when below `high`.
    gt_valid: optional bool [G]; invalid (padding) gts never match. With no valid gt every
      prediction is BELOW_LOW_THRESHOLD.

  Returns:
    int32 [N]: matched gt index in [0, G), or -1 / -2.
  """
  _check_thresholds(high, low)
  quality = jnp.asarray(quality)
  if quality.ndim != 2 or quality.shape[0] == 0 or quality.shape[1] == 0:
    raise ValueError(f"quality must have shape [G, N] with G, N >= 1, got {quality.shape}; pad "
                     "ground truth to a fixed count and pass gt_valid.")
  num_gt = quality.shape[0]
  gt_valid = (jnp.ones((num_gt,), bool) if gt_valid is None
              else jnp.asarray(gt_valid).astype(bool))
  if gt_valid.shape != (num_gt,):
    raise ValueError(f"gt_valid must have shape [{num_gt}], got {gt_valid.shape}.")
  masked = jnp.where(gt_valid[:, None], quality, -jnp.inf)
  best_gt = jnp.argmax(masked, axis=0).astype(jnp.int32)
  best_val = jnp.max(masked, axis=0)
  matches = jnp.where(best_val < low, BELOW_LOW_THRESHOLD,
                      jnp.where(best_val < high, BETWEEN_THRESHOLDS, best_gt))
  if allow_low_quality_matches:
    best_per_gt = jnp.max(masked, axis=1, keepdims=True)
    is_best = (masked == best_per_gt) & gt_valid[:, None]
    matches = jnp.where(jnp.any(is_best, axis=0), best_gt, matches)
  return matches.astype(jnp.int32)


def _random_subset(mask, limit, bound, key):
  """Uniformly random subset of min(mask.sum(), limit) True entries of `mask`.

  `bound` is a static upper bound of the traced `limit`; the subset is the top `bound` random
  scores among masked entries, truncated to `limit`.
  """
  n = mask.shape[0]
  k = min(bound, n)
  if k == 0:
    return jnp.zeros((n,), bool)
  scores = jnp.where(mask, jax.random.uniform(key, (n,)), -1.0)
  values, idx = jax.lax.top_k(scores, k)
  take = (values >= 0) & (jnp.arange(k) < limit)
  return jnp.zeros((n,), bool).at[idx].max(take)


def sample_balanced(labels, num_samples, positive_fraction, rng):
  """Samples positives and negatives, as torchvision's `BalancedPositiveNegativeSampler`.

  num_pos = min(#positives, int(num_samples * positive_fraction)) and
  num_neg = min(#negatives, num_samples - num_pos), each a uniformly random subset.

  Args:
    labels: int [N]: >= 1 positive, 0 negative, -1 ignored (never sampled).
    num_samples: static total number of samples wanted.
    positive_fraction: static wanted fraction of positives, in [0, 1].
    rng: PRNG key.

  Returns:
    (sampled_pos, sampled_neg): bool masks [N].
  """
  labels = jnp.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must have shape [N], got {labels.shape}; vmap over a batch.")
  if not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples must be a positive Python int, got {num_samples!r}.")
  if not 0.0 <= positive_fraction <= 1.0:
    raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}.")
  pos_key, neg_key = jax.random.split(rng)
  max_pos = int(num_samples * positive_fraction)
  sampled_pos = _random_subset(labels >= 1, max_pos, max_pos, pos_key)
  num_neg_wanted = num_samples - jnp.sum(sampled_pos)
  sampled_neg = _random_subset(labels == 0, num_neg_wanted, num_samples, neg_key)
  return sampled_pos, sampled_neg


def _crowd_covered(boxes, gt_boxes, crowd, crowd_ioa):
  """bool [N]: boxes whose intersection with some crowd gt covers >= crowd_ioa of their area."""
  lt = jnp.maximum(boxes[:, None, :2], gt_boxes[None, :, :2])
  rb = jnp.minimum(boxes[:, None, 2:], gt_boxes[None, :, 2:])
  wh = jnp.clip(rb - lt, 0)
  inter = wh[..., 0] * wh[..., 1]
  area = box_area(boxes)[:, None]
  ioa = jnp.where(area > 0, inter / jnp.where(area > 0, area, 1), 0)
  return jnp.any((ioa >= crowd_ioa) & crowd[None, :], axis=1)


def _safe_encode(gt_boxes, matches, boxes, foreground, weights):
  """encode_boxes of each box's matched gt on `foreground` rows, 0 elsewhere (never NaN)."""
  unit = jnp.array([0.0, 0.0, 1.0, 1.0], boxes.dtype)
  matched = gt_boxes[jnp.clip(matches, 0)].astype(boxes.dtype)
  reference = jnp.where(foreground[:, None], matched, unit)
  deltas = encode_boxes(reference, jnp.where(foreground[:, None], boxes, unit), weights)
  return jnp.where(foreground[:, None], deltas, 0)


def rpn_targets(anchors, gt_boxes, gt_valid, rng, *, gt_is_crowd=None, high=0.7, low=0.3,
                batch_size_per_image=256, positive_fraction=0.5, weights=(1.0, 1.0, 1.0, 1.0),
                crowd_ioa=0.7):
  """Objectness labels and box regression targets for A anchors of one image.

  As torchvision's RPN: Matcher(high, low, allow_low_quality_matches=True) on anchor/gt IoU;
  matched anchors are positive, below `low` negative, in between ignored; then balanced
  sampling of `batch_size_per_image` anchors. An image without valid gt is all negative.

  Args:
    anchors: [A, 4] anchors (x1, y1, x2, y2).
    gt_boxes: [G, 4] gt boxes padded to a fixed G >= 1.
    gt_valid: bool [G], False on padding.
    rng: PRNG key for sampling.
    gt_is_crowd: optional bool [G] crowd flags.
    weights: box coder weights; torchvision's RPN uses (1, 1, 1, 1).
    crowd_ioa: anchors covered by a crowd box this much are ignored unless positive.

  Returns:
    RpnTargets.
  """
  anchors = jnp.asarray(anchors)
  if anchors.ndim != 2 or anchors.shape[1] != 4:
    raise ValueError(f"anchors must have shape [A, 4], got {anchors.shape}.")
  gt_boxes, gt_valid, gt_is_crowd = _check_gt(gt_boxes, gt_valid, gt_is_crowd)
  matchable = gt_valid & ~gt_is_crowd
  matches = match(pairwise_iou(gt_boxes, anchors), high, low, True, matchable)
  labels = jnp.where(matches >= 0, 1, jnp.where(matches == BELOW_LOW_THRESHOLD, 0, -1))
  crowd = _crowd_covered(anchors, gt_boxes, gt_valid & gt_is_crowd, crowd_ioa)
  labels = jnp.where(crowd & (labels == 0), -1, labels)
  sampled_pos, sampled_neg = sample_balanced(labels, batch_size_per_image, positive_fraction, rng)
  out_labels = jnp.where(sampled_pos, 1, jnp.where(sampled_neg, 0, -1)).astype(jnp.int32)
  box_targets = _safe_encode(gt_boxes, matches, anchors, sampled_pos, weights)
  return RpnTargets(out_labels, box_targets, (sampled_pos | sampled_neg).astype(anchors.dtype))


def roi_targets(proposals, gt_boxes, gt_classes, gt_valid, rng, *, proposal_valid=None,
                gt_is_crowd=None, fg_iou=0.5, bg_iou=0.5, batch_size_per_image=512,
                positive_fraction=0.25, add_gt_as_proposals=True,
                weights=(10.0, 10.0, 5.0, 5.0), crowd_ioa=0.7):
  """Samples a fixed set of S = `batch_size_per_image` RoIs with their head targets.

  As torchvision's `RoIHeads.select_training_samples`: gt boxes are appended to the
  proposals, candidates are matched with Matcher(fg_iou, bg_iou) without low-quality matches
  (IoU < bg_iou is background, in between ignored), then balanced sampling.

  Args:
    proposals: [P, 4] proposal boxes.
    gt_boxes: [G, 4] gt boxes padded to a fixed G >= 1.
    gt_classes: int [G] 0-based gt classes (label = class + 1; 0 is background).
    gt_valid: bool [G], False on padding.
    rng: PRNG key for sampling.
    proposal_valid: optional bool [P], False on padded proposals (never sampled).
    gt_is_crowd: optional bool [G] crowd flags; crowd boxes are not appended as proposals.
    crowd_ioa: non-foreground candidates covered by a crowd box this much are not sampled.

  Returns:
    RoiTargets with S rows.
  """
  proposals = jnp.asarray(proposals)
  if proposals.ndim != 2 or proposals.shape[1] != 4:
    raise ValueError(f"proposals must have shape [P, 4], got {proposals.shape}.")
  gt_boxes, gt_valid, gt_is_crowd = _check_gt(gt_boxes, gt_valid, gt_is_crowd)
  gt_classes = jnp.asarray(gt_classes)
  if gt_classes.shape != gt_valid.shape:
    raise ValueError(f"gt_classes must have shape {gt_valid.shape} like gt_valid, got "
                     f"{gt_classes.shape}.")
  num_props = proposals.shape[0]
  cand_valid = (jnp.ones((num_props,), bool) if proposal_valid is None
                else jnp.asarray(proposal_valid).astype(bool))
  if cand_valid.shape != (num_props,):
    raise ValueError(f"proposal_valid must have shape [{num_props}], got {cand_valid.shape}.")
  matchable = gt_valid & ~gt_is_crowd
  boxes = proposals
  if add_gt_as_proposals:
    boxes = jnp.concatenate([proposals, gt_boxes.astype(proposals.dtype)])
    cand_valid = jnp.concatenate([cand_valid, matchable])
  if boxes.shape[0] == 0:
    raise ValueError("no candidate RoIs: pass at least one proposal or add_gt_as_proposals.")
  matches = match(pairwise_iou(gt_boxes, boxes), fg_iou, bg_iou, False, matchable)
  sample_labels = jnp.where(matches >= 0, 1, jnp.where(matches == BELOW_LOW_THRESHOLD, 0, -1))
  crowd = _crowd_covered(boxes, gt_boxes, gt_valid & gt_is_crowd, crowd_ioa)
  sample_labels = jnp.where((crowd & (sample_labels == 0)) | ~cand_valid, -1, sample_labels)
  sampled_pos, sampled_neg = sample_balanced(sample_labels, batch_size_per_image,
                                             positive_fraction, rng)
  selected = sampled_pos | sampled_neg
  (rows,) = jnp.nonzero(selected, size=batch_size_per_image, fill_value=0)
  valid = jnp.arange(batch_size_per_image) < jnp.sum(selected)
  foreground = valid & sampled_pos[rows]
  row_matches = jnp.where(foreground, matches[rows], 0).astype(jnp.int32)
  out_boxes = jnp.where(valid[:, None], boxes[rows], 0)
  labels = jnp.where(foreground, gt_classes[row_matches].astype(jnp.int32) + 1, 0)
  box_targets = _safe_encode(gt_boxes, row_matches, out_boxes, foreground, weights)
  return RoiTargets(out_boxes, labels.astype(jnp.int32), box_targets, row_matches, valid)


def foreground_slots(foreground, slots, rng):
  """Up to `slots` foreground rows of one image, an unbiased random subset when there are more.

  The mask head trains on a fixed number of RoI slots per image. When the image has n <= slots
  foreground rows all of them are taken, each with weight 1; when n > slots a uniformly random
  subset of `slots` of them is taken, each with weight n / slots. A loss that sums per-RoI
  terms times these weights then has, over the draw, the expectation of the sum over all n
  rows: each row is drawn with probability slots / n. Remaining slots are filled with
  non-foreground rows (weight 0).

  Args:
    foreground: bool [S]: the rows that are foreground (e.g. `RoiTargets.labels > 0`).
    slots: static number of slots, 1 <= slots (more than S is the same as S).
    rng: PRNG key of the draw.

  Returns:
    (rows int32 [min(slots, S)] into the S rows, foreground rows first; taken bool, True on
    the foreground rows taken; weights float32, n / max(taken count, 1) on them, 0 elsewhere).
  """
  foreground = jnp.asarray(foreground).astype(bool)
  if foreground.ndim != 1:
    raise ValueError(f"foreground must have shape [S], got {foreground.shape}; vmap over images.")
  if not isinstance(slots, int) or slots < 1:
    raise ValueError(f"slots must be a positive Python int (a static shape), got {slots!r}.")
  k = min(slots, foreground.shape[0])
  priority = jnp.where(foreground, 1.0, 0.0) + jax.random.uniform(rng, foreground.shape)
  _, rows = jax.lax.top_k(priority, k)
  taken = foreground[rows]
  count = jnp.sum(foreground).astype(jnp.float32)
  weights = jnp.where(taken, count / jnp.maximum(jnp.sum(taken), 1).astype(jnp.float32), 0.0)
  return rows.astype(jnp.int32), taken, weights
