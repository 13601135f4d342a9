"""Promptable masks for single images of any size (segment_anything's SamPredictor).

`SamPredictor.set_image` embeds an image once: resized so that its longest side is the
model's image_size (PIL bilinear), normalized and padded (segjax.models.sam.transforms).
`predict` and `predict_points` then decode prompts given in the image's own pixels into
mask logits at that size (the low-resolution masks upscaled, cropped and resized as the
reference's postprocess_masks). Both steps are jitted; the decoder sees a static number
of queries per call, so a generator feeding it batches of points compiles once.
It is also the `PointPrompter` of the automatic mask generator.
"""
import functools
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from segjax.models.sam import transforms


class ImageState(NamedTuple):
  """An embedded image: its embedding [1, g, g, C], the resized size (before padding)
  and the original size, both (h, w)."""
  embedding: Any
  input_size: Tuple[int, int]
  original_size: Tuple[int, int]


@functools.lru_cache(maxsize=8)
def _compiled(model):
  """(embed, decode) jitted for `model`, shared by every predictor of an equal model (so a
  second predictor, e.g. predict.py's next call in the same process, compiles nothing)."""
  def decode(variables, embedding, prompts, *, input_size, original_size, multimask_output):
    low_res, iou = model.apply(variables, embedding, **prompts,
                               multimask_output=multimask_output, method=type(model).decode)
    masks = transforms.postprocess_masks(low_res[0], input_size, original_size,
                                         model.image_size)
    return masks, iou[0], low_res[0]
  return (jax.jit(functools.partial(model.apply, method=type(model).embed_image)),
          jax.jit(decode, static_argnames=("input_size", "original_size", "multimask_output")))


class SamPredictor:
  """Masks for prompts on one image at a time, from a SAM model and its variables."""

  mask_threshold = 0.0

  def __init__(self, model, variables):
    self.model, self.variables = model, variables
    self.image_size = int(model.image_size)
    self._embed, self._decode = _compiled(model)

  def set_image(self, image: np.ndarray) -> ImageState:
    """Embeds an RGB uint8 [h, w, 3] image."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise ValueError(f"SAM predicts on RGB uint8 images [h, w, 3], got {image.dtype} "
                       f"{image.shape}.")
    resized = transforms.resize_longest_side(image, self.image_size)
    x = transforms.normalize_and_pad(resized, self.image_size, self.model.pixel_mean,
                                     self.model.pixel_std)
    embedding = self._embed(self.variables, jnp.asarray(x)[None])
    return ImageState(embedding, tuple(resized.shape[:2]), tuple(image.shape[:2]))

  def predict(self, state: ImageState, point_coords: Optional[np.ndarray] = None,
              point_labels: Optional[np.ndarray] = None, boxes: Optional[np.ndarray] = None,
              multimask_output: bool = True):
    """(mask logits [Q, M, h, w] at the original size, predicted IoUs [Q, M], low-res
    logits [Q, M, 4g, 4g]) for Q queries: point_coords [Q, N, 2] (x, y in the original
    image's pixels) with point_labels [Q, N] (1 foreground, 0 background), and/or boxes
    [Q, 4] (x0, y0, x1, y1). M = 3 with multimask_output, else 1."""
    if point_coords is None and boxes is None:
      raise ValueError("SAM needs a prompt: points (with labels) or boxes.")
    prompts = {}
    if point_coords is not None:
      coords = np.asarray(point_coords, np.float64)
      labels = np.asarray(point_labels if point_labels is not None
                          else np.ones(coords.shape[:-1]), np.int32)
      if coords.ndim != 3 or coords.shape[-1] != 2 or labels.shape != coords.shape[:-1]:
        raise ValueError(f"Points must be [queries, points, 2] with labels [queries, points], "
                         f"got {coords.shape} and {labels.shape}.")
      prompts["point_coords"] = jnp.asarray(transforms.apply_coords(
          coords, state.original_size, self.image_size), jnp.float32)[None]
      prompts["point_labels"] = jnp.asarray(labels)[None]
    if boxes is not None:
      boxes = np.asarray(boxes, np.float64)
      if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"Boxes must be [queries, 4] (x0, y0, x1, y1), got {boxes.shape}.")
      prompts["boxes"] = jnp.asarray(transforms.apply_boxes(
          boxes, state.original_size, self.image_size), jnp.float32)[None]
    return self._decode(self.variables, state.embedding, prompts,
                        input_size=state.input_size, original_size=state.original_size,
                        multimask_output=multimask_output)

  def predict_points(self, state: ImageState, points: np.ndarray):
    """PointPrompter: 3 mask logits [B, 3, h, w] and IoUs [B, 3] for B single foreground
    points [B, 2]."""
    masks, iou, _ = self.predict(state, np.asarray(points)[:, None, :],
                                 np.ones((len(points), 1), np.int32))
    return masks, iou


def parse_points(text: str) -> np.ndarray:
  """"x,y;x,y" -> float [N, 2] (a ValueError naming the format otherwise)."""
  return _parse(text, 2, "--points", "x,y;x,y")


def parse_boxes(text: str) -> np.ndarray:
  """"x0,y0,x1,y1;..." -> float [N, 4]."""
  boxes = _parse(text, 4, "--boxes", "x0,y0,x1,y1;x0,y0,x1,y1")
  if np.any(boxes[:, 2:] < boxes[:, :2]):
    raise ValueError(f"--boxes {text!r} has a box with x1 < x0 or y1 < y0; give each box as "
                     "x0,y0,x1,y1 (top-left, then bottom-right corner).")
  return boxes


def parse_labels(text: str, count: int) -> np.ndarray:
  """"1,0,..." -> int [count] of 1 (foreground) and 0 (background)."""
  try:
    labels = np.array([int(v) for v in text.split(",")], np.int32)
  except ValueError:
    labels = None
  if labels is None or labels.shape != (count,) or not np.all((labels == 0) | (labels == 1)):
    raise ValueError(f"--point_labels {text!r} must be {count} comma-separated 1s "
                     "(foreground) and 0s (background), one per point of --points.")
  return labels


def _parse(text: str, width: int, flag: str, example: str) -> np.ndarray:
  try:
    rows = [[float(v) for v in item.split(",")] for item in text.split(";") if item.strip()]
  except ValueError:
    rows = None
  if not rows or any(len(r) != width for r in rows) or not np.all(np.isfinite(rows)):
    raise ValueError(f"{flag} {text!r} is not of the form {example!r} (pixels of the input "
                     "image).")
  return np.asarray(rows, np.float64)


def best_masks(masks: np.ndarray, iou: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Per query, the mask [Q, h, w] of highest predicted IoU among its M, and that IoU."""
  best = np.argmax(iou, axis=1)
  rows = np.arange(len(best))
  return masks[rows, best], iou[rows, best]


def prompt_queries(points: Optional[np.ndarray], labels: Optional[np.ndarray],
                   boxes: Optional[np.ndarray]) -> Sequence[dict]:
  """The queries of predict.py's prompts: all points (with labels) form one query, together
  with the box when there is one box; several boxes are one query each."""
  if points is None and boxes is None:
    raise ValueError("No prompt: give --points and/or --boxes (or --automatic).")
  if points is not None and boxes is not None and len(boxes) > 1:
    raise ValueError("--points with several --boxes is ambiguous; give points with at most "
                     "one box (they form one prompt), or boxes alone (one prompt each).")
  if points is not None:
    labels = np.ones(len(points), np.int32) if labels is None else labels
    query = {"point_coords": points[None], "point_labels": labels[None]}
    if boxes is not None:
      query["boxes"] = boxes
    return [query]
  return [{"boxes": boxes}]
