"""Mask R-CNN and Faster R-CNN (He et al., 2017; Ren et al., 2015) with static shapes.

The model is torchvision's `maskrcnn_resnet50_fpn` (`fasterrcnn_resnet50_fpn` with
`mask=False`) rebuilt from segjax parts so that every array has a fixed shape, which is what
XLA on TPU needs: a `ResNetFPN` backbone (P2-P6), an `RPNHead` on all five levels with
torchvision's anchors, `propose` (per-level top-k, NMS, fixed proposal slots), the box head on
RoIAlign features of P2-P5 and, for Mask R-CNN, the FCN mask head. Ground truth comes padded
to a fixed count G with a validity mask, sampled RoIs are fixed-size sets with validity masks,
and the mask head runs on a fixed number of foreground slots.

Two entry points:
  `model.apply(variables, images)` runs inference and returns padded detections;
  `model.apply(variables, images, targets, rng, method="losses")` returns the training
  losses (RPN objectness and box, classifier, box regression, mask).
"""
from typing import Any, Dict, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.losses.detection import fast_rcnn_losses, mask_loss_sums, mask_targets, rpn_losses
from segjax.models.fpn import ResNetFPN
from segjax.models.registry import MODELS
from segjax.models.roi_heads import BoxHead, MaskHead, postprocess_detections
from segjax.models.rpn import RPNHead, propose
from segjax.ops import (foreground_slots, generate_anchors, multilevel_roi_align, roi_targets,
                        rpn_targets)

RPN_LEVELS = ("p2", "p3", "p4", "p5", "p6")
ROI_LEVELS = ("p2", "p3", "p4", "p5")
STRIDES = (4, 8, 16, 32, 64)
LOSS_NAMES = ("rpn_objectness", "rpn_box", "classifier", "box", "mask")


