"""SAM's automatic mask generator: masks for a whole image from a grid of point prompts.

Semantics and defaults of `segment_anything.SamAutomaticMaskGenerator` (1.0): for the
whole image and, with `crop_n_layers` > 0, for overlapping crops of it (layer i cuts
2^i x 2^i crops), a regular grid of single foreground points is run through the model
in batches of `points_per_batch` (each point gives 3 masks). Masks are kept when the
model's predicted IoU exceeds `pred_iou_thresh` and their stability score (the IoU of
the mask binarized at threshold +/- `stability_score_offset` on the logits) reaches
`stability_score_thresh`, and dropped when their box touches a crop edge that is not an
image edge. Box NMS removes duplicates within a crop (by predicted IoU) and then across
crops (smaller crops first). With `min_mask_region_area` > 0, small holes and islands
are removed and a last NMS prefers the masks that cleaning left unchanged.

The model is reached through a `PointPrompter`, so the same filtering runs on any SAM
implementation. Batches have a static shape: the last one is padded with repeated
points marked invalid, so one compiled decoder call serves every batch; the per-mask
statistics (stability, boxes, filters) are computed on the device.
"""
import dataclasses
import functools
import itertools
import math
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from segjax.ops.nms import nms
from segjax.ops import regions, rle

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
EDGE_TOLERANCE = 20.0  # pixels: a box this close to a crop edge touches it


class PointPrompter(Protocol):
  """A SAM model behind the interface the generator needs."""

  mask_threshold: float  # logits above it are mask pixels (0.0 for SAM)

  def set_image(self, image: np.ndarray) -> Any:
    """The image's embedding state for `predict_points` (image: RGB uint8 [h, w, 3])."""

  def predict_points(self, state: Any, points: np.ndarray) -> Tuple[Any, Any]:
    """(mask logits [B, 3, h, w] at the size of the image given to `set_image`, predicted
    IoUs [B, 3]) for single foreground points [B, 2] (x, y in that image's pixels)."""


# ----------------------------------------------------------------------------- grids, crops

def point_grid(n_per_side: int) -> np.ndarray:
  """[n^2, 2] (x, y) centres of an n x n grid of cells over [0, 1]^2, row by row."""
  offset = 1 / (2 * n_per_side)
  side = np.linspace(offset, 1 - offset, n_per_side)
  xs, ys = np.meshgrid(side, side)
  return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def layer_point_grids(n_per_side: int, n_layers: int, downscale: int) -> List[np.ndarray]:
  """The point grid of each crop layer: layer i has int(n / downscale^i) points a side."""
  if int(n_per_side / downscale**n_layers) < 1:
    raise ValueError(f"points_per_side {n_per_side} leaves no points in crop layer {n_layers} "
                     f"(downscaled by {downscale}^{n_layers}); use more points, fewer crop "
                     "layers or a smaller crop_n_points_downscale_factor.")
  return [point_grid(int(n_per_side / downscale**i)) for i in range(n_layers + 1)]


def crop_boxes(image_size: Tuple[int, int], n_layers: int,
               overlap_ratio: float) -> Tuple[List[List[int]], List[int]]:
  """(crop boxes [x0, y0, x1, y1], their layer): the whole image, then for layer i >= 1 a
  2^i x 2^i set of crops overlapping by overlap_ratio * short side * 2 / 2^i pixels
  (column by column)."""
  h, w = image_size
  boxes, layers = [[0, 0, w, h]], [0]
  for layer in range(1, n_layers + 1):
    n = 2**layer
    overlap = int(overlap_ratio * min(h, w) * (2 / n))
    crop_w = int(math.ceil((overlap * (n - 1) + w) / n))
    crop_h = int(math.ceil((overlap * (n - 1) + h) / n))
    x0s = [int((crop_w - overlap) * i) for i in range(n)]
    y0s = [int((crop_h - overlap) * i) for i in range(n)]
    for x0, y0 in itertools.product(x0s, y0s):
      boxes.append([x0, y0, min(x0 + crop_w, w), min(y0 + crop_h, h)])
      layers.append(layer)
  return boxes, layers


# ----------------------------------------------------------------------- per-mask statistics

def stability_score(logits, mask_threshold: float, offset: float):
  """IoU of the masks binarized at `mask_threshold` + and - `offset`: [..., h, w] -> [...]
  (NaN when both are empty)."""
  inner = jnp.sum(logits > mask_threshold + offset, axis=(-2, -1), dtype=jnp.int32)
  outer = jnp.sum(logits > mask_threshold - offset, axis=(-2, -1), dtype=jnp.int32)
  return inner.astype(jnp.float32) / outer.astype(jnp.float32)


