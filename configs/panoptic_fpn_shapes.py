"""Panoptic FPN on the embedded segjax_shapes dataset: four thing classes (disk,
square, triangle, ring) as instances, three stuff classes (sky, grass, wall) from
the semantic head, fused into COCO-style panoptic maps and scored with PQ.

The scaled-down Mask R-CNN of `maskrcnn_shapes.py` with a 64-channel semantic FPN
head (GroupNorm off at this width), loss weight 0.5 on the semantic term
(detectron2's), and the heuristic fusion with a stuff area limit of 64 pixels
(4096 is for COCO-sized images). Variants: "" and `:smoke` (tiny, for CI);
`--config.model.options.fusion=parameter_free` uses the UPSNet-style head.
"""
from configs import maskrcnn_shapes


def get_config(variant: str = ""):
  config = maskrcnn_shapes.get_config(variant)
  config.unlock()
  config.model.name = "panoptic_fpn"
  config.model.options.fusion = "heuristic"
  config.model.options.semantic_channels = 64 if variant != "smoke" else 16
  config.model.options.semantic_norm = ""
  config.inference.panoptic.stuff_area_threshold = 64
  config.lock()
  return config
