"""Host-side numpy preprocessing for segmentation, composed from a string.

A spec such as
  "squeeze_labels|random_resize(scale=(2048, 512))|random_crop(size=(512, 512))"
names registered ops separated by "|"; each op is a factory taking Python
literal keyword arguments and returning `fn(example, rng) -> example`, where
rng is the `np.random.Generator` grain's `random_map` passes in.

An example is a dict of numpy arrays. Spatial keys:
  image: (H, W, 3), resized bilinearly, padded with 0.
  label: (H, W) class ids, padded with the ignore index.
  instance_ids: (H, W), padded with 0.
  panoptic: (H, W, 3) COCO ids R + 256 G + 256^2 B (0 = VOID), padded with 0.
  masks: (N, H, W) uint8 0/1, one per instance row, padded with 0.
Label maps and masks are only ever resized with nearest neighbour, so ids
never blend. Per-instance rows (`unpack_instances` makes them from the tfds
`objects` sequence):
  boxes: (N, 4) float32 x1, y1, x2, y2 in pixels (x2, y2 exclusive).
  classes: (N,) int32; is_crowd: (N,) bool.
  instance_valid: (N,) bool.
Every geometric op moves boxes and masks with the image; an instance whose box
becomes empty, or whose mask has no pixel left, turns invalid and its box and
mask rows are zeroed. N never changes except in `pad_instances`, which moves
the valid rows first and pads to a fixed count. Per-segment rows of panoptic
datasets (from the tfds `segments` sequence), all (S,):
  segment_ids, segment_classes, segment_areas: int32;
  segment_is_thing, segment_is_crowd, segment_valid: bool.
`resize(resize_labels=False)` adds `original_size` and `resized_size`, int32
(2,) (H, W). It and `mirror_pad` leave `image` at another size than the
maps; geometric ops after them raise rather than misalign the two, and only
`pad(label_size=...)` accepts the difference. Other keys pass through
untouched.

Ops never write into their input arrays or dict: grain may hand the same
source element to the pipeline again in a later epoch.
"""
import ast
import inspect
from typing import Any, Callable, Dict, List, Tuple

import cv2
import numpy as np

from segjax.registry import Registry

Example = Dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]

PREPROCESS_OPS: Registry = Registry("preprocessing op")

LABEL_KEYS = ("label", "instance_ids", "panoptic")
# Spatial key -> index of its H axis.
_SPATIAL_AXIS = {"image": 0, **{key: 0 for key in LABEL_KEYS}, "masks": 1}
INSTANCE_KEYS = ("boxes", "classes", "is_crowd", "masks", "box_masks", "instance_valid")
SEGMENT_KEYS = ("segment_ids", "segment_classes", "segment_is_thing", "segment_is_crowd",
                "segment_areas", "segment_valid")
# tfds sequence field -> (example key, dtype, shape of one row).
_OBJECT_FIELDS = {"box": ("boxes", np.float32, (4,)), "class": ("classes", np.int32, ()),
                  "is_crowd": ("is_crowd", np.bool_, ()), "mask": ("masks", np.uint8, None)}
_SEGMENT_FIELDS = {"id": ("segment_ids", np.int32, ()),
                   "class": ("segment_classes", np.int32, ()),
                   "is_thing": ("segment_is_thing", np.bool_, ()),
                   "is_crowd": ("segment_is_crowd", np.bool_, ()),
                   "area": ("segment_areas", np.int32, ())}
_MMSEG_CROP_TRIES = 10


