"""Evaluation metrics: semantic (mmseg's IoUMetric), COCO AP (pycocotools),
panoptic quality (panopticapi's pq_compute)."""
from segjax.metrics.coco import (CocoEvaluator, coco_evaluate, format_coco_table,
                                 to_coco_results)
from segjax.metrics.panoptic import PQAccumulator, format_pq_table, pq_compute
from segjax.metrics.semantic import (confusion_matrix, format_iou_table,
                                     segmentation_metrics)

__all__ = ["CocoEvaluator", "coco_evaluate", "confusion_matrix", "format_coco_table",
           "format_iou_table", "format_pq_table", "PQAccumulator", "pq_compute",
           "segmentation_metrics", "to_coco_results"]