def masks_to_boxes(masks):
  """Boxes [..., 4] (x0, y0, x1, y1; inclusive pixel indices) around bool masks
  [..., h, w]; [0, 0, 0, 0] for an empty mask."""
  h, w = masks.shape[-2:]

  def extent(present, size):  # present [..., size] -> first, last index
    idx = jnp.arange(size, dtype=jnp.int32)
    last = jnp.max(jnp.where(present, idx, -1), axis=-1)
    first = jnp.min(jnp.where(present, idx, size), axis=-1)
    return first, last

  top, bottom = extent(jnp.any(masks, axis=-1), h)
  left, right = extent(jnp.any(masks, axis=-2), w)
  boxes = jnp.stack([left, top, right, bottom], axis=-1)
  return jnp.where((bottom >= 0)[..., None], boxes, 0)


def near_crop_edge(boxes, crop_box, image_box, atol: float = EDGE_TOLERANCE):
  """[...] bool: boxes [..., 4] in crop coordinates within `atol` pixels of an edge of
  `crop_box` that is not also an edge of `image_box` (both [x0, y0, x1, y1])."""
  crop_box = jnp.asarray(crop_box, jnp.float32)
  image_box = jnp.asarray(image_box, jnp.float32)
  shifted = boxes.astype(jnp.float32) + jnp.concatenate([crop_box[:2], crop_box[:2]])
  at_crop = jnp.abs(shifted - crop_box) <= atol
  at_image = jnp.abs(shifted - image_box) <= atol
  return jnp.any(at_crop & ~at_image, axis=-1)


@functools.partial(jax.jit, static_argnames=("mask_threshold", "offset", "iou_thresh",
                                             "stability_thresh"))
def _batch_candidates(logits, iou_preds, valid, crop_box, image_box, *, mask_threshold,
                      offset, iou_thresh, stability_thresh):
  """Per mask of one batch [B, M]: kept?, stability, box (crop coordinates), and the bit-packed
  binary masks [B, M, h, ceil(w / 8)]."""
  stability = stability_score(logits, mask_threshold, offset)
  masks = logits > mask_threshold
  boxes = masks_to_boxes(masks)
  keep = jnp.broadcast_to(valid[:, None], iou_preds.shape)
  if iou_thresh > 0:
    keep &= iou_preds > iou_thresh
  if stability_thresh > 0:
    keep &= stability >= stability_thresh
  keep &= ~near_crop_edge(boxes, crop_box, image_box)
  return keep, stability, boxes, jnp.packbits(masks, axis=-1)


# --------------------------------------------------------------------------------- NMS, host

@functools.partial(jax.jit, static_argnames="size")
def _padded_nms(boxes, scores, valid, iou_threshold, *, size):
  return nms(boxes, scores, iou_threshold, size, valid=valid)


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
  """Indices kept by greedy NMS (torchvision's `nms`: by descending score, ties in index
  order, IoU > threshold suppresses), by descending score. Inputs are padded to a power
  of two, so few shapes compile."""
  n = len(boxes)
  if n == 0:
    return np.zeros((0,), np.int64)
  size = max(256, 1 << (n - 1).bit_length())
  pad = size - n
  padded_boxes = np.pad(np.asarray(boxes, np.float32), ((0, pad), (0, 0)))
  padded_scores = np.pad(np.asarray(scores, np.float32), (0, pad))
  valid = np.arange(size) < n
  idx, count = _padded_nms(padded_boxes, padded_scores, valid, np.float32(iou_threshold),
                           size=size)
  return np.asarray(idx)[:int(count)].astype(np.int64)


def _host_box(mask: np.ndarray) -> np.ndarray:
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  if rows.size == 0:
    return np.zeros(4, np.int64)
  return np.array([cols[0], rows[0], cols[-1], rows[-1]], np.int64)


def _xywh(box) -> List[int]:
  x0, y0, x1, y1 = (int(v) for v in box)
  return [x0, y0, x1 - x0, y1 - y0]


