"""Detection ops with static shapes: boxes, anchors, NMS, RoIAlign, target
assignment and sampling, mask pasting."""
from segjax.ops.anchors import cell_anchors, generate_anchors
from segjax.ops.boxes import box_area, clip_boxes, decode_boxes, encode_boxes, pairwise_iou
from segjax.ops.masks import paste_masks
from segjax.ops.nms import batched_nms, nms
from segjax.ops.roi_align import fpn_levels, multilevel_roi_align, roi_align, roi_pool
from segjax.ops.targets import (RoiTargets, RpnTargets, foreground_slots, match, roi_targets,
                                rpn_targets, sample_balanced)

__all__ = ["RoiTargets", "RpnTargets", "batched_nms", "box_area", "cell_anchors", "clip_boxes",
           "decode_boxes", "encode_boxes", "foreground_slots", "fpn_levels", "generate_anchors",
           "match", "multilevel_roi_align", "nms", "pairwise_iou", "paste_masks", "roi_align",
           "roi_pool", "roi_targets", "rpn_targets", "sample_balanced"]
