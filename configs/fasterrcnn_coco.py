"""Faster R-CNN R50-FPN on COCO 2017 instances (boxes only), detectron2's 1x schedule.

The recipe of `maskrcnn_coco.py` without the mask head and mask data:
detectron2 faster_rcnn_R_50_FPN_1x. Variants: ``, `3x`, `smoke`.
"""
from configs import maskrcnn_coco


def get_config(variant: str = ""):
  return maskrcnn_coco.get_config(variant, mask=False)