@MODELS.register("mask_rcnn")
class MaskRCNN(nn.Module):
  """Two-stage instance segmentation (or detection only, with `mask=False`).

  Defaults are torchvision's `maskrcnn_resnet50_fpn`. `num_classes` counts foreground classes
  K; the heads predict K + 1 with index 0 the background, so class c has label c + 1.
  RoIAlign defaults to torchvision's pooler (sampling_ratio 2, aligned=False); detectron2's
  ROIAlignV2 is `roi_sampling_ratio=0, roi_aligned=True`.
  """
  num_classes: int
  mask: bool = True
  backbone: str = "resnet50"
  backbone_width: int = 64
  fpn_channels: int = 256
  frozen_bn: bool = True
  trainable_layers: int = 3
  anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512)
  aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
  rpn_pre_nms_top_n_train: int = 2000
  rpn_post_nms_top_n_train: int = 2000
  rpn_pre_nms_top_n_test: int = 1000
  rpn_post_nms_top_n_test: int = 1000
  rpn_nms_thresh: float = 0.7
  rpn_fg_iou: float = 0.7
  rpn_bg_iou: float = 0.3
  rpn_batch_size_per_image: int = 256
  rpn_positive_fraction: float = 0.5
  box_fg_iou: float = 0.5
  box_bg_iou: float = 0.5
  box_batch_size_per_image: int = 512
  box_positive_fraction: float = 0.25
  representation_size: int = 1024
  roi_sampling_ratio: int = 2
  roi_aligned: bool = False
  box_score_thresh: float = 0.05
  box_nms_thresh: float = 0.5
  detections_per_img: int = 100
  box_pre_nms_top_k: Optional[int] = 1000
  mask_channels: int = 256
  mask_num_convs: int = 4
  # Foreground RoI slots per image the mask head trains on (at most every foreground RoI the
  # sampler can draw, int(box_batch_size_per_image * box_positive_fraction), 128 with
  # torchvision's settings; None: that many). An image with more foreground RoIs than slots
  # trains on a uniformly random subset of them, weighted so that the mask loss stays
  # unbiased (`segjax.ops.foreground_slots`): sampling noise, as the RoI sampler's own. 32
  # (default) made the R50-FPN step 1.6x faster on the CPU (benchmarks/RESULTS.md).
  mask_slots: Optional[int] = 32
  # The mask branch (RoIAlign, head, targets, loss) runs on the slots in chunks of this many per
  # image, foreground first, and a chunk with no foreground RoI in any image of the batch is
  # skipped at run time (lax.cond): its cost follows the batch's largest foreground count, as
  # torchvision's follows its foreground RoIs, not the static slot count. 0 (default): one pass
  # over all; on the CPU chunks of 16 made the R50-FPN step 4.8x slower (benchmarks/RESULTS.md),
  # so they are for accelerators to try, unmeasured there yet.
  mask_chunk: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  task = "instance"
  # Where ImageNet encoder weights (`model.init_from`) go in the parameter tree.
  pretrained_path = ("backbone", "backbone")

  def setup(self):
    if len(self.anchor_sizes) != len(STRIDES):
      raise ValueError(f"anchor_sizes needs one size per level {RPN_LEVELS}, got "
                       f"{tuple(self.anchor_sizes)}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.body = ResNetFPN(self.backbone, self.fpn_channels, self.frozen_bn,
                          self.trainable_layers, self.backbone_width, name="backbone", **kw)
    self.rpn_head = RPNHead(num_anchors=len(self.aspect_ratios), **kw)
    self.box_head = BoxHead(self.num_classes, self.representation_size, **kw)
    if self.mask:
      self.mask_head = MaskHead(self.num_classes, self.mask_channels, self.mask_num_convs, **kw)

  def _features(self, images, train: bool):
    """(FPN features {"p2".."p6"}, RPN objectness and deltas per level, anchors per level)."""
    features = self.body(images, train)
    objectness, deltas = self.rpn_head([features[k] for k in RPN_LEVELS])
    anchors = generate_anchors(images.shape[1:3], STRIDES, tuple(self.anchor_sizes),
                               tuple(self.aspect_ratios),
                               [features[k].shape[1:3] for k in RPN_LEVELS])
    return features, objectness, deltas, anchors

  def _proposals(self, objectness, deltas, anchors, image_sizes, train: bool):
    """Fixed proposal slots per image: (boxes [B, N, 4], valid [B, N])."""
    pre, post = ((self.rpn_pre_nms_top_n_train, self.rpn_post_nms_top_n_train) if train else
                 (self.rpn_pre_nms_top_n_test, self.rpn_post_nms_top_n_test))

    def one(obj, dlt, size):
      boxes, _, valid = propose(obj, dlt, anchors, size, pre_nms_top_n=pre, post_nms_top_n=post,
                                nms_thresh=self.rpn_nms_thresh)
      return boxes, valid
    return jax.vmap(one)(objectness, deltas, image_sizes)

  def _pool(self, levels, boxes, size: int):
    return multilevel_roi_align(levels, jax.lax.stop_gradient(boxes), size,
                                sampling_ratio=self.roi_sampling_ratio,
                                aligned=self.roi_aligned).astype(self.dtype)

  def __call__(self, images, train: bool = False, image_sizes=None) -> Dict[str, jax.Array]:
    """Detections of a batch of normalized NHWC images.

    Args:
      images: [B, H, W, 3] float.
      train: BatchNorm mode (only with frozen_bn=False); inference either way.
      image_sizes: optional int [B, 2] (h, w) of each image's valid region inside the padded
        batch; boxes are clipped to it. Default: the whole padded size.

    Returns:
      boxes [B, D, 4] (x1, y1, x2, y2 pixels), scores [B, D], classes [B, D] (0-based
      foreground class), valid [B, D] bool, with D = detections_per_img, best first; with
      `mask`, also masks [B, D, 28, 28]: the mask probabilities of each detection's class on
      its box, to paste with `segjax.ops.paste_masks`.
    """
    out = self._detect(*self._features(images, train), images, image_sizes)
    out.pop("mask_logits", None)
    return out

  def _detect(self, features, objectness, deltas, anchors, images, image_sizes):
    """Inference detections (as `__call__`, plus the RoI `mask_logits` of each class)."""
    batch = images.shape[0]
    if image_sizes is None:
      image_sizes = jnp.tile(jnp.asarray(images.shape[1:3], jnp.int32), (batch, 1))
    levels = [features[k] for k in ROI_LEVELS]
    proposals, proposal_valid = self._proposals(objectness, deltas, anchors, image_sizes, False)
    class_logits, box_deltas = self.box_head(self._pool(levels, proposals, 7))

    def detect(logits, dlt, props, valid, size):
      return postprocess_detections(
          logits.astype(jnp.float32), dlt.astype(jnp.float32), props, valid, size,
          score_thresh=self.box_score_thresh, nms_thresh=self.box_nms_thresh,
          detections_per_img=self.detections_per_img, pre_nms_top_k=self.box_pre_nms_top_k)
    boxes, scores, classes, valid = jax.vmap(detect)(class_logits, box_deltas, proposals,
                                                     proposal_valid, image_sizes)
    out = {"boxes": boxes, "scores": scores, "classes": classes, "valid": valid}
    if self.mask:
      logits = self.mask_head(self._pool(levels, boxes, 14)).astype(jnp.float32)
      own = jnp.take_along_axis(logits, (classes + 1)[:, :, None, None, None], axis=-1)[..., 0]
      out["masks"] = jnp.where(valid[:, :, None, None], jax.nn.sigmoid(own), 0.0)
      out["mask_logits"] = own
    return out

  def losses(self, images, targets: Mapping[str, jax.Array], rng: jax.Array,
             train: bool = True) -> Dict[str, jax.Array]:
    """The training losses of a batch, keyed by `LOSS_NAMES` ("mask" only with `mask`).

    Args:
      images: [B, H, W, 3] normalized images.
      targets: ground truth padded to G rows per image: `boxes` [B, G, 4] (x1, y1, x2, y2),
        `classes` [B, G] 0-based, `instance_valid` [B, G] bool, optional `is_crowd` [B, G];
        for masks either `masks` [B, G, H, W] image-sized 0/1 masks or `box_masks`
        [B, G, S, S] masks cropped to their boxes.
      rng: PRNG key for anchor and RoI sampling.
      train: BatchNorm mode (only with frozen_bn=False).
    """
    return self._detector_losses(*self._features(images, train), images, targets, rng)

  def _detector_losses(self, features, objectness, deltas, anchors, images, targets, rng):
    """The losses of `losses` from computed features."""
    batch = images.shape[0]
    gt_boxes = targets["boxes"].astype(jnp.float32)
    gt_valid = targets["instance_valid"].astype(bool)
    gt_classes = jnp.where(gt_valid, targets["classes"], 0).astype(jnp.int32)
    gt_crowd = targets.get("is_crowd")
    gt_crowd = (jnp.zeros_like(gt_valid) if gt_crowd is None else gt_crowd.astype(bool))
    image_sizes = jnp.tile(jnp.asarray(images.shape[1:3], jnp.int32), (batch, 1))
    rpn_rng, roi_rng = jax.random.split(rng)
    levels = [features[k] for k in ROI_LEVELS]
    all_anchors = jnp.concatenate(anchors)
    rpn_t = jax.vmap(lambda b, v, c, k: rpn_targets(
        all_anchors, b, v, k, gt_is_crowd=c, high=self.rpn_fg_iou, low=self.rpn_bg_iou,
        batch_size_per_image=self.rpn_batch_size_per_image,
        positive_fraction=self.rpn_positive_fraction))(
            gt_boxes, gt_valid, gt_crowd, jax.random.split(rpn_rng, batch))
    rpn_objectness, rpn_box = rpn_losses(
        jnp.concatenate(objectness, axis=1).astype(jnp.float32),
        jnp.concatenate(deltas, axis=1).astype(jnp.float32), rpn_t)

    proposals, proposal_valid = self._proposals(objectness, deltas, anchors, image_sizes, True)
    roi_t = jax.vmap(lambda p, pv, b, c, v, cr, k: roi_targets(
        p, b, c, v, k, proposal_valid=pv, gt_is_crowd=cr, fg_iou=self.box_fg_iou,
        bg_iou=self.box_bg_iou, batch_size_per_image=self.box_batch_size_per_image,
        positive_fraction=self.box_positive_fraction))(
            proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, gt_crowd,
            jax.random.split(roi_rng, batch))
    class_logits, box_deltas = self.box_head(self._pool(levels, roi_t.boxes, 7))
    classifier, box = fast_rcnn_losses(class_logits.astype(jnp.float32),
                                       box_deltas.astype(jnp.float32), roi_t)
    out = {"rpn_objectness": rpn_objectness, "rpn_box": rpn_box, "classifier": classifier,
           "box": box}
    if self.mask:
      out["mask"] = self._mask_loss(levels, roi_t, targets, gt_boxes,
                                    jax.random.fold_in(rng, 2))
    return out

  def mask_slot_count(self) -> int:
    """RoI slots per image the mask head trains on: `mask_slots`, by default (and at most) the
    most foreground RoIs the sampler can draw, int(box_batch_size_per_image *
    box_positive_fraction)."""
    most = max(1, int(self.box_batch_size_per_image * self.box_positive_fraction))
    if self.mask_slots is not None and (not isinstance(self.mask_slots, int)
                                        or self.mask_slots < 1):
      raise ValueError(f"mask_slots must be a positive number of RoIs (or None), got "
                       f"{self.mask_slots!r}.")
    return min(most, self.mask_slots or most)

  def _mask_loss(self, levels, roi_t, targets, gt_boxes, rng):
    """Mask BCE on the foreground RoIs, gathered into `mask_slot_count()` fixed slots per
    image, foreground first: all of them when they fit, otherwise a uniformly random subset,
    each RoI weighted by (foreground count) / slots so that the loss's expectation is
    torchvision's mean over all foreground RoIs (`segjax.ops.foreground_slots`). The slots
    run in chunks of `mask_chunk`, skipping those without foreground (`_mask_sums`)."""
    slots = self.mask_slot_count()
    if not isinstance(self.mask_chunk, int) or self.mask_chunk < 0:
      raise ValueError(f"mask_chunk must be a non-negative int (0: no chunks), got "
                       f"{self.mask_chunk!r}.")
    rows, taken, weights = jax.vmap(lambda f, k: foreground_slots(f, slots, k))(
        roi_t.labels > 0, jax.random.split(rng, roi_t.labels.shape[0]))
    take = lambda x: jnp.take_along_axis(x, rows.reshape(rows.shape + (1,) * (x.ndim - 2)),
                                         axis=1)
    rois, labels, matched = take(roi_t.boxes), take(roi_t.labels), take(roi_t.matched_idx)
    labels = jnp.where(taken, labels, 0)
    if "box_masks" in targets:
      gt_masks, frames = targets["box_masks"], gt_boxes
    elif "masks" in targets:
      gt_masks = targets["masks"]
      h, w = gt_masks.shape[2:]
      frames = jnp.broadcast_to(jnp.asarray([0.0, 0.0, w, h], jnp.float32), gt_boxes.shape)
    else:
      raise ValueError("Mask R-CNN training needs instance masks: `masks` [B, G, H, W] or "
                       "`box_masks` [B, G, S, S] in the batch; add them in the data ops or "
                       "train Faster R-CNN (model.options.mask=False).")
    chunk = min(self.mask_chunk or slots, rows.shape[1])
    if self.is_initializing() or chunk >= rows.shape[1]:
      total, count = self._mask_sums(self.mask_head, levels, rois, labels, matched, weights,
                                     gt_masks, frames)
    else:
      params = self.mask_head.variables["params"]
      head = MaskHead(self.num_classes, self.mask_channels, self.mask_num_convs,
                      dtype=self.dtype, param_dtype=self.param_dtype, parent=None)
      run = lambda p, *a: self._mask_sums(lambda x: head.apply({"params": p}, x), *a)
      skip = lambda *_: (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
      total = count = jnp.zeros((), jnp.float32)
      for start in range(0, rows.shape[1], chunk):
        part = lambda x: x[:, start:start + chunk]
        t, c = jax.lax.cond(jnp.any(part(labels) > 0), run, skip, params, levels, part(rois),
                            part(labels), part(matched), part(weights), gt_masks, frames)
        total, count = total + t, count + c
    return total / jnp.maximum(count, 1.0)

  def _mask_sums(self, head, levels, rois, labels, matched, weights, gt_masks, frames):
    """(sum of weight x pixel BCE, sum of weight x pixels) of the mask loss on these slots."""
    logits = head(self._pool(levels, rois, 14)).astype(jnp.float32)
    size = logits.shape[2]
    mask_t = jax.vmap(lambda m, f, r, i: mask_targets(m, f, r, i, size))(  # gathers, then floats
        gt_masks, frames, rois, matched)
    return mask_loss_sums(logits, labels, mask_t, weights)

  def frozen_params_mask(self, params: Mapping[str, Any]) -> Any:
    """True on parameters that never train (the frozen backbone stages), for the optimizer."""
    backbone = ResNetFPN(self.backbone, self.fpn_channels, self.frozen_bn, self.trainable_layers,
                         self.backbone_width, parent=None)
    return {name: (backbone.frozen_params_mask(tree) if name == "backbone"
                   else jax.tree.map(lambda _: False, tree))
            for name, tree in params.items()}