@dataclasses.dataclass
class _Masks:
  """Candidate masks, one entry per mask, in generation order."""
  masks: List[np.ndarray]  # bool, at crop size until uncropped, then RLEs
  iou_preds: np.ndarray  # float32
  stability: np.ndarray  # float32
  boxes: np.ndarray  # int64 [N, 4]
  points: np.ndarray  # float64 [N, 2]
  crop_boxes: np.ndarray  # int64 [N, 4]

  def take(self, idx: np.ndarray) -> "_Masks":
    return _Masks([self.masks[i] for i in idx], self.iou_preds[idx], self.stability[idx],
                  self.boxes[idx], self.points[idx], self.crop_boxes[idx])

  @staticmethod
  def cat(parts: Sequence["_Masks"]) -> "_Masks":
    return _Masks(sum((p.masks for p in parts), []),
                  np.concatenate([p.iou_preds for p in parts]),
                  np.concatenate([p.stability for p in parts]),
                  np.concatenate([p.boxes for p in parts]).reshape(-1, 4),
                  np.concatenate([p.points for p in parts]).reshape(-1, 2),
                  np.concatenate([p.crop_boxes for p in parts]).reshape(-1, 4))


class AutomaticMaskGenerator:
  """Masks of everything in an image, from a SAM model behind a `PointPrompter`.

  Arguments and defaults are those of `segment_anything.SamAutomaticMaskGenerator`:
  points_per_side (or explicit `point_grids`, one [n, 2] array in [0, 1] per crop layer),
  points_per_batch, pred_iou_thresh, stability_score_thresh, stability_score_offset,
  box_nms_thresh, crop_n_layers, crop_nms_thresh, crop_overlap_ratio,
  crop_n_points_downscale_factor, min_mask_region_area, output_mode ("binary_mask",
  "uncompressed_rle" or "coco_rle").
  """

  def __init__(self, prompter: PointPrompter, points_per_side: Optional[int] = 32,
               points_per_batch: int = 64, pred_iou_thresh: float = 0.88,
               stability_score_thresh: float = 0.95, stability_score_offset: float = 1.0,
               box_nms_thresh: float = 0.7, crop_n_layers: int = 0,
               crop_nms_thresh: float = 0.7, crop_overlap_ratio: float = 512 / 1500,
               crop_n_points_downscale_factor: int = 1,
               point_grids: Optional[Sequence[np.ndarray]] = None,
               min_mask_region_area: int = 0, output_mode: str = "binary_mask"):
    if (points_per_side is None) == (point_grids is None):
      raise ValueError("Give exactly one of points_per_side and point_grids.")
    if output_mode not in OUTPUT_MODES:
      raise ValueError(f"Unknown output_mode {output_mode!r}; use one of "
                       f"{', '.join(OUTPUT_MODES)}.")
    if points_per_batch < 1 or crop_n_layers < 0:
      raise ValueError(f"points_per_batch must be >= 1 and crop_n_layers >= 0, got "
                       f"{points_per_batch} and {crop_n_layers}.")
    if points_per_side is not None:
      if points_per_side < 1 or crop_n_points_downscale_factor < 1:
        raise ValueError(f"points_per_side and crop_n_points_downscale_factor must be >= 1, "
                         f"got {points_per_side} and {crop_n_points_downscale_factor}.")
      point_grids = layer_point_grids(points_per_side, crop_n_layers,
                                      crop_n_points_downscale_factor)
    point_grids = [np.asarray(g, np.float64).reshape(-1, 2) for g in point_grids]
    if len(point_grids) < crop_n_layers + 1:
      raise ValueError(f"point_grids has {len(point_grids)} grids but crop_n_layers = "
                       f"{crop_n_layers} needs {crop_n_layers + 1}, one per layer.")
    self.prompter = prompter
    self.point_grids = point_grids
    self.points_per_batch = points_per_batch
    self.pred_iou_thresh = pred_iou_thresh
    self.stability_score_thresh = stability_score_thresh
    self.stability_score_offset = stability_score_offset
    self.box_nms_thresh = box_nms_thresh
    self.crop_n_layers = crop_n_layers
    self.crop_nms_thresh = crop_nms_thresh
    self.crop_overlap_ratio = crop_overlap_ratio
    self.min_mask_region_area = min_mask_region_area
    self.output_mode = output_mode

  def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
    """One record per mask: segmentation (bool [h, w] or RLE per output_mode), area,
    bbox [x, y, w, h], predicted_iou, point_coords [[x, y]], stability_score, crop_box
    [x, y, w, h]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise ValueError(f"The image must be RGB uint8 [h, w, 3], got {image.dtype} "
                       f"{image.shape}.")
    data = self._generate(image)
    if self.min_mask_region_area > 0 and data.masks:
      data = self._remove_small_regions(data)
    records = []
    for i, mask_rle in enumerate(data.masks):
      if self.output_mode == "coco_rle":
        segmentation = rle.coco_rle(mask_rle)
      elif self.output_mode == "binary_mask":
        segmentation = rle.rle_to_mask(mask_rle)
      else:
        segmentation = mask_rle
      records.append({
          "segmentation": segmentation,
          "area": rle.rle_area(mask_rle),
          "bbox": _xywh(data.boxes[i]),
          "predicted_iou": float(data.iou_preds[i]),
          "point_coords": [[float(v) for v in data.points[i]]],
          "stability_score": float(data.stability[i]),
          "crop_box": _xywh(data.crop_boxes[i]),
      })
    return records

  def _generate(self, image: np.ndarray) -> _Masks:
    h, w = image.shape[:2]
    boxes, layers = crop_boxes((h, w), self.crop_n_layers, self.crop_overlap_ratio)
    data = _Masks.cat([self._process_crop(image, box, layer) for box, layer in
                       zip(boxes, layers)])
    if len(boxes) > 1 and data.masks:
      crop = data.crop_boxes
      scores = 1 / ((crop[:, 2] - crop[:, 0]) * (crop[:, 3] - crop[:, 1])).astype(np.float32)
      data = data.take(box_nms(data.boxes, scores, self.crop_nms_thresh))
    return data

  def _process_crop(self, image: np.ndarray, box: List[int], layer: int) -> _Masks:
    x0, y0, x1, y1 = box
    h, w = image.shape[:2]
    crop = np.ascontiguousarray(image[y0:y1, x0:x1])
    state = self.prompter.set_image(crop)
    points = self.point_grids[layer] * np.array([[x1 - x0, y1 - y0]], np.float64)
    parts = [self._process_batch(state, points[i:i + self.points_per_batch], box, (h, w))
             for i in range(0, len(points), self.points_per_batch)]
    data = _Masks.cat(parts)
    data = data.take(box_nms(data.boxes, data.iou_preds, self.box_nms_thresh))
    shift = np.array([x0, y0, x0, y0], np.int64)
    data.boxes = data.boxes + shift
    data.points = data.points + shift[:2]
    data.masks = [rle.mask_to_rle(np.pad(m, ((y0, h - y1), (x0, w - x1)))) for m in data.masks]
    return data

  def _process_batch(self, state, points: np.ndarray, box: List[int],
                     image_size: Tuple[int, int]) -> _Masks:
    n = len(points)
    padded = np.concatenate([points, np.repeat(points[:1], self.points_per_batch - n, 0)])
    valid = np.arange(self.points_per_batch) < n
    logits, iou_preds = self.prompter.predict_points(state, padded)
    keep, stability, boxes, packed = _batch_candidates(
        logits, iou_preds, valid, np.asarray(box, np.float32),
        np.array([0, 0, image_size[1], image_size[0]], np.float32),
        mask_threshold=float(self.prompter.mask_threshold),
        offset=float(self.stability_score_offset), iou_thresh=float(self.pred_iou_thresh),
        stability_thresh=float(self.stability_score_thresh))
    keep, stability, boxes, iou_preds = (np.asarray(a) for a in
                                         (keep, stability, boxes, iou_preds))
    point_idx, mask_idx = np.nonzero(keep)  # point-major, as the masks are flattened
    width = logits.shape[-1]
    packed = np.asarray(packed)[point_idx, mask_idx]  # bits: 1/8 of the masks' transfer
    masks = [np.unpackbits(p, axis=-1, count=width).astype(bool) for p in packed]
    return _Masks(masks, iou_preds[point_idx, mask_idx].astype(np.float32),
                  stability[point_idx, mask_idx].astype(np.float32),
                  boxes[point_idx, mask_idx].astype(np.int64),
                  points[point_idx].astype(np.float64),
                  np.tile(np.asarray(box, np.int64), (len(point_idx), 1)))

  def _remove_small_regions(self, data: _Masks) -> _Masks:
    """Holes and islands under min_mask_region_area removed; then NMS over the cleaned
    masks' boxes that prefers unchanged masks, and cleaned masks replace the kept ones."""
    cleaned, unchanged = [], []
    for mask_rle in data.masks:
      mask = rle.rle_to_mask(mask_rle)
      mask, holes = regions.remove_small_regions(mask, self.min_mask_region_area, "holes")
      mask, islands = regions.remove_small_regions(mask, self.min_mask_region_area, "islands")
      cleaned.append(mask)
      unchanged.append(not (holes or islands))
    boxes = np.stack([_host_box(m) for m in cleaned])
    keep = box_nms(boxes, np.asarray(unchanged, np.float32),
                   max(self.box_nms_thresh, self.crop_nms_thresh))
    for i in keep:
      if not unchanged[i]:
        data.masks[i] = rle.mask_to_rle(cleaned[i])
        data.boxes[i] = boxes[i]
    return data.take(keep)
