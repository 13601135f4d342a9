"""Panoptic fusion of instance and semantic predictions, and the COCO panoptic writer.

Two ways to turn one image's detections and semantic logits into a panoptic map:

* `heuristic_fusion`: Panoptic FPN's rule (Kirillov et al. 2019), as detectron2's
  `combine_semantic_and_instance_outputs`: instances paint the map in descending score
  order, then each stuff class fills what is left if enough of it remains.
* `parameter_free_fusion`: UPSNet's parameter-free panoptic head (Xiong et al. 2019):
  one softmax per pixel over the stuff logits and one logit per detected instance,
  optionally with an "unknown" channel.

Both take one image with static shapes and are compiled once per shape and setting; they
also trace inside an outer jit or vmap (for a batch). Both return a segment map with one
id convention, for D detection slots and S stuff classes: 0 = void, instance slot
i -> i + 1, stuff class s -> D + 1 + s.

`to_coco_panoptic` turns such a map into panopticapi's PNG + segments_info on the host,
and `write_coco_panoptic` stores them as one annotation of a prediction JSON that
`segjax.metrics.pq_compute` reads.
"""
import functools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from scipy import ndimage

from segjax import paths
from segjax.metrics.panoptic import id_to_rgb


def _check_shapes(num: int, arrays: Sequence[Tuple[str, Any, Tuple[int, ...]]]) -> None:
  """Raises naming the first (name, array, expected shape) whose shape differs."""
  for name, value, shape in arrays:
    if tuple(np.shape(value)) != shape:
      raise ValueError(f"{name} must have shape {shape} for {num} detection slots, got "
                       f"{tuple(np.shape(value))}.")


