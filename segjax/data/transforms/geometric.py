"""Geometric ops: resizes, crops, padding, flips and elastic warps that move
every spatial key (and boxes and masks) together."""
from typing import Tuple

import cv2
import numpy as np

from segjax.data.transforms.common import (
    _SPATIAL_AXIS, Example, Op, _aligned_size, _check, _check_int, _int_pair, _is_number,
    _map_index, _range, _require, _sizes, _spatial_size, register_op)

_MMSEG_CROP_TRIES = 10


def _set_instances(example: Example, boxes=None) -> None:
  """Stores moved `boxes` (None: the example has none) and checks moved
  `masks`: an instance that was invalid, whose box is empty now, or whose mask
  has no pixel left, becomes invalid with zero box and mask rows."""
  if boxes is None and "masks" not in example:
    return
  valid = _require(example, "instance_valid", "a geometric op on instances").astype(bool)
  if boxes is not None:
    valid &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  if "masks" in example:
    masks = example["masks"]
    nonempty = masks.any(axis=(1, 2))
    valid &= nonempty
    if (nonempty & ~valid).any():
      example["masks"] = np.where(valid[:, None, None], masks, 0).astype(masks.dtype)
  if boxes is not None:
    example["boxes"] = np.where(valid[:, None], boxes, 0).astype(example["boxes"].dtype)
  example["instance_valid"] = valid


def _nearest_index(size_in: int, size_out: int) -> np.ndarray:
  """Source index of each output pixel, pixel centres aligned as in cv2.INTER_LINEAR."""
  index = np.floor((np.arange(size_out) + 0.5) * (size_in / size_out)).astype(np.int64)
  return np.minimum(index, size_in - 1)


def _resize(example: Example, out_h: int, out_w: int) -> Example:
  """Bilinear image, nearest-neighbour label maps and masks, scaled boxes."""
  h, w = _spatial_size(example)
  out = dict(example)
  if "image" in out:
    out["image"] = cv2.resize(out["image"], (out_w, out_h), interpolation=cv2.INTER_LINEAR)
  # Gathering rows and columns keeps any integer dtype (cv2 lacks int64/uint32)
  # and copies ids bit-exactly, like cv2.INTER_NEAREST_EXACT.
  rows, cols = _nearest_index(h, out_h), _nearest_index(w, out_w)
  for key, axis in _SPATIAL_AXIS.items():
    if key in out and key != "image":
      out[key] = out[key].take(rows, axis=axis).take(cols, axis=axis + 1)
  boxes = None
  if "boxes" in out:
    boxes = out["boxes"].astype(np.float32) * np.float32([out_w / w, out_h / h] * 2)
    boxes = np.clip(boxes, 0, np.float32([out_w, out_h] * 2))
  _set_instances(out, boxes)
  return out


def _crop(example: Example, y0: int, x0: int, h: int, w: int) -> Example:
  """Window [y0, y0 + h) x [x0, x0 + w), clipped to the example; boxes are
  clipped to the window (detectron2), masks cut with it."""
  out = dict(example)
  for key in _SPATIAL_AXIS:
    if key in out:
      out[key] = out[key][_map_index(key, slice(y0, y0 + h), slice(x0, x0 + w))]
  boxes = None
  if "boxes" in out:
    crop_h, crop_w = _spatial_size(out)
    boxes = out["boxes"].astype(np.float32) - np.float32([x0, y0] * 2)
    boxes = np.clip(boxes, 0, np.float32([crop_w, crop_h] * 2))
  _set_instances(out, boxes)
  return out


def _pad_map(array: np.ndarray, axis: int, out_h: int, out_w: int, fill) -> np.ndarray:
  """Pads the spatial axes (axis, axis + 1) of `array` bottom/right."""
  h, w = array.shape[axis:axis + 2]
  if (h, w) == (out_h, out_w):
    return array
  shape = array.shape[:axis] + (out_h, out_w) + array.shape[axis + 2:]
  padded = np.full(shape, fill, array.dtype)
  padded[(slice(None),) * axis + (slice(0, h), slice(0, w))] = array
  return padded


def _pad(example: Example, out_h: int, out_w: int, ignore_index: int,
         label_size=None) -> Example:
  """Pads bottom/right to (out_h, out_w), the maps other than `image` to
  `label_size` where given; boxes keep their coordinates."""
  out = dict(example)
  if "image" in out:
    out["image"] = _pad_map(out["image"], 0, out_h, out_w, 0)
  label_h, label_w = label_size or (out_h, out_w)
  for key, axis in _SPATIAL_AXIS.items():
    if key in out and key != "image":
      fill = ignore_index if key == "label" else 0
      out[key] = _pad_map(out[key], axis, label_h, label_w, fill)
  return out


