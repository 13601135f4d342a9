"""Run-length encoding of binary masks, in COCO's column-major convention.

An uncompressed RLE is {"size": [h, w], "counts": [n0, n1, ...]}: alternating runs of
0s and 1s over the mask read column by column (Fortran order), starting with a run
of 0s (of length 0 when the first pixel is 1). pycocotools compresses it to the
string form of COCO annotations and results files.
"""
from typing import Any, Dict

import numpy as np

Rle = Dict[str, Any]


def _check_mask(mask: np.ndarray) -> np.ndarray:
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"A mask to run-length encode must be 2-D [h, w], got shape {mask.shape}.")
  return mask.astype(bool, copy=False)


def mask_to_rle(mask: np.ndarray) -> Rle:
  """The uncompressed RLE of a 2-D binary mask."""
  mask = _check_mask(mask)
  h, w = mask.shape
  flat = mask.T.reshape(-1)
  if flat.size == 0:
    return {"size": [h, w], "counts": []}
  starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  bounds = np.concatenate([[0], starts, [flat.size]])
  counts = np.diff(bounds).tolist()
  return {"size": [h, w], "counts": ([0] if flat[0] else []) + counts}


def rle_to_mask(rle: Rle) -> np.ndarray:
  """The bool mask [h, w] of an uncompressed RLE."""
  h, w = rle["size"]
  counts = np.asarray(rle["counts"], np.int64)
  if counts.sum() != h * w:
    raise ValueError(f"RLE counts sum to {counts.sum()}, not h * w = {h * w}; the RLE is "
                     "corrupt or of another size.")
  values = np.arange(len(counts)) % 2 == 1
  return np.repeat(values, counts).reshape(w, h).T


def rle_area(rle: Rle) -> int:
  """The number of 1 pixels of an uncompressed RLE."""
  return int(sum(rle["counts"][1::2]))


def coco_rle(rle: Rle) -> Rle:
  """An uncompressed RLE compressed as in COCO files ({"size", "counts": str})."""
  from pycocotools import mask as mask_utils
  h, w = rle["size"]
  encoded = mask_utils.frPyObjects(rle, h, w)
  return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode("ascii")}
