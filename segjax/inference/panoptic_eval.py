"""Panoptic inference with a `PanopticFPN`: batched segment maps, PQ on the eval split, and
COCO panoptic PNG + JSON for new images.

The fusion (`model.fusion`) runs on the device inside the jitted step; the host turns each
map into panopticapi's PNG + segments_info (`segjax.inference.panoptic`) and scores it with
`PQAccumulator` against the split's own panoptic annotations.
"""
import functools
import json
import os
from typing import Any, Dict, List, Sequence

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segjax.data import pipeline
from segjax.data.sources import DatasetSpec
from segjax.inference.instances import padded_input
from segjax.inference.panoptic import (heuristic_fusion, parameter_free_fusion,
                                       to_coco_panoptic, write_coco_panoptic)
from segjax.metrics.panoptic import PQAccumulator, rgb_to_id
from segjax.models.semantic_fpn import upsample_logits
from segjax.ops import paste_masks

EVAL_KEYS = ("image", "panoptic", "segment_ids", "segment_classes", "segment_valid")


def segment_images(state, images: jax.Array, *, model, overlap_threshold: float = 0.5,
                   stuff_area_threshold: int = 4096, instance_score_threshold: float = 0.5,
                   unknown: bool = False) -> Dict[str, jax.Array]:
  """Panoptic segment maps [B, H, W] of a batch (0 void, detection slot i -> i + 1, stuff
  class s -> D + 1 + s), with each detection's `classes` and `scores`."""
  out = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images,
                    train=False)
  size = images.shape[1:3]
  semantic = upsample_logits(out["semantic"], size)
  if model.fusion == "heuristic":
    probabilities = jax.vmap(lambda m, b: paste_masks(m, b, size))(out["masks"], out["boxes"])
    fuse = functools.partial(
        heuristic_fusion, num_stuff=len(model.stuff_classes),
        overlap_threshold=overlap_threshold, stuff_area_threshold=stuff_area_threshold,
        instance_score_threshold=instance_score_threshold)
    segments = jax.vmap(lambda m, s, v, l: fuse(m, s, v, l)[0])(
        probabilities, out["scores"], out["valid"], jnp.argmax(semantic, axis=-1))
  else:
    logits = jax.vmap(lambda m, b: paste_masks(m, b, size))(out["mask_logits"], out["boxes"])
    fuse = functools.partial(parameter_free_fusion, thing_channels=tuple(model.thing_classes),
                             stuff_channels=tuple(model.stuff_classes), unknown=unknown)
    segments = jax.vmap(lambda s, m, b, c, v: fuse(s, m, b, c, v)[0])(
        semantic, logits, out["boxes"], out["classes"], out["valid"])
  return {"segments": segments, "classes": out["classes"], "scores": out["scores"]}


def make_segment_fn(model, config: ml_collections.ConfigDict, state_shardings=None,
                    batch_sharding=None):
  """The jitted `segment_images` with the config's fusion thresholds."""
  fusion = config.inference.panoptic
  fn = functools.partial(segment_images, model=model, overlap_threshold=fusion.overlap_threshold,
                         stuff_area_threshold=fusion.stuff_area_threshold,
                         instance_score_threshold=fusion.instance_score_threshold,
                         unknown=fusion.unknown)
  if state_shardings is None:
    return jax.jit(fn)
  return jax.jit(fn, in_shardings=(state_shardings, batch_sharding), out_shardings=batch_sharding)


def categories(dataset: DatasetSpec) -> List[Dict[str, Any]]:
  """COCO panoptic categories of the dataset: id = class id."""
  things = set(dataset.thing_classes)
  return [{"id": c, "name": name, "isthing": int(c in things)}
          for c, name in enumerate(dataset.class_names)]


def stuff_classes(dataset: DatasetSpec) -> tuple:
  """Class ids without instance annotations."""
  return tuple(c for c in range(dataset.num_classes) if c not in set(dataset.thing_classes))


def predicted_segments(segments: np.ndarray, classes: np.ndarray, scores: np.ndarray,
                       model) -> tuple:
  """(png [H, W, 3], segments_info) of one fused map in COCO panoptic form, with the
  model's thing and stuff class ids as category ids."""
  png, info = to_coco_panoptic(segments, classes, thing_category_ids=model.thing_classes,
                               stuff_category_ids=model.stuff_classes, scores=scores)
  return png, info