def _hflip(example: Example) -> Example:
  out = dict(example)
  _, w = _spatial_size(example)
  for key in _SPATIAL_AXIS:
    if key in out:
      out[key] = np.ascontiguousarray(out[key][_map_index(key, slice(None), slice(None, None, -1))])
  boxes = None
  if "boxes" in out:
    boxes = out["boxes"].astype(np.float32)
    boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
  _set_instances(out, boxes)
  return out


def keep_ratio_size(h: int, w: int, scale: Tuple[int, int]) -> Tuple[int, int]:
  """mmcv `rescale_size`: the largest (h, w) of the same aspect ratio whose long
  side fits max(scale) and short side fits min(scale), rounded half up."""
  factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
  return int(h * factor + 0.5), int(w * factor + 0.5)


def _cubic_weights(size: int, grid: int) -> np.ndarray:
  """(size, grid) weights of bicubic interpolation (Keys, a = -0.5) from `grid`
  control points spread evenly from the first to the last pixel; beyond the
  grid the edge points repeat."""
  position = np.linspace(0, grid - 1, size)
  base = np.floor(position).astype(np.int64)
  weights = np.zeros((size, grid))
  for offset in (-1, 0, 1, 2):
    t = np.abs(position - (base + offset))
    kernel = np.where(t <= 1, (1.5 * t - 2.5) * t * t + 1,
                      np.where(t < 2, ((-0.5 * t + 2.5) * t - 4) * t + 2, 0))
    np.add.at(weights, (np.arange(size), np.clip(base + offset, 0, grid - 1)), kernel)
  return weights


def _boxes_from_masks(masks: np.ndarray) -> np.ndarray:
  """Tight (N, 4) boxes x1, y1, x2, y2 (exclusive) of (N, H, W) masks; rows of
  empty masks are meaningless and left for `_set_instances` to zero."""
  rows, cols = masks.any(axis=2), masks.any(axis=1)
  h, w = masks.shape[1:]
  return np.stack([cols.argmax(1), rows.argmax(1), w - cols[:, ::-1].argmax(1),
                   h - rows[:, ::-1].argmax(1)], 1).astype(np.float32)


# Ops.


@register_op("resize")
def resize(scale, keep_ratio: bool = True, resize_labels: bool = True) -> Op:
  """mmseg `Resize`. `scale` follows mmseg's (w, h) order.

  keep_ratio=True: the aspect ratio is kept and the result is as large as
  possible with long side <= max(scale) and short side <= min(scale), so the
  order inside `scale` does not matter, e.g. (2048, 512) sends 500x375 (w x h)
  to 683x512. keep_ratio=False: the output is exactly h = scale[1], w = scale[0].

  resize_labels=False (evaluation at the original resolution): only `image` is
  resized; label maps, masks and boxes keep the original geometry, and
  `original_size` (the labels' H, W) and `resized_size` (the image's new
  h, w), int32 (2,), are recorded so the prediction can be cropped to
  resized_size and resized back to original_size. Follow it with
  `pad(size=..., label_size=...)` for static shapes.
  """
  scale = _int_pair(scale, "resize", "scale")
  _check(isinstance(keep_ratio, bool), "resize", "keep_ratio", "a bool", keep_ratio)
  _check(isinstance(resize_labels, bool), "resize", "resize_labels", "a bool", resize_labels)

  def fn(example, rng):
    del rng
    size = _aligned_size(example, "resize")
    out_h, out_w = keep_ratio_size(*size, scale) if keep_ratio else (scale[1], scale[0])
    if resize_labels:
      return _resize(example, out_h, out_w)
    image = _require(example, "image", "resize(resize_labels=False)")
    return {**example,
            "image": cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_LINEAR),
            "original_size": np.int32(size), "resized_size": np.int32([out_h, out_w])}
  return fn


@register_op("random_resize")
def random_resize(scale, ratio_range=(0.5, 2.0)) -> Op:
  """mmseg `RandomResize` with ratio_range and keep_ratio=True.

  Draws ratio ~ U(ratio_range), scales `scale` (w, h) by it (truncated to ints,
  as mmcv's `_random_sample_ratio`), then resizes as `resize(keep_ratio=True)`
  does: this is the usual multi-scale training augmentation.
  """
  scale = _int_pair(scale, "random_resize", "scale")
  low, high = _range(ratio_range, "random_resize", "ratio_range")
  _check(low > 0, "random_resize", "ratio_range", "positive", ratio_range)

  def fn(example, rng):
    ratio = rng.uniform(low, high)
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    size = _aligned_size(example, "random_resize")
    return _resize(example, *keep_ratio_size(*size, target))
  return fn


