"""COCO's mask formats in numpy: run-length encodings and polygons.

Masks are (height, width) uint8 arrays of 0/1. COCO stores them as

* uncompressed RLE, {"counts": [ints], "size": [h, w]}: run lengths over the
  column-major (Fortran-order) flattened mask, alternating zeros and ones and
  starting with a run of zeros (possibly empty);
* compressed RLE, the same counts written as a string: each count from the
  fourth on is replaced by its difference to the count two before it, then
  every value is written like LEB128 but with 5 data bits, a continuation bit
  and a sign bit per character, offset into ASCII 48..111;
* polygons, [[x1, y1, x2, y2, ...], ...] in pixel coordinates (several parts
  per object), rasterised exactly as the COCO API (pycocotools) does it, so
  that masks, areas and evaluation agree with every COCO-trained reference.

pycocotools is not needed at run time; the tests compare against it.
"""
from typing import Any, Dict, List, Sequence, Union

import numpy as np

# The COCO API rasterises polygons on a grid 5 times finer than the pixels.
_UPSAMPLE = 5.0


def decode_counts(counts: Sequence[int], height: int, width: int) -> np.ndarray:
  """Uncompressed RLE counts -> (height, width) uint8 mask."""
  counts = np.asarray(counts, np.int64).reshape(-1)
  if (counts < 0).any():
    raise ValueError(f"RLE counts must be non-negative, got {counts[counts < 0][:5]}.")
  if counts.sum() != height * width:
    raise ValueError(f"RLE counts sum to {counts.sum()}, but a {height}x{width} mask has "
                     f"{height * width} pixels; the RLE's size does not match its counts.")
  values = (np.arange(counts.size) % 2).astype(np.uint8)
  return np.ascontiguousarray(np.repeat(values, counts).reshape(width, height).T)


def encode_counts(mask: np.ndarray) -> List[int]:
  """(height, width) mask (nonzero = foreground) -> uncompressed RLE counts."""
  flat = np.asarray(mask).T.reshape(-1) != 0  # column-major order
  changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  counts = np.diff(np.concatenate([[0], changes, [flat.size]]))
  if flat.size and flat[0]:
    counts = np.concatenate([[0], counts])
  return counts.tolist()


def counts_to_string(counts: Sequence[int]) -> str:
  """Uncompressed RLE counts -> the COCO API's compressed counts string."""
  counts = [int(c) for c in counts]
  chars = []
  for i, count in enumerate(counts):
    value = count - counts[i - 2] if i > 2 else count
    more = True
    while more:
      char = value & 0x1f
      value >>= 5  # arithmetic shift: negative deltas end in a run of sign bits
      more = value != -1 if char & 0x10 else value != 0
      chars.append(chr(48 + (char | 0x20 if more else char)))
  return "".join(chars)


def string_to_counts(string: Union[str, bytes]) -> List[int]:
  """The COCO API's compressed counts string -> uncompressed RLE counts."""
  if isinstance(string, bytes):
    string = string.decode("ascii")
  counts: List[int] = []
  value = shift = 0
  for position, letter in enumerate(string):
    char = ord(letter) - 48
    if not 0 <= char < 64:
      raise ValueError(f"Compressed RLE string has {letter!r} at {position}; only characters "
                       "'0'..'o' (ASCII 48..111) occur in COCO's encoding.")
    value |= (char & 0x1f) << shift
    shift += 5
    if char & 0x20:
      continue
    if char & 0x10:
      value -= 1 << shift  # sign-extend
    if len(counts) > 2:
      value += counts[-2]
    counts.append(value)
    value = shift = 0
  if shift:
    raise ValueError("Compressed RLE string ends inside a count (its last character has the "
                     "continuation bit set); the string is truncated.")
  return counts


def decode_rle(rle: Dict[str, Any]) -> np.ndarray:
  """{"size": [h, w], "counts": list or compressed string} -> (h, w) uint8 mask."""
  height, width = (int(s) for s in rle["size"])
  counts = rle["counts"]
  if isinstance(counts, (str, bytes)):
    counts = string_to_counts(counts)
  return decode_counts(counts, height, width)


def encode_rle(mask: np.ndarray) -> Dict[str, Any]:
  """(h, w) mask -> compressed RLE {"size": [h, w], "counts": str}, as pycocotools
  `mask.encode` writes it (it gives the counts as bytes)."""
  mask = np.asarray(mask)
  return {"size": [int(mask.shape[0]), int(mask.shape[1])],
          "counts": counts_to_string(encode_counts(mask))}


def rle_area(rle: Dict[str, Any]) -> int:
  """Foreground pixels of an RLE (list or string counts) without decoding it."""
  counts = rle["counts"]
  if isinstance(counts, (str, bytes)):
    counts = string_to_counts(counts)
  return int(np.sum(np.asarray(counts, np.int64)[1::2]))


