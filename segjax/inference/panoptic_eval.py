"""Panoptic inference with a `PanopticFPN`: batched segment maps and what turns them
into COCO panoptic form.

The fusion (`model.fusion`) runs on the device inside the jitted step; the host turns each
map into panopticapi's PNG + segments_info (`segjax.inference.panoptic`), which the
panoptic task scores and writes.
"""
import functools
from typing import Any, Dict, List, Sequence

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segjax.data import device
from segjax.data.sources import DatasetSpec
from segjax.inference.panoptic import (heuristic_fusion, parameter_free_fusion,
                                       to_coco_panoptic)
from segjax.models.semantic_fpn import upsample_logits
from segjax.ops import paste_masks

EVAL_KEYS = ("image", "panoptic", "segment_ids", "segment_classes", "segment_valid")


def segment_images(variables, images: jax.Array, extent=None, *, model,
                   overlap_threshold: float = 0.5, stuff_area_threshold: int = 4096,
                   instance_score_threshold: float = 0.5, unknown: bool = False,
                   mean=device.IMAGENET_MEAN, std=device.IMAGENET_STD) -> Dict[str, jax.Array]:
  """Panoptic segment maps [B, H, W] of a batch (0 void, detection slot i -> i + 1, stuff
  class s -> D + 1 + s), with each detection's `classes` and `scores`.

  uint8 images are normalized with `mean` / `std` (`device.normalize`), pixels beyond
  `extent` ((B, 2) real height and width, if given) 0 after normalization."""
  out = model.apply(variables, device.normalize(images, mean, std, extent), train=False)
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


def make_segment_fn(model, config: ml_collections.ConfigDict, variable_shardings=None,
                    batch_sharding=None):
  """The jitted `segment_images` with the config's fusion thresholds."""
  fusion = config.inference.panoptic
  fn = functools.partial(segment_images, model=model, overlap_threshold=fusion.overlap_threshold,
                         stuff_area_threshold=fusion.stuff_area_threshold,
                         instance_score_threshold=fusion.instance_score_threshold,
                         unknown=fusion.unknown, mean=tuple(config.data.mean),
                         std=tuple(config.data.std))
  if batch_sharding is None:
    return jax.jit(fn)
  return jax.jit(fn, in_shardings=(variable_shardings, batch_sharding),
                 out_shardings=batch_sharding)


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
