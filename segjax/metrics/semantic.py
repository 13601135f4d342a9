"""Semantic segmentation metrics with mmsegmentation's IoUMetric definitions.

A (num_classes x num_classes) confusion matrix (rows: ground truth, columns:
prediction) is accumulated on device over the whole split; per-class
intersection = diagonal, union = row sum + column sum - diagonal. Pixels at the
ignore index are dropped.
"""
from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(predictions: jax.Array, labels: jax.Array, num_classes: int,
                     ignore_index: int = 255) -> jax.Array:
  """(num_classes, num_classes) int32 counts of (label, prediction) pairs. Labels and
  predictions are taken as int32 (uint8 labels times num_classes would wrap around)."""
  labels, predictions = labels.astype(jnp.int32), predictions.astype(jnp.int32)
  valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  index = jnp.where(valid, labels * num_classes + predictions, 0).reshape(-1)
  counts = jnp.zeros((num_classes * num_classes,), jnp.int32)
  counts = counts.at[index].add(valid.reshape(-1).astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


def segmentation_metrics(confusion: np.ndarray, beta: float = 1.0) -> Dict[str, np.ndarray]:
  """mmsegmentation's IoUMetric numbers from a confusion matrix.

  Per class: IoU = I / U, Acc = I / label area (also `Recall`), Dice = 2 I /
  (label area + prediction area), Precision = I / prediction area, Fscore =
  (1 + beta^2) P R / (beta^2 P + R). Means (mIoU, mAcc, mDice, mPrecision,
  mRecall, mFscore) are nanmeans: a class absent from both labels and
  predictions has NaN and is left out. aAcc = total I / total labelled pixels.
  """
  confusion = np.asarray(confusion, np.float64)
  intersection = np.diag(confusion)
  label_area = confusion.sum(axis=1)
  pred_area = confusion.sum(axis=0)
  union = label_area + pred_area - intersection
  with np.errstate(invalid="ignore", divide="ignore"):
    per_class = {"IoU": intersection / union, "Acc": intersection / label_area,
                 "Dice": 2 * intersection / (label_area + pred_area),
                 "Precision": intersection / pred_area, "Recall": intersection / label_area}
    precision, recall = per_class["Precision"], per_class["Recall"]
    per_class["Fscore"] = (1 + beta**2) * precision * recall / (beta**2 * precision + recall)
    aacc = intersection.sum() / label_area.sum()
  metrics = {"aAcc": aacc, **per_class}
  for name, values in per_class.items():
    metrics[f"m{name}"] = np.nanmean(values) if np.any(~np.isnan(values)) else np.nan
  return metrics


def format_iou_table(metrics: Dict[str, np.ndarray], class_names: Sequence[str]) -> str:
  """A per-class IoU/Acc table in percent, like mmsegmentation's log."""
  width = max(len("class"), *(len(n) for n in class_names))
  lines = [f"| {'class':<{width}} |   IoU |   Acc |", f"|{'-' * (width + 2)}|-------|-------|"]
  for name, iou, acc in zip(class_names, metrics["IoU"], metrics["Acc"]):
    lines.append(f"| {name:<{width}} | {100 * iou:5.2f} | {100 * acc:5.2f} |")
  lines.append(f"mIoU {100 * metrics['mIoU']:.2f}  aAcc {100 * metrics['aAcc']:.2f}  "
               f"mAcc {100 * metrics['mAcc']:.2f}")
  return "\n".join(lines)
