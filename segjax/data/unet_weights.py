"""The U-Net loss weight map (Ronneberger, Fischer and Brox, MICCAI 2015, eq. 2).

Computed on the host (numpy/scipy) from an instance-id map, once per example,
and fed to `weighted_pixel_cross_entropy` (or any loss taking `pixel_weights`).
"""
import math
from typing import Optional

import numpy as np
from scipy import ndimage

# Distances beyond this many sigmas are not computed: the border term of such a
# pixel is below w0 * exp(-18), under float32 resolution next to w_c >= 1.
_CUTOFF_SIGMAS = 6.0


def unet_weight_map(instance_ids: np.ndarray, labels: Optional[np.ndarray] = None,
                    w0: float = 10.0, sigma: float = 5.0, ignore_index: int = 255) -> np.ndarray:
  """w(x) = w_c(x) + w0 exp(-(d1(x) + d2(x))^2 / (2 sigma^2)) as an (H, W) float32 map.

  * w_c balances class frequencies over this image: class c gets
    n_max / n_c, n_c its pixel count and n_max that of the most frequent class,
    so the most frequent class (usually the background) weighs 1. The classes
    are those of `labels` when given (pixels labelled `ignore_index` are not
    counted and get weight 0), else background (id 0) and foreground (id > 0).
  * The border term applies to background pixels (id 0) only: as in the paper it
    emphasises the thin separation borders between touching cells. d1 and d2 are
    the Euclidean distances (between pixel centres) to the nearest pixel of the
    nearest and of the second nearest instance; with fewer than two instances
    the term is 0. Instances touching each other without a background gap get
    no border term on their contact line; separate them by a background line
    first if that line should be emphasised.

  Args:
    instance_ids: (H, W) non-negative integer ids, 0 = background.
    labels: optional (H, W) integer class map for w_c.
    w0: the weight of the border term (>= 0).
    sigma: its width in pixels (> 0).
    ignore_index: label of unlabelled pixels in `labels`.
  Returns:
    An (H, W) float32 weight map.
  """
  ids = np.asarray(instance_ids)
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"unet_weight_map: instance_ids must be an (H, W) integer map, got shape "
                     f"{ids.shape} and dtype {ids.dtype}.")
  if ids.size and ids.min() < 0:
    raise ValueError("unet_weight_map: instance_ids must be >= 0 (0 = background).")
  if w0 < 0 or sigma <= 0:
    raise ValueError(f"unet_weight_map: need w0 >= 0 and sigma > 0, got w0={w0}, sigma={sigma}.")
  if labels is None:
    classes, valid = (ids > 0).astype(np.int64), np.ones(ids.shape, bool)
  else:
    classes = np.asarray(labels)
    if classes.shape != ids.shape or not np.issubdtype(classes.dtype, np.integer):
      raise ValueError(f"unet_weight_map: labels must be an integer map shaped like "
                       f"instance_ids {ids.shape}, got shape {classes.shape} and dtype "
                       f"{classes.dtype}.")
    valid = classes != ignore_index
  weights = np.zeros(ids.shape, np.float64)
  if valid.any():
    values, counts = np.unique(classes[valid], return_counts=True)
    weights[valid] = (counts.max() / counts)[np.searchsorted(values, classes[valid])]
  border = valid & (ids == 0)
  if w0 > 0 and border.any():
    d1, d2 = _two_nearest_instance_distances(ids, math.ceil(_CUTOFF_SIGMAS * sigma))
    weights[border] += w0 * np.exp(-(d1[border] + d2[border]) ** 2 / (2.0 * sigma ** 2))
  return weights.astype(np.float32)


def _two_nearest_instance_distances(ids: np.ndarray, cutoff: int):
  """Per pixel, the distances to the nearest and second nearest instance; inf
  where fewer instances lie within `cutoff` pixels (which is exact enough)."""
  d1 = np.full(ids.shape, np.inf)
  d2 = np.full(ids.shape, np.inf)
  instance_values = np.unique(ids[ids > 0])
  if len(instance_values) < 2:
    return d1, d2
  # Consecutive ids 1..K, so that find_objects returns one box per instance.
  consecutive = np.searchsorted(instance_values, ids) + 1
  consecutive[ids == 0] = 0
  for index, box in enumerate(ndimage.find_objects(consecutive), start=1):
    window = tuple(slice(max(s.start - cutoff, 0), min(s.stop + cutoff, n))
                   for s, n in zip(box, ids.shape))
    distance = ndimage.distance_transform_edt(consecutive[window] != index)
    near1, near2 = d1[window], d2[window]  # views: updated in place
    np.minimum(near2, np.maximum(near1, distance), out=near2)
    np.minimum(near1, distance, out=near1)
  return d1, d2
