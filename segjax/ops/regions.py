"""Removal of small connected regions (islands) and small holes from a binary mask.

SAM's automatic mask generator cleans its masks this way before a last NMS: 8-connected
components of the mask (islands) or of its complement (holes) smaller than an area are
dropped or filled.
"""
from typing import Tuple

import cv2
import numpy as np

REGION_MODES = ("holes", "islands")


def remove_small_regions(mask: np.ndarray, min_area: float, mode: str) -> Tuple[np.ndarray, bool]:
  """(mask, changed): `mask` [h, w] bool with its 8-connected holes ("holes") or islands
  ("islands") of fewer than `min_area` pixels filled or removed.

  A hole is a component of the complement, the background around the mask included
  (it is filled too when smaller than `min_area`). When every island is small, the
  largest one stays, so that a mask never vanishes.
  """
  if mode not in REGION_MODES:
    raise ValueError(f"Unknown mode {mode!r}; use one of {', '.join(REGION_MODES)}.")
  mask = np.asarray(mask, bool)
  holes = mode == "holes"
  working = (mask ^ holes).astype(np.uint8)  # the components to look at are 1s
  n, labels, stats, _ = cv2.connectedComponentsWithStats(working, connectivity=8)
  sizes = stats[1:, cv2.CC_STAT_AREA]  # label 0 is the rest
  small = np.flatnonzero(sizes < min_area) + 1
  if small.size == 0:
    return mask, False
  if holes:  # the mask becomes everything but the big components of its complement
    return np.isin(labels, np.concatenate([[0], small])), True
  big = np.setdiff1d(np.arange(1, n), small)
  if big.size == 0:
    big = np.array([int(np.argmax(sizes)) + 1])
  return np.isin(labels, big), True