def heuristic_fusion(masks: jax.Array, scores: jax.Array, valid: jax.Array,
                     stuff_labels: jax.Array, *, num_stuff: int,
                     overlap_threshold: float = 0.5, stuff_area_threshold: int = 4096,
                     instance_score_threshold: float = 0.5,
                     mask_threshold: float = 0.5) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Panoptic FPN's heuristic fusion (detectron2 `combine_semantic_and_instance_outputs`).

  Valid instances are visited in descending score order (stable: equal scores keep their
  slot order) and the visit stops at the first score below `instance_score_threshold`
  (a score equal to it is kept); invalid slots are never visited. An instance with an
  empty mask is skipped, so is one whose mask already lies on taken pixels for more than
  `overlap_threshold` of its area; any other takes its still-free pixels. Then, for each
  stuff class, its still-free pixels of `stuff_labels` become one segment if there are at
  least `stuff_area_threshold` of them.

  The detections' classes play no part in the fusion; they only label the segments (see
  `to_coco_panoptic`). The overlap fraction is computed in float32, which can differ from
  detectron2's float64 only for a fraction within ~1e-7 of the threshold.

  Args:
    masks: [D, H, W] instance masks pasted into the image: bool, or probabilities
      binarized as `masks >= mask_threshold` (detectron2's `paste_masks_in_image`).
    scores: [D] detection scores.
    valid: [D] bool, False for padding slots.
    stuff_labels: [H, W] int semantic argmax in the "things + stuff" label space:
      0 = any thing, s in [1, num_stuff] = stuff class s - 1; other values are no stuff.
    num_stuff: static number of stuff classes.
    overlap_threshold: the largest taken fraction of an instance's mask it survives.
    stuff_area_threshold: the fewest free pixels a stuff segment needs.
    instance_score_threshold: the lowest score of an instance that is added.
    mask_threshold: binarization threshold of non-bool masks.

  Returns:
    segment_map: [H, W] int32; 0 = void, instance slot i -> i + 1, stuff class s ->
      D + 1 + s.
    kept_instances: [D] bool, the instances that took pixels.
    kept_stuff: [num_stuff] bool, the stuff classes that became segments.
  """
  masks, stuff_labels = jnp.asarray(masks), jnp.asarray(stuff_labels)
  if masks.ndim != 3:
    raise ValueError(f"masks must be [D, H, W], got shape {masks.shape}.")
  num, height, width = masks.shape
  _check_shapes(num, [("scores", scores, (num,)), ("valid", valid, (num,)),
                      ("stuff_labels", stuff_labels, (height, width))])
  if num_stuff < 0:
    raise ValueError(f"num_stuff must be >= 0, got {num_stuff}.")
  return _heuristic_fusion(masks, jnp.asarray(scores, jnp.float32), jnp.asarray(valid, bool),
                           stuff_labels.astype(jnp.int32), num_stuff=int(num_stuff),
                           overlap_threshold=float(overlap_threshold),
                           stuff_area_threshold=int(stuff_area_threshold),
                           instance_score_threshold=float(instance_score_threshold),
                           mask_threshold=float(mask_threshold))


@functools.partial(jax.jit, static_argnames=("num_stuff", "overlap_threshold",
                                             "stuff_area_threshold",
                                             "instance_score_threshold", "mask_threshold"))
def _heuristic_fusion(masks, scores, valid, stuff_labels, *, num_stuff, overlap_threshold,
                      stuff_area_threshold, instance_score_threshold, mask_threshold):
  """`heuristic_fusion` on checked inputs, compiled once per shape and setting."""
  num, height, width = masks.shape
  binary = masks if masks.dtype == jnp.bool_ else masks >= mask_threshold
  key = jnp.where(valid, scores, -jnp.inf)
  order = jnp.argsort(-key, stable=True)
  # Sorted scores descend, so the instances up to the first one below the threshold are
  # exactly those at or above it: the loop runs over that prefix.
  num_visited = jnp.sum(key >= instance_score_threshold)

  def visit(k, carry):
    segment_map, kept = carry
    slot = order[k]
    mask = binary[slot]
    area = jnp.sum(mask, dtype=jnp.int32)
    taken = segment_map > 0
    overlap = jnp.sum(mask & taken, dtype=jnp.int32)
    fraction = overlap.astype(jnp.float32) / jnp.maximum(area, 1).astype(jnp.float32)
    take = (area > 0) & (fraction <= overlap_threshold)
    segment_map = jnp.where(take & mask & ~taken, slot + 1, segment_map)
    return segment_map, kept.at[slot].set(take)

  segment_map, kept_instances = jax.lax.fori_loop(
      0, num_visited, visit,
      (jnp.zeros((height, width), jnp.int32), jnp.zeros((num,), bool)))

  free = segment_map == 0
  stuff_ids = jnp.arange(1, num_stuff + 1, dtype=jnp.int32)
  # One compare-and-count per class: a fused reduction, cheaper than a scatter on TPU.
  free_area = jnp.sum((stuff_labels[None] == stuff_ids[:, None, None]) & free[None],
                      axis=(1, 2), dtype=jnp.int32)
  kept_stuff = free_area >= stuff_area_threshold
  is_stuff = (stuff_labels >= 1) & (stuff_labels <= num_stuff)
  label_kept = jnp.concatenate([jnp.zeros((1,), bool), kept_stuff])[
      jnp.where(is_stuff, stuff_labels, 0)]
  segment_map = jnp.where(free & is_stuff & label_kept, num + stuff_labels, segment_map)
  return segment_map, kept_instances, kept_stuff


def _box_pixels(boxes: jax.Array, height: int, width: int) -> jax.Array:
  """[D, H, W] bool: pixels of each float32 box, rows floor(y1) .. round(y2) - 1, same for columns.

  UPSNet's `SegTerm` crops rows int(y1) .. round(y2) inclusive of its "+1" boxes, whose
  y2 is the last pixel; with continuous (x1, y1, x2, y2) boxes that is the end-exclusive
  round(y2). Rounding is half to even, like numpy's.
  """
  start = jnp.floor(boxes[:, :2]).astype(jnp.int32)
  stop = jnp.round(boxes[:, 2:]).astype(jnp.int32)
  rows = jnp.arange(height, dtype=jnp.int32)
  cols = jnp.arange(width, dtype=jnp.int32)
  in_rows = (rows[None] >= start[:, 1:2]) & (rows[None] < stop[:, 1:2])
  in_cols = (cols[None] >= start[:, 0:1]) & (cols[None] < stop[:, 0:1])
  return in_rows[:, :, None] & in_cols[:, None, :]


def parameter_free_fusion(semantic_logits: jax.Array, mask_logits: jax.Array,
                          boxes: jax.Array, classes: jax.Array, valid: jax.Array, *,
                          thing_channels: Sequence[int], stuff_channels: Sequence[int],
                          unknown: bool = False) -> Tuple[jax.Array, jax.Array]:
  """UPSNet's parameter-free panoptic head for one image.

  Panoptic logits per pixel: the S stuff channels of the semantic logits, then for each
  detection slot i the instance logit `mask_logits[i] + semantic logit of its class's
  channel` inside its box (`_box_pixels`) and -inf elsewhere, -inf everywhere for invalid
  slots; then with `unknown` one more channel. Softmax gives the probabilities, the argmax
  the segment: a stuff class, an instance, or void for unknown.

  Outside its box an instance's logit is -inf, where UPSNet puts 0: an instance can then
  only take pixels of its box, where its mask was predicted. With 0, a detection would win
  every pixel off its box whose stuff logits are all negative, and the zeros of several
  such detections tie, the first slot taking them all: spurious segments far from the
  object. Inside the box both choices agree.

  The unknown logit follows UPSNet's released code (`resnet_upsnet.py`, void logits):
  max over thing classes of the semantic logits minus max over valid instances of their
  cropped semantic logit (the class channel inside the box, 0 outside it as in UPSNet,
  and 0 when there is no valid instance). It wins where the semantic head sees a thing
  that the detections do not explain; those pixels are void.

  Args:
    semantic_logits: [H, W, C] semantic logits over all (thing and stuff) channels.
    mask_logits: [D, H, W] instance mask logits pasted into the image (values outside
      the box are not used).
    boxes: [D, 4] (x1, y1, x2, y2) boxes in image pixels.
    classes: [D] int 0-based thing class of each slot, in [0, len(thing_channels)).
    valid: [D] bool, False for padding slots.
    thing_channels: static semantic channel of each thing class.
    stuff_channels: static semantic channel of each stuff class.
    unknown: adds UPSNet's unknown channel.

  Returns:
    segment_map: [H, W] int32; instance slot i -> i + 1, stuff class s -> D + 1 + s,
      0 (void) where unknown wins or where no channel applies (no stuff channel and no
      box covering the pixel).
    probabilities: [H, W, S + D (+ 1)] float32 softmax over stuff classes, detection
      slots (and unknown); all zero where no channel applies.
  """
  semantic_logits = jnp.asarray(semantic_logits, jnp.float32)
  mask_logits = jnp.asarray(mask_logits, jnp.float32)
  if semantic_logits.ndim != 3:
    raise ValueError(f"semantic_logits must be [H, W, C], got shape {semantic_logits.shape}.")
  height, width, channels = semantic_logits.shape
  if mask_logits.ndim != 3 or mask_logits.shape[1:] != (height, width):
    raise ValueError(f"mask_logits must be [D, {height}, {width}] like the semantic logits, "
                     f"got shape {mask_logits.shape}.")
  num = mask_logits.shape[0]
  _check_shapes(num, [("boxes", boxes, (num, 4)), ("classes", classes, (num,)),
                      ("valid", valid, (num,))])
  thing_channels = tuple(int(c) for c in thing_channels)
  stuff_channels = tuple(int(c) for c in stuff_channels)
  for name, chosen in (("thing_channels", thing_channels), ("stuff_channels", stuff_channels)):
    if any(c < 0 or c >= channels for c in chosen):
      raise ValueError(f"{name} {chosen} must lie in [0, {channels}), the semantic logits' "
                       f"channels.")
  if set(thing_channels) & set(stuff_channels):
    raise ValueError(f"thing_channels and stuff_channels share channels "
                     f"{sorted(set(thing_channels) & set(stuff_channels))}; each channel is "
                     f"either a thing or a stuff class.")
  if num and not thing_channels:
    raise ValueError("thing_channels is empty but there are detection slots; give the "
                     "semantic channel of each thing class.")
  if unknown and not thing_channels:
    raise ValueError("unknown=True needs thing_channels: the unknown logit is built from "
                     "the semantic thing logits.")
  return _parameter_free_fusion(semantic_logits, mask_logits, jnp.asarray(boxes, jnp.float32),
                                jnp.asarray(classes, jnp.int32), jnp.asarray(valid, bool),
                                thing_channels=thing_channels, stuff_channels=stuff_channels,
                                unknown=bool(unknown))


@functools.partial(jax.jit, static_argnames=("thing_channels", "stuff_channels", "unknown"))
def _parameter_free_fusion(semantic_logits, mask_logits, boxes, classes, valid, *,
                           thing_channels, stuff_channels, unknown):
  """`parameter_free_fusion` on checked inputs, compiled once per shape and setting."""
  height, width, _ = semantic_logits.shape
  num = mask_logits.shape[0]
  thing_logits = semantic_logits[..., jnp.array(thing_channels, jnp.int32)]
  stuff_logits = semantic_logits[..., jnp.array(stuff_channels, jnp.int32)]
  class_logits = jnp.moveaxis(jnp.take(thing_logits, classes, axis=-1, mode="clip"), -1, 0)
  in_box = _box_pixels(boxes, height, width) & valid[:, None, None]
  instance_logits = jnp.where(in_box, mask_logits + class_logits, -jnp.inf)
  parts = [stuff_logits, jnp.moveaxis(instance_logits, 0, -1)]
  if unknown:
    cropped = jnp.where(in_box, class_logits, 0.0)
    explained = jnp.max(jnp.where(valid[:, None, None], cropped, -jnp.inf), axis=0,
                        initial=-jnp.inf)
    explained = jnp.where(jnp.any(valid), explained, 0.0)
    parts.append((jnp.max(thing_logits, axis=-1) - explained)[..., None])
  logits = jnp.concatenate(parts, axis=-1)

  best = jnp.max(logits, axis=-1, keepdims=True)
  applies = jnp.isfinite(best)
  exp = jnp.exp(logits - jnp.where(applies, best, 0.0))
  probabilities = jnp.where(applies, exp / jnp.sum(exp, axis=-1, keepdims=True), 0.0)

  num_stuff = len(stuff_channels)
  winner = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  segment_map = jnp.where(winner < num_stuff, num + 1 + winner,
                          jnp.where(winner < num_stuff + num, winner - num_stuff + 1, 0))
  return jnp.where(applies[..., 0], segment_map, 0), probabilities


def to_coco_panoptic(segment_map: np.ndarray, classes: np.ndarray, *,
                     thing_category_ids: Sequence[int], stuff_category_ids: Sequence[int],
                     scores: Optional[np.ndarray] = None
                     ) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
  """panopticapi's PNG and segments_info of one fused segment map (host, numpy).

  Segment ids are kept as the fusion numbered them (instance slot i -> i + 1, stuff
  class s -> D + 1 + s, D = len(classes)): distinct, nonzero, and exactly the PNG's.
  Ids absent from the map get no entry.

  Args:
    segment_map: [H, W] integer map from `heuristic_fusion` or `parameter_free_fusion`.
    classes: [D] 0-based thing class of each detection slot.
    thing_category_ids: COCO category id of each thing class.
    stuff_category_ids: COCO category id of each stuff class (S entries).
    scores: optional [D] detection scores, stored as each instance segment's "score".

  Returns:
    png: [H, W, 3] uint8 RGB encoding of the ids (`id_to_rgb`).
    segments_info: per segment {id, category_id, iscrowd: 0, area, bbox [x, y, w, h],
      isthing}, plus score for instances when scores are given; in id order.
  """
  segment_map = np.asarray(segment_map)
  classes = np.asarray(classes)
  if segment_map.ndim != 2 or not np.issubdtype(segment_map.dtype, np.integer):
    raise ValueError(f"segment_map must be a 2-D integer array, got {segment_map.dtype} of "
                     f"shape {segment_map.shape}.")
  if classes.ndim != 1:
    raise ValueError(f"classes must be [D], got shape {classes.shape}.")
  if scores is not None and np.shape(scores) != classes.shape:
    raise ValueError(f"scores must have the shape of classes {classes.shape}, got "
                     f"{np.shape(scores)}.")
  num, num_stuff = len(classes), len(stuff_category_ids)
  segment_map = segment_map.astype(np.int64)
  if segment_map.size and (segment_map.min() < 0 or segment_map.max() > num + num_stuff):
    raise ValueError(f"segment_map ids must lie in [0, D + S] = [0, {num + num_stuff}] for "
                     f"D = {num} detection slots and S = {num_stuff} stuff classes, got "
                     f"[{segment_map.min()}, {segment_map.max()}].")
  ids, areas = np.unique(segment_map, return_counts=True)
  boxes = ndimage.find_objects(segment_map, max_label=num + num_stuff)
  segments_info = []
  for segment_id, area in zip(ids.tolist(), areas.tolist()):
    if segment_id == 0:
      continue
    if segment_id <= num:
      thing_class = int(classes[segment_id - 1])
      if not 0 <= thing_class < len(thing_category_ids):
        raise ValueError(f"Detection slot {segment_id - 1} has thing class {thing_class}, "
                         f"outside the {len(thing_category_ids)} thing_category_ids.")
      info = {"category_id": int(thing_category_ids[thing_class]), "isthing": True}
      if scores is not None:
        info["score"] = float(scores[segment_id - 1])
    else:
      info = {"category_id": int(stuff_category_ids[segment_id - num - 1]), "isthing": False}
    rows, cols = boxes[segment_id - 1]
    segments_info.append({
        "id": segment_id, "iscrowd": 0, "area": area,
        "bbox": [cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start],
        **info})
  return id_to_rgb(segment_map), segments_info


def write_coco_panoptic(folder: str, file_name: str, png: np.ndarray,
                        segments_info: List[Dict[str, Any]], *, image_id: Any) -> Dict[str, Any]:
  """Writes the PNG to folder/file_name; returns the annotation for the prediction JSON.

  The returned {image_id, file_name, segments_info} goes into the JSON's "annotations"
  list; `pq_compute(gt_json, pred_json, pred_folder=folder)` reads both back.
  """
  png = np.asarray(png)
  if png.ndim != 3 or png.shape[2] != 3 or png.dtype != np.uint8:
    raise ValueError(f"png must be [H, W, 3] uint8 (from to_coco_panoptic), got {png.dtype} "
                     f"of shape {png.shape}.")
  if not file_name.lower().endswith(".png"):
    raise ValueError(f"file_name {file_name!r} must end in .png: the ids are stored "
                     f"losslessly as RGB.")
  path = paths.path(folder) / file_name  # local or gs://
  path.parent.mkdir(parents=True, exist_ok=True)
  paths.save_image(Image.fromarray(png), path)
  return {"image_id": image_id, "file_name": file_name, "segments_info": segments_info}


__all__ = ["heuristic_fusion", "parameter_free_fusion", "to_coco_panoptic",
           "write_coco_panoptic"]
