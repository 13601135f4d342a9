"""Instance and segment ops: the per-instance rows (boxes, classes, masks) and
panoptic segment rows, their static padding and their targets."""
from typing import Dict, Tuple

import cv2
import numpy as np

from segjax.data.transforms.common import (
    INSTANCE_KEYS, SEGMENT_KEYS, Example, Op, _check, _check_int, _require, _spatial_size,
    register_op)

# tfds sequence field -> (example key, dtype, shape of one row).
_OBJECT_FIELDS = {"box": ("boxes", np.float32, (4,)), "class": ("classes", np.int32, ()),
                  "is_crowd": ("is_crowd", np.bool_, ()), "mask": ("masks", np.uint8, None)}
_SEGMENT_FIELDS = {"id": ("segment_ids", np.int32, ()),
                   "class": ("segment_classes", np.int32, ()),
                   "is_thing": ("segment_is_thing", np.bool_, ()),
                   "is_crowd": ("segment_is_crowd", np.bool_, ()),
                   "area": ("segment_areas", np.int32, ())}


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


@register_op("unpack_instances")
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


@register_op("pad_instances")
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


@register_op("instance_masks")
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


@register_op("thing_classes")
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


@register_op("crop_masks")
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


@register_op("panoptic_semantic")
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
