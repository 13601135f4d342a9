"""Colour-coded label maps and image | ground truth | prediction panels."""
import numpy as np
from PIL import Image


def colorize(labels: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
  """(H, W) class ids -> (H, W, 3) uint8; ignored or unknown pixels are black."""
  labels = np.asarray(labels)
  valid = (labels >= 0) & (labels < len(palette)) & (labels != ignore_index)
  out = np.zeros(labels.shape + (3,), np.uint8)
  out[valid] = palette[labels[valid]]
  return out


def denormalize(image: np.ndarray, mean, std) -> np.ndarray:
  """Undoes `normalize` for display."""
  image = np.asarray(image, np.float32) * np.asarray(std) + np.asarray(mean)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def panel(images, labels, predictions, palette, ignore_index: int, mean, std,
          max_rows: int = 4) -> np.ndarray:
  """Rows of image | ground truth | prediction, separated by white lines."""
  rows = []
  for image, label, pred in list(zip(images, labels, predictions))[:max_rows]:
    # Models that predict only the central region (unet_valid): centre the prediction.
    dy, dx = label.shape[0] - pred.shape[0], label.shape[1] - pred.shape[1]
    pred = np.pad(pred, ((dy // 2, dy - dy // 2), (dx // 2, dx - dx // 2)),
                  constant_values=ignore_index)
    row = [denormalize(image, mean, std), colorize(label, palette, ignore_index),
           colorize(pred, palette, ignore_index)]
    sep = np.full((row[0].shape[0], 2, 3), 255, np.uint8)
    rows.append(np.concatenate([row[0], sep, row[1], sep, row[2]], axis=1))
    rows.append(np.full((2, rows[-1].shape[1], 3), 255, np.uint8))
  return np.concatenate(rows[:-1], axis=0)


def save_png(path: str, array: np.ndarray) -> None:
  Image.fromarray(array).save(path)
