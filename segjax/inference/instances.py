"""Instance segmentation inference: batched detections at the original resolution
(what the instance task's COCO evaluator scores), single images of any size
(`ImageDetector`, predict.py) and drawn detections."""
import functools
from typing import Dict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segjax import visualization
from segjax.data.sources import DatasetSpec
from segjax.ops import clip_boxes, paste_masks


def detect_at_original_size(variables, batch: Dict[str, jax.Array], *, model,
                            mask_threshold: float = 0.5,
                            mask_size=None) -> Dict[str, jax.Array]:
  """Detections of a batch in its ground truth's frame.

  With `resized_size` / `original_size` (a test-time `resize(resize_labels=False)`),
  boxes are clipped to the resized image, scaled back to the original one and clipped
  again; masks are pasted at `mask_size` (static (H, W)), else the ground-truth
  masks' (padded) size, else the image's, as bool `probability > mask_threshold`
  (torchvision's rule).
  """
  images = batch["image"]
  resized = batch.get("resized_size")
  out = model.apply(variables, images, train=False, image_sizes=resized)
  boxes = out["boxes"]
  if resized is not None:
    scale = (batch["original_size"] / jnp.maximum(resized, 1)).astype(jnp.float32)
    boxes = boxes * jnp.stack([scale[:, 1], scale[:, 0]] * 2, axis=-1)[:, None, :]
    size = batch["original_size"]
    boxes = jax.vmap(clip_boxes)(boxes, size[:, 0], size[:, 1])
  out["boxes"] = boxes
  if "masks" in out:
    size = mask_size or (batch["masks"].shape[2:4] if "masks" in batch else images.shape[1:3])
    paste = lambda m, b: paste_masks(m, b, size, threshold=mask_threshold)
    out["masks"] = jax.vmap(paste)(out["masks"], boxes)
  return out


def make_detect_fn(model, variable_shardings=None, batch_sharding=None):
  """The jitted `detect_at_original_size`: (variables, batch) -> detections."""
  fn = functools.partial(detect_at_original_size, model=model)
  if batch_sharding is None:
    return jax.jit(fn)
  return jax.jit(fn, in_shardings=(variable_shardings, batch_sharding),
                 out_shardings=batch_sharding)


def draw(image: np.ndarray, detections: Dict[str, np.ndarray], index: int,
         dataset: DatasetSpec, score_threshold: float = 0.5) -> np.ndarray:
  """One image (uint8) with detection `index` of a batch drawn on it."""
  names = [dataset.class_names[c] for c in dataset.thing_classes]
  palette = np.asarray(dataset.palette)[list(dataset.thing_classes)]
  masks = detections.get("masks")
  return visualization.draw_instances(
      image, detections["boxes"][index], detections["classes"][index],
      detections["scores"][index], None if masks is None else masks[index], names, palette,
      valid=detections["valid"][index], score_threshold=score_threshold)


def panel(batch: Dict[str, np.ndarray], detections: Dict[str, np.ndarray],
          dataset: DatasetSpec, config: ml_collections.ConfigDict, count: int = 4) -> np.ndarray:
  """A row of up to `count` eval images with their detections."""
  mean, std = np.asarray(config.data.mean), np.asarray(config.data.std)
  tiles = []
  for b in range(min(count, len(batch["image"]))):
    image = np.clip(batch["image"][b] * std + mean, 0, 255).astype(np.uint8)
    tiles.append(np.pad(draw(image, detections, b, dataset), ((0, 0), (0, 4), (0, 0))))
  return np.concatenate(tiles, axis=1)


def padded_input(image: np.ndarray, mean, std, size_divisor: int = 32) -> np.ndarray:
  """A uint8 RGB image as a model input [1, H', W', 3]: normalized, then zero-padded
  bottom/right to multiples of `size_divisor` (as the `pad` op pads after `normalize`)."""
  h, w = image.shape[:2]
  ph, pw = (-(-n // size_divisor) * size_divisor for n in (h, w))
  padded = np.zeros((1, ph, pw, 3), np.float32)
  padded[0, :h, :w] = (image.astype(np.float32) - mean) / std
  return padded


class ImageDetector:
  """Detections of single RGB uint8 images of any size, in each image's own frame.

  Each image is resized by `inference.scale` (keep-ratio, if set), normalized and
  padded to a multiple of `size_divisor`; its boxes and pasted masks come back at its
  original size, as a dict of numpy arrays (one compile per distinct size).
  """

  def __init__(self, config: ml_collections.ConfigDict, model, variables,
               size_divisor: int = 32):
    self._detect = jax.jit(functools.partial(detect_at_original_size, model=model),
                           static_argnames="mask_size")
    self._variables = variables
    self._scale = tuple(config.inference.scale)
    self._mean = np.asarray(config.data.mean, np.float32)
    self._std = np.asarray(config.data.std, np.float32)
    self._divisor = size_divisor

  def __call__(self, image: np.ndarray) -> Dict[str, np.ndarray]:
    from segjax.data import transforms
    h, w = image.shape[:2]
    resized = image
    if min(self._scale) > 0:
      resized = transforms.resize(self._scale)({"image": image}, None)["image"]
    rh, rw = resized.shape[:2]
    padded = padded_input(resized, self._mean, self._std, self._divisor)
    batch = {"image": padded, "resized_size": np.int32([[rh, rw]]),
             "original_size": np.int32([[h, w]])}
    out = jax.device_get(self._detect(self._variables, batch, mask_size=(h, w)))
    return {k: np.asarray(v)[0] for k, v in out.items()}
