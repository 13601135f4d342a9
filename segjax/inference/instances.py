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
from segjax.data import device
from segjax.data.sources import DatasetSpec
from segjax.ops import clip_boxes, paste_masks


def detect_at_original_size(variables, batch: Dict[str, jax.Array], *, model,
                            mask_threshold: float = 0.5, mask_size=None,
                            mean=device.IMAGENET_MEAN,
                            std=device.IMAGENET_STD) -> Dict[str, jax.Array]:
  """Detections of a batch in its ground truth's frame.

  uint8 images are normalized with `mean` / `std` (`device.normalize`), their pixels
  beyond the batch's `extent` (if any, (B, 2)) set to 0 after normalization.
  With `resized_size` / `original_size` (a test-time `resize(resize_labels=False)`),
  boxes are clipped to the resized image, scaled back to the original one and clipped
  again; masks are pasted at `mask_size` (static (H, W)), else the ground-truth
  masks' (padded) size, else the image's, as bool `probability > mask_threshold`
  (torchvision's rule).
  """
  images = device.normalize(batch["image"], mean, std, batch.get("extent"))
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


def make_detect_fn(model, variable_shardings=None, batch_sharding=None,
                   mean=device.IMAGENET_MEAN, std=device.IMAGENET_STD):
  """The jitted `detect_at_original_size`: (variables, batch) -> detections."""
  fn = functools.partial(detect_at_original_size, model=model, mean=tuple(mean), std=tuple(std))
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
  """A row of up to `count` eval images (uint8, or normalized float) with their
  detections."""
  tiles = []
  for b in range(min(count, len(batch["image"]))):
    image = visualization.denormalize(batch["image"][b], config.data.mean, config.data.std)
    tiles.append(np.pad(draw(image, detections, b, dataset), ((0, 0), (0, 4), (0, 0))))
  return np.concatenate(tiles, axis=1)


class ImageDetector:
  """Detections of single RGB uint8 images of any size, in each image's own frame.

  Each image is resized by `inference.scale` (keep-ratio, if set), padded to a multiple
  of `size_divisor` and normalized on the device, the padding 0 after normalization; its
  boxes and pasted masks come back at its
  original size, as a dict of numpy arrays (one compile per distinct size).
  """

  def __init__(self, config: ml_collections.ConfigDict, model, variables,
               size_divisor: int = 32):
    self._detect = jax.jit(functools.partial(
        detect_at_original_size, model=model, mean=tuple(config.data.mean),
        std=tuple(config.data.std)), static_argnames="mask_size")
    self._variables = variables
    self._scale = tuple(config.inference.scale)
    self._divisor = size_divisor

  def __call__(self, image: np.ndarray) -> Dict[str, np.ndarray]:
    from segjax.data import transforms
    h, w = image.shape[:2]
    resized = image
    if min(self._scale) > 0:
      resized = transforms.resize(self._scale)({"image": image}, None)["image"]
    rh, rw = resized.shape[:2]
    padded, extent = device.pad_image(resized, self._divisor)
    batch = {"image": padded, "extent": extent, "resized_size": np.int32([[rh, rw]]),
             "original_size": np.int32([[h, w]])}
    out = jax.device_get(self._detect(self._variables, batch, mask_size=(h, w)))
    return {k: np.asarray(v)[0] for k, v in out.items()}
