"""Colour-coded label maps, palette label PNGs, overlays, image | ground truth |
prediction panels and drawn instance detections."""
import colorsys
import functools
from typing import Optional, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segjax import paths


def colorize(labels: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
  """(H, W) class ids -> (H, W, 3) uint8; ignored or unknown pixels are black."""
  labels = np.asarray(labels)
  valid = (labels >= 0) & (labels < len(palette)) & (labels != ignore_index)
  out = np.zeros(labels.shape + (3,), np.uint8)
  out[valid] = palette[labels[valid]]
  return out


def denormalize(image: np.ndarray, mean, std) -> np.ndarray:
  """Undoes `normalize` for display; a uint8 image (what the pipelines give) is shown as
  it is."""
  if np.asarray(image).dtype == np.uint8:
    return np.asarray(image)
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
  """Writes `array` as a PNG to a local or gs:// `path`."""
  paths.save_image(Image.fromarray(array), path)


def save_step_panel(directory: str, step: int, image: Optional[np.ndarray]) -> None:
  """Saves an evaluation's prediction panel (if any) as
  <directory>/predictions/step_<step>.png (a local or gs:// directory)."""
  if image is not None:
    folder = paths.path(directory) / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    save_png(folder / f"step_{step:07d}.png", image)


def _check_shape(array: np.ndarray, name: str, shape) -> np.ndarray:
  if array.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, array.shape)):
    expected = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
    raise ValueError(f"{name} has shape {array.shape}; expected {expected}.")
  return array


def instance_colors(num: int) -> np.ndarray:
  """(num, 3) uint8 distinct bright colours: hues spaced by the golden ratio."""
  hues = (np.arange(num) * 0.618033988749895 + 0.1) % 1.0
  colours = [colorsys.hsv_to_rgb(h, 0.85, 0.95) for h in hues]
  return np.round(np.array(colours, np.float64).reshape(num, 3) * 255).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _font():
  return ImageFont.load_default()


def _text_patch(text: str, colour: np.ndarray) -> np.ndarray:
  """(h, w, 3) uint8 label: `text` in black or white on a `colour` background."""
  font = _font()
  left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text,
                                                                              font=font)
  ink = Image.new("L", (right - left + 4, bottom - top + 4))
  ImageDraw.Draw(ink).text((2 - left, 2 - top), text, fill=255, font=font)
  ink = np.asarray(ink, np.float32)[..., None] / 255
  dark = np.dot(colour.astype(np.float32), [0.299, 0.587, 0.114]) > 140
  text_colour = np.zeros(3) if dark else np.full(3, 255)
  return np.round((1 - ink) * colour + ink * text_colour).astype(np.uint8)


def draw_instances(image: np.ndarray, boxes, classes, scores, masks, class_names: Sequence[str],
                   palette: Optional[np.ndarray] = None, *, valid=None,
                   score_threshold: float = 0.5, alpha: float = 0.5) -> np.ndarray:
  """Detections drawn on a copy of the image: masks, box outlines and labels.

  Each kept instance (valid, score >= score_threshold) gets its mask blended
  as `round((1 - alpha) * pixel + alpha * colour)`, a box outline (1 px on
  images under 128 px, else 2 px) and a "name score" label at the box's top
  left. Instances are drawn lowest score first, so the best ends on top.

  Args:
    image: (H, W, 3) uint8 image; not modified.
    boxes: (N, 4) x1, y1, x2, y2 in pixels (x2, y2 exclusive edges).
    classes: (N,) training ids, 0 <= id < len(class_names) where kept.
    scores: (N,) detection scores.
    masks: (N, H', W') bool, 0/1 or probability masks (foreground >= 0.5),
      pasted into the image, H' >= H and W' >= W (padding is ignored); or None
      to draw boxes only.
    class_names: label text per training id.
    palette: optional (K, 3) uint8 colour per training id; None gives every
      instance its own colour.
    valid: optional (N,) bool; False rows (padding) are not drawn.
    score_threshold: instances scoring below it are not drawn.
    alpha: mask opacity in [0, 1].

  Returns:
    (H, W, 3) uint8 image.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"image must be a (H, W, 3) uint8 array; got {image.shape} {image.dtype}.")
  height, width = image.shape[:2]
  boxes = _check_shape(np.asarray(boxes, np.float64), "boxes", (None, 4))
  num = boxes.shape[0]
  classes = _check_shape(np.asarray(classes), "classes", (num,))
  scores = _check_shape(np.asarray(scores, np.float64), "scores", (num,))
  valid = np.ones(num, bool) if valid is None else _check_shape(
      np.asarray(valid), "valid", (num,)).astype(bool)
  if not np.issubdtype(classes.dtype, np.integer):
    raise ValueError(f"classes must be an integer array; got {classes.dtype}.")
  if not 0 <= alpha <= 1:
    raise ValueError(f"alpha must lie in [0, 1]; got {alpha}.")
  if masks is not None:
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[0] != num or masks.shape[1] < height or (
        masks.shape[2] < width):
      raise ValueError(f"masks has shape {masks.shape}; expected ({num}, H, W) with H >= "
                       f"{height} and W >= {width}, the image's size.")
  keep = valid & (scores >= score_threshold)
  bad = keep & ((classes < 0) | (classes >= len(class_names)))
  if bad.any():
    raise ValueError(f"classes {np.unique(classes[bad]).tolist()} of drawn instances are "
                     f"outside the {len(class_names)} class_names.")
  if not np.isfinite(boxes[keep]).all():
    raise ValueError("Drawn instances have non-finite boxes.")
  if palette is None:
    colours = instance_colors(num)
  else:
    palette = np.asarray(palette)
    if palette.dtype != np.uint8 or palette.ndim != 2 or palette.shape[1] != 3 or (
        len(palette) < len(class_names)):
      raise ValueError(f"palette must be a ({len(class_names)}, 3) uint8 array, a colour per "
                       f"class; got {palette.shape} {palette.dtype}.")
    colours = palette[np.where(keep, classes, 0)]

  out = image.copy()
  thickness = 1 if min(height, width) < 128 else 2
  order = [int(i) for i in np.argsort(scores, kind="stable") if keep[i]]
  for i in order:
    colour = colours[i].astype(np.float64)
    if masks is not None:
      inside = masks[i, :height, :width] >= 0.5
      out[inside] = np.round((1 - alpha) * out[inside] + alpha * colour).astype(np.uint8)
    x1, y1, x2, y2 = np.round(boxes[i]).astype(np.int64)
    x1, x2 = np.clip([x1, x2], 0, width)
    y1, y2 = np.clip([y1, y2], 0, height)
    if x2 > x1 and y2 > y1:
      t = min(thickness, x2 - x1, y2 - y1)
      for rows, cols in ((slice(y1, y1 + t), slice(x1, x2)), (slice(y2 - t, y2), slice(x1, x2)),
                         (slice(y1, y2), slice(x1, x1 + t)), (slice(y1, y2), slice(x2 - t, x2))):
        out[rows, cols] = colours[i]
    label = _text_patch(f"{class_names[int(classes[i])]} {scores[i]:.2f}", colours[i])
    label = label[:height, :width]
    top = y1 - label.shape[0] if y1 >= label.shape[0] else min(y1, height - label.shape[0])
    left = min(x1, width - label.shape[1])
    out[top:top + label.shape[0], left:left + label.shape[1]] = label
  return out