def _c_int(values: np.ndarray) -> np.ndarray:
  """C's (int) cast of doubles: truncation toward zero."""
  return np.trunc(values).astype(np.int64)


def _polygon_toggles(xy: np.ndarray, height: int, width: int) -> np.ndarray:
  """Column-major pixel indices where a polygon's mask flips, as the COCO API finds them.

  The vertices are scaled by 5 and rounded; each edge, closing the polygon, is
  walked one step at a time along its major axis from its first to its last
  vertex, rounding the other coordinate. Wherever the walk crosses the
  vertical line through a pixel centre (the fine x changes past 5 * col + 2),
  the first pixel of that column below the crossing toggles; the mask is then
  on wherever an odd number of toggles lies at or before a pixel.
  """
  x = _c_int(_UPSAMPLE * xy[:, 0] + 0.5)
  y = _c_int(_UPSAMPLE * xy[:, 1] + 0.5)
  x_end, y_end = np.roll(x, -1), np.roll(y, -1)
  dx, dy = np.abs(x_end - x), np.abs(y_end - y)
  x_major = dx >= dy
  # The COCO API swaps an edge's ends so the major coordinate grows, then
  # walks it backwards, so the points still run from the first vertex.
  flip = np.where(x_major, x > x_end, y > y_end)
  x0, x1 = np.where(flip, x_end, x), np.where(flip, x, x_end)
  y0, y1 = np.where(flip, y_end, y), np.where(flip, y, y_end)
  steps = np.maximum(dx, dy)
  rise = np.where(x_major, y1 - y0, x1 - x0)
  # A repeated vertex (steps == 0) gives one point whose column equals its
  # neighbours', so its rounded coordinate is never used (C gets NaN there).
  slope = rise / np.maximum(steps, 1)

  edge = np.repeat(np.arange(len(x)), steps + 1)
  first = np.cumsum(steps + 1) - (steps + 1)
  d = np.arange(edge.size) - first[edge]
  t = np.where(flip[edge], steps[edge] - d, d)
  major = t + np.where(x_major, x0, y0)[edge]
  minor = _c_int(np.where(x_major, y0, x0)[edge] + slope[edge] * t + 0.5)
  u = np.where(x_major[edge], major, minor)
  v = np.where(x_major[edge], minor, major)

  moved = np.flatnonzero(u[1:] != u[:-1]) + 1
  column = np.where(u[moved] < u[moved - 1], u[moved], u[moved] - 1).astype(np.float64)
  column = (column + 0.5) / _UPSAMPLE - 0.5
  keep = (np.floor(column) == column) & (column >= 0) & (column <= width - 1)
  row = np.minimum(v[moved], v[moved - 1]).astype(np.float64)
  row = np.ceil(np.clip((row + 0.5) / _UPSAMPLE - 0.5, 0, height))
  return column[keep].astype(np.int64) * height + row[keep].astype(np.int64)


def polygon_to_mask(polygon: Sequence[float], height: int, width: int) -> np.ndarray:
  """One polygon [x1, y1, x2, y2, ...] -> (height, width) uint8 mask, bit-exactly
  `pycocotools.mask.decode(frPyObjects([polygon], height, width))`."""
  xy = np.asarray(polygon, np.float64).reshape(-1)
  if xy.size % 2:
    raise ValueError(f"A polygon needs an even number of coordinates (x1, y1, x2, y2, ...); "
                     f"got {xy.size}.")
  size = height * width
  if xy.size == 0 or size == 0:
    return np.zeros((height, width), np.uint8)
  toggles = _polygon_toggles(xy.reshape(-1, 2), height, width)
  flips = np.bincount(toggles, minlength=size + 1)[:size]
  flat = (np.cumsum(flips) % 2).astype(np.uint8)
  return np.ascontiguousarray(flat.reshape(width, height).T)


def annotation_to_mask(segmentation, height: int, width: int) -> np.ndarray:
  """A COCO annotation's `segmentation` -> (height, width) uint8 mask.

  Polygon lists give the union of their parts (as `COCO.annToRLE` merges them);
  uncompressed and compressed RLE dicts must have size [height, width]. Unlike
  pycocotools, a list whose first polygon has exactly 4 numbers is rasterised
  as a polygon rather than read as a box [x, y, w, h].
  """
  if isinstance(segmentation, list):
    mask = np.zeros((height, width), np.uint8)
    for polygon in segmentation:
      mask |= polygon_to_mask(polygon, height, width)
    return mask
  if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
    size = [int(s) for s in segmentation["size"]]
    if size != [height, width]:
      raise ValueError(f"RLE segmentation has size {size}, but its image is "
                       f"[{height}, {width}] (height, width).")
    return decode_rle(segmentation)
  raise ValueError("A COCO segmentation is a list of polygons or an RLE dict with 'counts' "
                   f"and 'size'; got {type(segmentation).__name__} {str(segmentation)[:80]}.")