# Argument checks, run once when an op is built.


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_pair(value, op: str, arg: str) -> Tuple[int, int]:
  if (not isinstance(value, (tuple, list)) or len(value) != 2 or not all(
      isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
    raise ValueError(f"{op}: `{arg}` must be a pair of positive ints, got {value!r}.")
  return int(value[0]), int(value[1])


def _range(value, op: str, arg: str) -> Tuple[float, float]:
  if (not isinstance(value, (tuple, list)) or len(value) != 2 or
      not all(_is_number(v) for v in value) or not 0 <= value[0] <= value[1]):
    raise ValueError(
        f"{op}: `{arg}` must be a pair (low, high) with 0 <= low <= high, got {value!r}.")
  return float(value[0]), float(value[1])


def _check(ok: bool, op: str, arg: str, expected: str, value) -> None:
  if not ok:
    raise ValueError(f"{op}: `{arg}` must be {expected}, got {value!r}.")


def _check_int(value, op: str, arg: str, low: int = 0) -> None:
  _check(isinstance(value, int) and not isinstance(value, bool) and value >= low,
         op, arg, f"an int >= {low}", value)


# Geometry shared by the ops.


def _require(example: Example, key: str, op: str):
  if key not in example:
    raise KeyError(f"{op} needs `{key}` but the example only has keys {sorted(example)}.")
  return example[key]


def _map_index(key: str, rows, cols) -> tuple:
  """Index applying `rows`, `cols` to the spatial axes of the map `key`."""
  return (slice(None),) * _SPATIAL_AXIS[key] + (rows, cols)


def _sizes(example: Example) -> Dict[str, Tuple[int, int]]:
  """(H, W) of every spatial key present."""
  return {key: tuple(example[key].shape[axis:axis + 2])
          for key, axis in _SPATIAL_AXIS.items() if key in example}


def _spatial_size(example: Example) -> Tuple[int, int]:
  """(H, W) of the example, from `image` or else the first label map present."""
  sizes = _sizes(example)
  if not sizes:
    raise KeyError(f"example has no spatial key ({', '.join(_SPATIAL_AXIS)}); "
                   f"it has keys {sorted(example)}.")
  return next(iter(sizes.values()))


def _aligned_size(example: Example, op: str) -> Tuple[int, int]:
  """(H, W) shared by all spatial keys; a geometric op on maps of different
  sizes (left by `resize(resize_labels=False)`) would misalign them."""
  sizes = _sizes(example)
  size = _spatial_size(example)
  if any(s != size for s in sizes.values()):
    shown = ", ".join(f"{key} {h}x{w}" for key, (h, w) in sizes.items())
    raise ValueError(
        f"{op} needs all spatial keys at one size but got (HxW) {shown}; after "
        "resize(resize_labels=False) only pad(label_size=...) may follow.")
  return size


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


# Instance and segment rows.


def _compact(example: Example, keys: Tuple[str, ...], valid: np.ndarray, limit: int,
             on_overflow: str, what: str) -> None:
  """Valid rows of `keys` first (stable), cut or padded with zeros to `limit`."""
  lengths = {key: len(example[key]) for key in keys if key in example}
  if any(n != len(valid) for n in lengths.values()):
    raise ValueError(f"pad_instances: the {what} arrays disagree in length: {lengths}.")
  keep = np.flatnonzero(valid)
  if keep.size > limit:
    if on_overflow == "error":
      raise ValueError(
          f"pad_instances: the example has {keep.size} valid {what}s, more than the "
          f"limit of {limit}; raise the limit or pass on_overflow='drop'.")
    keep = keep[:limit]
  for key in lengths:
    array = np.asarray(example[key])
    padded = np.zeros((limit,) + array.shape[1:], array.dtype)
    padded[:keep.size] = array[keep]
    example[key] = padded


def _panoptic_areas(panoptic: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
  """Pixel count of each segment id in an (H, W, 3) COCO panoptic map."""
  if panoptic.ndim != 3 or panoptic.shape[-1] != 3:
    raise ValueError(f"pad_instances: `panoptic` must be (H, W, 3) COCO RGB ids, got "
                     f"shape {panoptic.shape}.")
  rgb = panoptic.astype(np.int64)
  ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
  present, counts = np.unique(ids, return_counts=True)
  segment_ids = segment_ids.astype(np.int64)
  index = np.minimum(np.searchsorted(present, segment_ids), present.size - 1)
  found = (present[index] == segment_ids) & (segment_ids != 0)
  return np.where(found, counts[index], 0).astype(np.int32)


def _unpack_rows(records, fields, name: str, example: Example) -> Dict[str, np.ndarray]:
  """Row arrays from a tfds Sequence decoded as a dict of python lists."""
  op = "unpack_instances"
  unknown = sorted(set(records) - set(fields))
  if unknown:
    raise ValueError(f"{op}: `{name}` has unknown field(s) {unknown}; it knows "
                     f"{sorted(fields)}.")
  lengths = {field: len(values) for field, values in records.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"{op}: the fields of `{name}` differ in length: {lengths}.")
  rows = {}
  for field, values in records.items():
    key, dtype, shape = fields[field]
    if shape is not None:
      rows[key] = np.asarray(values, dtype).reshape((len(values),) + shape)
      continue
    h, w = _spatial_size(example)
    rows[key] = np.zeros((len(values), h, w), dtype)
    for i, mask in enumerate(values):
      mask = np.asarray(mask)
      if mask.shape not in ((h, w), (h, w, 1)):
        raise ValueError(f"{op}: mask {i} of `{name}` has shape {mask.shape} but the image "
                         f"is {h}x{w}; masks must be image-sized (H, W, 1) or (H, W).")
      rows[key][i] = mask.reshape(h, w) != 0
  return rows


# Ops.


@PREPROCESS_OPS.register("squeeze_labels")
def squeeze_labels() -> Op:
  """(H, W, 1) -> (H, W) for `label` and `instance_ids`, as tfds decodes them."""
  def fn(example, rng):
    del rng
    out = dict(example)
    for key in ("label", "instance_ids"):
      if key in out and out[key].ndim == 3 and out[key].shape[-1] == 1:
        out[key] = out[key][..., 0]
    return out
  return fn


@PREPROCESS_OPS.register("unpack_instances")
def unpack_instances() -> Op:
  """tfds `objects` / `segments` sequences (dicts of python lists) -> row arrays.

  objects {box, class, is_crowd, mask} -> `boxes` (N, 4) float32, `classes`
  (N,) int32, `is_crowd` (N,) bool, `masks` (N, H, W) uint8 0/1, plus
  `instance_valid` (N,) all True. segments {id, class, is_thing, is_crowd,
  area} -> `segment_ids`, `segment_classes`, `segment_is_thing`,
  `segment_is_crowd`, `segment_areas`, plus `segment_valid` all True. The
  sequences are removed; empty ones give N = 0 rows of the right shapes. Put
  it first: the geometric ops move arrays, not lists.
  """
  op = "unpack_instances"

  def fn(example, rng):
    del rng
    if "objects" not in example and "segments" not in example:
      raise KeyError(f"{op} needs `objects` or `segments` but the example only has keys "
                     f"{sorted(example)}.")
    out = dict(example)
    if "objects" in out:
      rows = _unpack_rows(out.pop("objects"), _OBJECT_FIELDS, "objects", out)
      out.update(rows)
      out["instance_valid"] = np.ones(len(next(iter(rows.values()), ())), bool)
    if "segments" in out:
      rows = _unpack_rows(out.pop("segments"), _SEGMENT_FIELDS, "segments", out)
      out.update(rows)
      out["segment_valid"] = np.ones(len(next(iter(rows.values()), ())), bool)
    return out
  return fn


@PREPROCESS_OPS.register("resize")
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


@PREPROCESS_OPS.register("random_resize")
def random_resize(scale, ratio_range=(0.5, 2.0)) -> Op:
  """mmseg `RandomResize` with ratio_range and keep_ratio=True.

  Draws ratio ~ U(ratio_range), scales `scale` (w, h) by it (rounded half up),
  then resizes as `resize(keep_ratio=True)` does: this is the usual multi-scale
  training augmentation.
  """
  scale = _int_pair(scale, "random_resize", "scale")
  low, high = _range(ratio_range, "random_resize", "ratio_range")
  _check(low > 0, "random_resize", "ratio_range", "positive", ratio_range)

  def fn(example, rng):
    ratio = rng.uniform(low, high)
    target = (int(scale[0] * ratio + 0.5), int(scale[1] * ratio + 0.5))
    size = _aligned_size(example, "random_resize")
    return _resize(example, *keep_ratio_size(*size, target))
  return fn


@PREPROCESS_OPS.register("random_short_side")
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


@PREPROCESS_OPS.register("random_crop")
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


@PREPROCESS_OPS.register("pad")
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


@PREPROCESS_OPS.register("random_flip")
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


@PREPROCESS_OPS.register("elastic")
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


@PREPROCESS_OPS.register("mirror_pad")
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


@PREPROCESS_OPS.register("pad_instances")
def pad_instances(max_instances: int = 100, max_segments=None,
                  on_overflow: str = "drop") -> Op:
  """Static row counts for batching (and TPU shapes): valid rows first, padded.

  The instance rows (boxes, classes, is_crowd, masks, instance_valid) are
  reordered valid-first (keeping their order), cut to `max_instances` and
  padded with zero / False rows to exactly max_instances. With `max_segments`,
  each segment's area is first recomputed from the `panoptic` map as it is now
  (after crops and resizes; id = R + 256 G + 65536 B), segments with no pixel
  left turn invalid, and the segment_* rows are compacted and padded the same
  way to max_segments. Put it last among the geometric ops.

  Cutting loses annotations silently: with on_overflow="drop" the valid rows
  past the limit (the last in annotation order) are dropped; "error" raises,
  naming the count and the limit, so a limit below the data's maximum is
  caught. Rows move but `instance_ids` maps are not renumbered: an id map that
  encodes row numbers (segjax_shapes: id k is row k - 1) no longer matches once
  an invalid row precedes a valid one; `masks` always match their rows.
  """
  op = "pad_instances"
  _check_int(max_instances, op, "max_instances", low=1)
  if max_segments is not None:
    _check_int(max_segments, op, "max_segments", low=1)
  _check(on_overflow in ("drop", "error"), op, "on_overflow", "'drop' or 'error'",
         on_overflow)

  def fn(example, rng):
    del rng
    out = dict(example)
    has_instances = any(key in out for key in INSTANCE_KEYS)
    if not has_instances and max_segments is None:
      raise KeyError(f"{op} needs instance rows ({', '.join(INSTANCE_KEYS)}; run "
                     f"unpack_instances first) but the example only has keys {sorted(out)}.")
    if has_instances:
      valid = _require(out, "instance_valid", op).astype(bool)
      _compact(out, INSTANCE_KEYS, valid, max_instances, on_overflow, "instance")
    if max_segments is not None:
      needs = f"{op}(max_segments=...)"
      areas = _panoptic_areas(_require(out, "panoptic", needs),
                              _require(out, "segment_ids", needs))
      valid = _require(out, "segment_valid", needs).astype(bool) & (areas > 0)
      out["segment_areas"] = np.where(valid, areas, 0).astype(np.int32)
      out["segment_valid"] = valid
      _compact(out, SEGMENT_KEYS, valid, max_segments, on_overflow, "segment")
    return out
  return fn


@PREPROCESS_OPS.register("photometric_distortion")
def photometric_distortion(brightness_delta: float = 32,
                           contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5),
                           hue_delta: int = 18) -> Op:
  """mmseg `PhotoMetricDistortion` on an RGB uint8 image; the image stays uint8.

  In mmseg's order, each step applied with probability 0.5: brightness
  (add U(-delta, delta)), contrast (multiply by U(contrast_range)) either first
  or last (coin flip), saturation (scale HSV S by U(saturation_range)), hue
  (shift HSV H by an int in [-hue_delta, hue_delta], modulo OpenCV's 180). Each
  step clips to [0, 255] and truncates to uint8 as mmseg does.
  """
  op = "photometric_distortion"
  _check(_is_number(brightness_delta) and brightness_delta >= 0, op,
         "brightness_delta", "a number >= 0", brightness_delta)
  contrast_range = _range(contrast_range, op, "contrast_range")
  saturation_range = _range(saturation_range, op, "saturation_range")
  _check(isinstance(hue_delta, int) and not isinstance(hue_delta, bool) and
         0 <= hue_delta < 180, op, "hue_delta", "an int in [0, 180)", hue_delta)

  def affine(x, alpha, beta):
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

  def contrast(image, rng):
    if rng.integers(2):
      image = affine(image, rng.uniform(*contrast_range), 0.0)
    return image

  def fn(example, rng):
    image = _require(example, "image", op)
    if image.dtype != np.uint8:
      raise ValueError(f"{op} needs a uint8 image but got {image.dtype}; "
                       "put it before `normalize` in the pipeline.")
    if rng.integers(2):
      image = affine(image, 1.0, rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = rng.integers(2)
    if contrast_first:
      image = contrast(image, rng)
    if rng.integers(2):
      hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
      hsv[..., 1] = affine(hsv[..., 1], rng.uniform(*saturation_range), 0.0)
      image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
      hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
      shift = rng.integers(-hue_delta, hue_delta + 1)
      hsv[..., 0] = (hsv[..., 0].astype(np.int32) + shift) % 180
      image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first:
      image = contrast(image, rng)
    return {**example, "image": image}
  return fn


@PREPROCESS_OPS.register("normalize")
def normalize(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)) -> Op:
  """image -> float32 (image - mean) / std per RGB channel (ImageNet defaults)."""
  _check(isinstance(mean, (tuple, list)) and len(mean) == 3 and
         all(_is_number(v) for v in mean), "normalize", "mean", "3 numbers", mean)
  _check(isinstance(std, (tuple, list)) and len(std) == 3 and
         all(_is_number(v) and v > 0 for v in std), "normalize", "std",
         "3 positive numbers", std)
  mean, std = np.float32(mean), np.float32(std)

  def fn(example, rng):
    del rng
    image = _require(example, "image", "normalize")
    return {**example, "image": (image.astype(np.float32) - mean) / std}
  return fn


@PREPROCESS_OPS.register("check_labels")
def check_labels(num_classes: int, ignore_index: int = 255) -> Op:
  """Fails loudly on `label` values outside [0, num_classes) + {ignore_index}.

  Out-of-range ids would otherwise index past the logits in the loss or
  silently count as wrong in metrics.
  """
  _check_int(num_classes, "check_labels", "num_classes", low=1)
  _check_int(ignore_index, "check_labels", "ignore_index")

  def fn(example, rng):
    del rng
    values = np.unique(_require(example, "label", "check_labels"))
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
    if bad.size:
      shown = ", ".join(str(v) for v in bad[:10].tolist()) + (", ..." if bad.size > 10 else "")
      name = example.get("file_name", "")
      name = name.decode() if isinstance(name, bytes) else str(name)
      raise ValueError(
          f"the label map{f' of {name}' if name else ''} contains values [{shown}] that are "
          f"neither a class id in [0, {num_classes}) nor the ignore index {ignore_index}; if "
          "its labels count from 1 with 0 for 'other' (as ADE20K's do), start data.train_ops, "
          "data.eval_ops and inference.label_ops with the reduce_zero_label op (as "
          "configs/pspnet_ade20k.py does), else remap the labels to the dataset's classes.")
    return example
  return fn


@PREPROCESS_OPS.register("reduce_zero_label")
def reduce_zero_label(ignore_index: int = 255) -> Op:
  """mmseg `reduce_zero_label` (ADE20K): 0 -> ignore, k -> k - 1, ignore stays.

  For datasets whose id 0 means "other"/unlabelled rather than a class.
  """
  _check_int(ignore_index, "reduce_zero_label", "ignore_index")

  def fn(example, rng):
    del rng
    label = _require(example, "label", "reduce_zero_label")
    ignored = (label == 0) | (label == ignore_index)
    return {**example, "label": np.where(ignored, ignore_index, label - 1).astype(label.dtype)}
  return fn


@PREPROCESS_OPS.register("check_image")
def check_image() -> Op:
  """Fails loudly unless `image` is (H, W, 3) uint8, what the other ops expect."""
  def fn(example, rng):
    del rng
    image = _require(example, "image", "check_image")
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise ValueError(
          f"image has shape {image.shape} and dtype {image.dtype}, but "
          "preprocessing expects an (H, W, 3) uint8 RGB array; decode images "
          "as 3-channel uint8 (convert grayscale or RGBA to RGB) first.")
    return example
  return fn


@PREPROCESS_OPS.register("unet_weights")
def unet_weights(w0: float = 10.0, sigma: float = 5.0, ignore_index: int = 255) -> Op:
  """U-Net's per-pixel loss weights from `instance_ids` (and `label` for the class
  balance), stored as `pixel_weights` (H, W) float32 for the losses that take
  them (see `segjax.losses.unet_weight_map`). Put it after the geometric ops
  (weights are not moved by them) and before `normalize`."""
  _check(_is_number(w0) and w0 >= 0, "unet_weights", "w0", "a number >= 0", w0)
  _check(_is_number(sigma) and sigma > 0, "unet_weights", "sigma", "a number > 0", sigma)
  from segjax.losses.unet_weights import unet_weight_map

  def fn(example, rng):
    del rng
    instance_ids = _require(example, "instance_ids", "unet_weights")
    out = dict(example)
    out["pixel_weights"] = unet_weight_map(instance_ids, example.get("label"), w0=w0,
                                           sigma=sigma, ignore_index=ignore_index)
    return out
  return fn


@PREPROCESS_OPS.register("instance_masks")
def instance_masks() -> Op:
  """`masks` (N, H, W) uint8 from an `instance_ids` map whose id k marks row k - 1
  (segjax_shapes), N = the number of instance rows. Put it before the geometric
  ops, which then move the masks with the image."""
  op = "instance_masks"

  def fn(example, rng):
    del rng
    ids = _require(example, "instance_ids", op)
    if ids.ndim != 2:
      raise ValueError(f"{op}: `instance_ids` must be (H, W), got shape {ids.shape}; run "
                       "squeeze_labels first.")
    rows = len(_require(example, "instance_valid", op))
    masks = ids[None] == np.arange(1, rows + 1, dtype=ids.dtype)[:, None, None]
    masks &= np.asarray(example["instance_valid"], bool)[:, None, None]
    return {**example, "masks": masks.astype(np.uint8)}
  return fn


@PREPROCESS_OPS.register("thing_classes")
def thing_classes(ids) -> Op:
  """Instance `classes` from dataset class ids to the model's 0-based thing index
  (the position in `ids`, e.g. Cityscapes trainIds 11-18 -> 0-7); rows of any
  other class turn invalid, with zero box and mask."""
  op = "thing_classes"
  _check(isinstance(ids, (tuple, list)) and len(ids) > 0
         and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
         and len(set(ids)) == len(ids), op, "ids", "a tuple of distinct class ids", ids)
  table = np.asarray(ids, np.int64)

  def fn(example, rng):
    del rng
    classes = np.asarray(_require(example, "classes", op), np.int64)
    index = np.argmax(classes[:, None] == table[None, :], axis=1) if len(classes) else classes
    known = (classes[:, None] == table[None, :]).any(axis=1)
    valid = np.asarray(_require(example, "instance_valid", op), bool) & known
    out = {**example, "classes": np.where(valid, index, 0).astype(np.int32),
           "instance_valid": valid}
    if "boxes" in out:
      out["boxes"] = np.where(valid[:, None], out["boxes"], 0).astype(out["boxes"].dtype)
    if "masks" in out:
      out["masks"] = np.where(valid[:, None, None], out["masks"], 0).astype(out["masks"].dtype)
    return out
  return fn


@PREPROCESS_OPS.register("crop_masks")
def crop_masks(size: int = 64) -> Op:
  """Image-sized `masks` (N, H, W) -> `box_masks` (N, size, size): each mask
  resampled bilinearly on its own box (pixel centres, >= 0.5), the compact form
  TPU Mask R-CNN trains on (COCO-sized masks would cost N x H x W bytes per
  image). The model maps RoIs into each box to build its targets. Put it after
  every geometric op and `pad_instances`."""
  op = "crop_masks"
  _check_int(size, op, "size", low=1)

  def fn(example, rng):
    del rng
    masks = _require(example, "masks", op)
    boxes = _require(example, "boxes", op).astype(np.float64)
    out = {k: v for k, v in example.items() if k != "masks"}
    cropped = np.zeros((len(masks), size, size), np.uint8)
    for i, (mask, (x1, y1, x2, y2)) in enumerate(zip(masks, boxes)):
      if x2 <= x1 or y2 <= y1:
        continue
      sx, sy = (x2 - x1) / size, (y2 - y1) / size
      # Output pixel (u, v) samples the mask at x1 + (u + 0.5) * sx - 0.5 (likewise y).
      warp = np.float64([[sx, 0, x1 + 0.5 * sx - 0.5], [0, sy, y1 + 0.5 * sy - 0.5]])
      sampled = cv2.warpAffine(mask.astype(np.float32), warp, (size, size),
                               flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
      cropped[i] = sampled >= 0.5
    out["box_masks"] = cropped
    return out
  return fn


@PREPROCESS_OPS.register("panoptic_semantic")
def panoptic_semantic(stuff_classes, ignore_index: int = 255, things: str = "merge") -> Op:
  """The `label` target of Panoptic FPN's semantic branch.

  things="merge" (detectron2): every thing pixel (a class not in
  `stuff_classes`) -> 0 and stuff class `stuff_classes[j]` -> j + 1, so the head
  predicts len(stuff_classes) + 1 classes and leaves the things to the instance
  branch. things="keep": `label` unchanged, for a head predicting all classes
  (UPSNet-style fusion). Ignore pixels stay `ignore_index` in both.
  """
  op = "panoptic_semantic"
  _check(isinstance(stuff_classes, (tuple, list)) and len(stuff_classes) > 0
         and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                 for c in stuff_classes) and len(set(stuff_classes)) == len(stuff_classes),
         op, "stuff_classes", "a non-empty tuple of distinct class ids >= 0", stuff_classes)
  _check_int(ignore_index, op, "ignore_index")
  _check(things in ("merge", "keep"), op, "things", '"merge" or "keep"', things)
  if ignore_index in stuff_classes:
    raise ValueError(f"{op}: ignore_index {ignore_index} is among stuff_classes "
                     f"{tuple(stuff_classes)}; a class id cannot also mean 'ignore'.")
  if things == "merge" and ignore_index <= len(stuff_classes):
    raise ValueError(f"{op}: merged classes 0-{len(stuff_classes)} would include "
                     f"ignore_index {ignore_index}; use an ignore_index above "
                     f"{len(stuff_classes)}.")
  order = np.argsort(stuff_classes)
  sorted_stuff = np.asarray(stuff_classes, np.int64)[order]

  def fn(example, rng):
    del rng
    label = _require(example, "label", op)
    if label.ndim != 2:
      raise ValueError(f"{op}: `label` must be (H, W) class ids, got shape {label.shape}; "
                       "run squeeze_labels first.")
    if things == "keep":
      return example
    ids = label.astype(np.int64)
    pos = np.minimum(np.searchsorted(sorted_stuff, ids), len(sorted_stuff) - 1)
    merged = np.where(sorted_stuff[pos] == ids, order[pos] + 1, 0)
    merged = np.where(ids == ignore_index, ignore_index, merged)
    return {**example, "label": merged.astype(label.dtype)}
  return fn


@PREPROCESS_OPS.register("keep")
def keep(keys) -> Op:
  """Keeps only `keys`, e.g. to drop strings and ids before batching."""
  _check(isinstance(keys, (tuple, list)) and all(isinstance(k, str) for k in keys),
         "keep", "keys", "a tuple of key names", keys)
  keys = tuple(keys)

  def fn(example, rng):
    del rng
    missing = [k for k in keys if k not in example]
    if missing:
      raise KeyError(f"keep: the example has no key(s) {missing}; it has {sorted(example)}.")
    return {k: example[k] for k in keys}
  return fn


# Parsing.


class Pipeline:
  """Ops applied in order; pickles as its spec so grain can ship it to workers."""

  def __init__(self, spec: str, ops: List[Op]):
    self.spec = spec
    self._ops = ops

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    for op in self._ops:
      example = op(example, rng)
    return example

  def __reduce__(self):
    return parse_pipeline, (self.spec,)

  def __repr__(self) -> str:
    return f"Pipeline({self.spec!r})"


def _split_ops(node: ast.AST) -> List[ast.AST]:
  """Flattens the left-nested `a | b | c` expression into [a, b, c]."""
  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
    return _split_ops(node.left) + _split_ops(node.right)
  return [node]


def _build_op(node: ast.AST, spec: str) -> Op:
  text = ast.get_source_segment(spec, node)
  if isinstance(node, ast.Name):
    name, keywords = node.id, []
  elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
    name, keywords = node.func.id, node.keywords
    if node.args or any(kw.arg is None for kw in keywords):
      raise ValueError(f"preprocessing op {name!r}: arguments must be given by keyword, "
                       f"e.g. {name}(size=(512, 512)); got {text!r}.")
  else:
    raise ValueError(f"cannot read {text!r} in preprocessing spec {spec!r}: expected "
                     "`name` or `name(key=value, ...)` between '|'.")
  factory = PREPROCESS_OPS.get(name)
  kwargs = {}
  for kw in keywords:
    try:
      kwargs[kw.arg] = ast.literal_eval(kw.value)
    except (ValueError, TypeError, SyntaxError, RecursionError):
      raise ValueError(
          f"preprocessing op {name!r}: argument `{kw.arg}` must be a Python literal, "
          f"got {ast.get_source_segment(spec, kw.value)!r}.") from None
  signature = inspect.signature(factory)
  known = ", ".join(signature.parameters) or "none"
  unknown = [k for k in kwargs if k not in signature.parameters]
  if unknown:
    raise ValueError(f"preprocessing op {name!r} got unknown argument(s) {unknown}; "
                     f"its arguments are: {known}.")
  try:
    signature.bind(**kwargs)
  except TypeError as e:
    raise ValueError(f"preprocessing op {name!r}: {e}; its arguments are: {known}.") from None
  return factory(**kwargs)


def parse_pipeline(spec: str) -> Pipeline:
  """Builds `fn(example, rng) -> example` from "op1|op2(key=literal, ...)|...".

  The spec is read with `ast` (only literals are evaluated, never code); an
  empty spec gives the identity. Unknown ops raise KeyError listing known ops;
  bad arguments raise ValueError naming the op and the argument.
  """
  if not spec.strip():
    return Pipeline(spec, [])
  try:
    tree = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"cannot parse preprocessing spec {spec!r}: {e.msg}.") from None
  return Pipeline(spec, [_build_op(node, spec.strip()) for node in _split_ops(tree)])
