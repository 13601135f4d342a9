"""Evaluation metrics."""
from segjax.metrics.semantic import (confusion_matrix, format_iou_table,
                                     segmentation_metrics)

__all__ = ["confusion_matrix", "format_iou_table", "segmentation_metrics"]
