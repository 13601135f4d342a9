"""Evaluation metrics: semantic (mmseg's IoUMetric), COCO AP (pycocotools)."""
from segjax.metrics.coco import (CocoEvaluator, coco_evaluate, format_coco_table,
                                 to_coco_results)
from segjax.metrics.semantic import (confusion_matrix, format_iou_table,
                                     segmentation_metrics)

__all__ = ["CocoEvaluator", "coco_evaluate", "confusion_matrix", "format_coco_table",
           "format_iou_table", "segmentation_metrics", "to_coco_results"]
