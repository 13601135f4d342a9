"""Colour-coded label maps, palette label PNGs, overlays and image | ground truth |
prediction panels."""
import cv2
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
  """Rows of image | ground truth | prediction, separated by white lines.

  Rows may differ in size; an image of another size than its label (a
  mirror-padded U-Net input, a resized test image) is shown resized to it.
  """
  rows = []
  for image, label, pred in list(zip(images, labels, predictions))[:max_rows]:
    # Models that predict only the central region (unet_valid): centre the prediction.
    dy, dx = label.shape[0] - pred.shape[0], label.shape[1] - pred.shape[1]
    pred = np.pad(pred, ((dy // 2, dy - dy // 2), (dx // 2, dx - dx // 2)),
                  constant_values=ignore_index)
    image = denormalize(image, mean, std)
    if image.shape[:2] != label.shape:
      image = cv2.resize(image, label.shape[::-1], interpolation=cv2.INTER_LINEAR)
    row = [image, colorize(label, palette, ignore_index), colorize(pred, palette, ignore_index)]
    sep = np.full((row[0].shape[0], 2, 3), 255, np.uint8)
    rows.append(np.concatenate([row[0], sep, row[1], sep, row[2]], axis=1))
  width = max(row.shape[1] for row in rows)
  out = []
  for row in rows:
    out += [np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0))),
            np.full((2, width, 3), 255, np.uint8)]
  return np.concatenate(out[:-1], axis=0)


def label_png(labels: np.ndarray, palette: np.ndarray) -> Image.Image:
  """A palette ("P" mode) PNG: pixel values are class ids, colours the dataset's
  (ids beyond the classes, such as the ignore index, are black)."""
  image = Image.fromarray(labels.astype(np.uint8), mode="P")
  colours = np.zeros((256, 3), np.uint8)
  colours[:len(palette)] = palette
  image.putpalette(colours.reshape(-1).tolist())
  return image


def overlay(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, ignore_index: int,
            alpha: float = 0.5) -> np.ndarray:
  """The image blended with the colour-coded labels."""
  colours = colorize(labels, palette, ignore_index).astype(np.float32)
  return np.round((1 - alpha) * image + alpha * colours).astype(np.uint8)


def save_png(path: str, array: np.ndarray) -> None:
  Image.fromarray(array).save(path)
