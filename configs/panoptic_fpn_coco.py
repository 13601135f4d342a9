"""Panoptic FPN R50-FPN on COCO 2017 panoptic, detectron2's 1x schedule.

detectron2 panoptic_fpn_R_50_1x: the Mask R-CNN of `maskrcnn_coco.py` (same
backbone, RPN, heads, optimizer and 90k-step schedule, short side 640-800) plus a
semantic FPN head (128 channels, GroupNorm) predicting the 53 stuff classes and
one "things" class, loss weight 0.5; heuristic fusion with detectron2's
thresholds (overlap 0.5, stuff area 4096, instance score 0.5). Evaluation resizes
the short side to 800 and scores PQ against each image's panoptic PNG at its
original size. Data: `coco_panoptic` (see README). Variants: ``, `3x`, `smoke`
(tiny, on segjax_shapes).
"""
from configs import maskrcnn_coco, panoptic_fpn_shapes


def get_config(variant: str = ""):
  if variant == "smoke":
    return panoptic_fpn_shapes.get_config("smoke")
  config = maskrcnn_coco.get_config(variant)
  config.unlock()
  config.model.name = "panoptic_fpn"
  config.model.options.update(fusion="heuristic", semantic_channels=128, semantic_norm="GN")
  config.data.name = "coco_panoptic"
  config.data.train_ops = config.data.train_ops.replace(
      "pad_instances(max_instances=100)", "pad_instances(max_instances=100, max_segments=200)")
  config.data.eval_ops = ("unpack_instances|resize(scale=(1333, 800), resize_labels=False)|"
                          "pad(size=(1344, 1344), label_size=(640, 640))|"
                          "pad_instances(max_instances=100, max_segments=200)")
  config.lock()
  return config