@register_op("random_short_side")
def random_short_side(sizes, max_size: int = 1333) -> Op:
  """detectron2 `ResizeShortestEdge(sizes, max_size, "choice")`: the short side
  becomes a size drawn from `sizes`, unless the long side would then exceed
  `max_size`, which then bounds it (keep-ratio, rounded half up)."""
  op = "random_short_side"
  _check(isinstance(sizes, (tuple, list)) and len(sizes) > 0
         and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes),
         op, "sizes",
         "a tuple of positive ints", sizes)
  _check_int(max_size, op, "max_size", low=1)
  sizes = tuple(sizes)

  def fn(example, rng):
    short = sizes[int(rng.integers(len(sizes)))]
    h, w = _aligned_size(example, op)
    factor = min(short / min(h, w), max_size / max(h, w))
    return _resize(example, int(h * factor + 0.5), int(w * factor + 0.5))
  return fn


@register_op("random_crop")
def random_crop(size, cat_max_ratio: float = 1.0, ignore_index: int = 255) -> Op:
  """mmseg `RandomCrop` of `size` (h, w), then padding up to `size`.

  The offset is uniform over the valid positions. With cat_max_ratio < 1, as in
  mmseg, a crop is accepted only if its `label` holds more than one non-ignored
  class and none covers cat_max_ratio or more of the non-ignored pixels; after
  10 rejections the next draw is used unchecked. This keeps crops from being
  all sky or all road. Images smaller than `size` are padded bottom/right
  (image 0, label ignore_index, instance_ids 0, panoptic 0, masks 0) so every
  output is exactly `size`, which static batch shapes need. Boxes are clipped
  to the window (detectron2); instances left with an empty box or mask turn
  invalid.
  """
  crop_h, crop_w = _int_pair(size, "random_crop", "size")
  _check(_is_number(cat_max_ratio) and 0 < cat_max_ratio <= 1, "random_crop",
         "cat_max_ratio", "a number in (0, 1]", cat_max_ratio)
  _check_int(ignore_index, "random_crop", "ignore_index")

  def draw(h, w, rng):
    return (int(rng.integers(0, max(h - crop_h, 0) + 1)),
            int(rng.integers(0, max(w - crop_w, 0) + 1)))

  def balanced(label):
    _, counts = np.unique(label[label != ignore_index], return_counts=True)
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio

  def fn(example, rng):
    h, w = _aligned_size(example, "random_crop")
    y0, x0 = draw(h, w, rng)
    if cat_max_ratio < 1 and "label" in example:
      for _ in range(_MMSEG_CROP_TRIES):
        if balanced(example["label"][y0:y0 + crop_h, x0:x0 + crop_w]):
          break
        y0, x0 = draw(h, w, rng)
    return _pad(_crop(example, y0, x0, crop_h, crop_w), crop_h, crop_w, ignore_index)
  return fn


@register_op("pad")
def pad(size, ignore_index: int = 255, label_size=None) -> Op:
  """Pads bottom/right to `size` (h, w): image 0, label ignore_index, others 0.

  Used to give evaluation batches a static shape; an example larger than
  `size` is an error rather than being cropped silently. With `label_size`
  (h, w), the label maps and masks are padded to label_size instead of size:
  after `resize(resize_labels=False)` this keeps labels at the original
  resolution with a static shape (label_size >= the largest original image).
  """
  out_h, out_w = _int_pair(size, "pad", "size")
  _check_int(ignore_index, "pad", "ignore_index")
  if label_size is not None:
    label_size = _int_pair(label_size, "pad", "label_size")

  def fn(example, rng):
    del rng
    if label_size is None:
      _aligned_size(example, "pad")
    for key, (h, w) in _sizes(example).items():
      arg = "size" if key == "image" or label_size is None else "label_size"
      limit_h, limit_w = (out_h, out_w) if arg == "size" else label_size
      if h > limit_h or w > limit_w:
        raise ValueError(
            f"pad: `{key}` is {h}x{w} (HxW), larger than the pad {arg} "
            f"{limit_h}x{limit_w}; resize it first or raise pad's `{arg}`.")
    return _pad(example, out_h, out_w, ignore_index, label_size)
  return fn