def at_original_size(segments: np.ndarray, resized_size, original_size,
                     frame: Sequence[int]) -> np.ndarray:
  """A segment map of a resized image, cropped to its `resized_size` (h, w), resized back to
  `original_size` by nearest neighbour and zero-padded (void) to `frame` (H, W)."""
  (rh, rw), (oh, ow) = (int(v) for v in resized_size), (int(v) for v in original_size)
  resized = cv2.resize(np.ascontiguousarray(segments[:rh, :rw], np.int32), (ow, oh),
                       interpolation=cv2.INTER_NEAREST)
  out = np.zeros(tuple(frame), np.int32)
  out[:oh, :ow] = resized
  return out


def evaluate(state, segment_fn, dataset: DatasetSpec, config: ml_collections.ConfigDict,
             model, batch_sharding) -> Dict[str, Any]:
  """PQ/SQ/RQ (All, Things, Stuff, per class) of the model on `data.eval_split`, scored
  against each image's panoptic annotation at its original size."""
  from segjax.training.trainer import data_ops  # the trainer imports this module
  source = dataset.source(config.data.eval_split)
  accumulator = PQAccumulator(categories(dataset))
  for i, batch in enumerate(pipeline.eval_batches(
      source, data_ops(config, config.data.eval_ops, dataset), config.data.eval_batch_size,
      dataset.ignore_index, keys=EVAL_KEYS, optional_keys=("segment_is_crowd",))):
    found = pipeline.to_host(segment_fn(
        state, pipeline.to_global({"image": batch["image"]}, batch_sharding)["image"]))
    truth = pipeline.to_host({k: v for k, v in batch.items() if k != "image"})
    real, index = pipeline.eval_slots(source, config.data.eval_batch_size, i)
    for b in np.flatnonzero(real):
      gt = [{"id": int(s), "category_id": int(c),
             "iscrowd": int(truth["segment_is_crowd"][b][k]) if "segment_is_crowd" in truth
             else 0}
            for k, (s, c, v) in enumerate(zip(truth["segment_ids"][b],
                                               truth["segment_classes"][b],
                                               truth["segment_valid"][b])) if v]
      gt_ids = rgb_to_id(truth["panoptic"][b])
      segments = found["segments"][b]
      if "original_size" in truth:  # a test-time resize: back to the annotation's frame
        segments = at_original_size(segments, truth["resized_size"][b],
                                    truth["original_size"][b], gt_ids.shape)
      _, info = predicted_segments(segments, found["classes"][b], found["scores"][b], model)
      accumulator.add(gt_ids, gt, segments, info, image_id=int(index[b]))
  result = accumulator.result()
  metrics = {"pq": result, "categories": categories(dataset)}
  for group, short in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
    for key in ("pq", "sq", "rq"):
      metrics[f"{key.upper()}{short}"] = result[group][key]
  return metrics


def predict_files(config: ml_collections.ConfigDict, dataset: DatasetSpec, model, state,
                  files: Sequence[str], output_dir: str, read_image) -> List[str]:
  """Writes <stem>.png (COCO panoptic ids as RGB) per image and `predictions.json`
  ({"annotations", "categories"}, the prediction JSON `pq_compute` reads)."""
  segment = make_segment_fn(model, config)
  mean, std = np.asarray(config.data.mean, np.float32), np.asarray(config.data.std, np.float32)
  os.makedirs(output_dir, exist_ok=True)
  annotations, written = [], []
  for path in files:
    image = read_image(path)
    h, w = image.shape[:2]
    found = jax.device_get(segment(state, padded_input(image, mean, std)))
    stem = os.path.splitext(os.path.basename(path))[0]
    png, info = predicted_segments(np.asarray(found["segments"][0, :h, :w]),
                                   np.asarray(found["classes"][0]),
                                   np.asarray(found["scores"][0]), model)
    annotations.append(write_coco_panoptic(output_dir, f"{stem}.png", png, info,
                                           image_id=stem))
    written.append(os.path.join(output_dir, f"{stem}.png"))
  json_path = os.path.join(output_dir, "predictions.json")
  with open(json_path, "w") as f:
    json.dump({"annotations": annotations, "categories": categories(dataset)}, f)
  return written + [json_path]