@register_op("random_flip")
def random_flip(prob: float = 0.5) -> Op:
  """mmseg `RandomFlip` (horizontal): flips all spatial keys and boxes with `prob`."""
  _check(_is_number(prob) and 0 <= prob <= 1, "random_flip", "prob",
         "a number in [0, 1]", prob)

  def fn(example, rng):
    if rng.random() < prob:
      _aligned_size(example, "random_flip")
      return _hflip(example)
    return example
  return fn


@register_op("elastic")
def elastic(grid: int = 3, std: float = 10.0, prob: float = 1.0,
            ignore_index: int = 255) -> Op:
  """U-Net's elastic deformation (Ronneberger et al. 2015, section 3.1).

  The U-Net variant, not Simard's Gaussian-smoothed per-pixel noise: with
  probability `prob`, one displacement vector per point of a `grid` x `grid`
  lattice spread evenly from corner to corner is drawn from N(0, std^2) pixels
  per axis, bicubically interpolated (Keys, a = -0.5) to a per-pixel field d,
  and every map is sampled at p + d(p): `image` bilinearly (cv2.remap), label
  maps and masks by the nearest pixel of the same field, so ids never blend.
  Pixels sampled from outside the example become image 0, label
  `ignore_index`, instance_ids / panoptic / masks 0. Boxes are recomputed as
  the tight boxes of the warped masks (instances warped out of view turn
  invalid), so an example with boxes needs masks.
  """
  op = "elastic"
  _check_int(grid, op, "grid", low=2)
  _check(_is_number(std) and std >= 0, op, "std", "a number >= 0", std)
  _check(_is_number(prob) and 0 <= prob <= 1, op, "prob", "a number in [0, 1]", prob)
  _check_int(ignore_index, op, "ignore_index")

  def fn(example, rng):
    if rng.random() >= prob:
      return example
    h, w = _aligned_size(example, op)
    if "boxes" in example and "masks" not in example:
      raise ValueError(f"{op} needs `masks` to move `boxes` (they are recomputed from the "
                       "warped masks); run unpack_instances on data with masks, or drop "
                       "the boxes before elastic.")
    shift_y, shift_x = rng.normal(0.0, std, (2, grid, grid))
    weights_y, weights_x = _cubic_weights(h, grid), _cubic_weights(w, grid)
    map_y = (np.arange(h)[:, None] + weights_y @ shift_y @ weights_x.T).astype(np.float32)
    map_x = (np.arange(w)[None, :] + weights_y @ shift_x @ weights_x.T).astype(np.float32)
    out = dict(example)
    if "image" in out:
      out["image"] = cv2.remap(out["image"], map_x, map_y, cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    src_y = np.floor(map_y + 0.5).astype(np.int64)
    src_x = np.floor(map_x + 0.5).astype(np.int64)
    outside = (src_y < 0) | (src_y >= h) | (src_x < 0) | (src_x >= w)
    src_y, src_x = np.clip(src_y, 0, h - 1), np.clip(src_x, 0, w - 1)
    for key, axis in _SPATIAL_AXIS.items():
      if key in out and key != "image":
        warped = out[key][_map_index(key, src_y, src_x)]
        warped[(slice(None),) * axis + (outside,)] = ignore_index if key == "label" else 0
        out[key] = warped
    if "masks" in out:
      _set_instances(out, _boxes_from_masks(out["masks"]) if "boxes" in out else None)
    return out
  return fn


@register_op("mirror_pad")
def mirror_pad(pixels: int) -> Op:
  """U-Net's overlap-tile input (its Fig. 2): mirrors `pixels` of `image` out
  on every side.

  A U-Net of valid (unpadded) convolutions that loses `pixels` per side then
  outputs a map aligned with the unpadded label. The reflection does not
  repeat the edge pixel, as in the paper's figure (cv2.BORDER_REFLECT_101,
  numpy's mode "reflect": padded row -1 is row 1). Only `image` changes; label
  maps, masks and boxes keep the unpadded geometry, so put geometric ops first.
  """
  _check_int(pixels, "mirror_pad", "pixels", low=1)

  def fn(example, rng):
    del rng
    image = _require(example, "image", "mirror_pad")
    h, w = image.shape[:2]
    if pixels >= min(h, w):
      raise ValueError(
          f"mirror_pad: reflecting {pixels} pixels needs an image larger than {pixels} "
          f"in both dimensions, but it is {h}x{w} (HxW); lower `pixels` or resize first.")
    padded = cv2.copyMakeBorder(image, pixels, pixels, pixels, pixels, cv2.BORDER_REFLECT_101)
    return {**example, "image": padded.reshape(padded.shape[:2] + image.shape[2:])}
  return fn
