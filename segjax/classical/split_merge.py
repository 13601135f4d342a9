"""Region splitting and merging: a quadtree split, then greedy merging on the RAG.

Homogeneity predicate P(R) on a region's intensities (a colour image is reduced
to its channel mean):
  - "variance": population variance <= max_variance;
  - "range": max - min <= max_range.

Split (jitted, static shapes): the image is padded at the bottom and right to a
P x P square, P the next power of two of max(H, W); padded pixels are left out
of every statistic and cropped from the result, so they never change a
decision. Block statistics are float32. Starting from the whole square, a block
is split into its four quadrants while P(block) is false and the quadrants
would still be at least `min_block` pixels wide (block size >= 2 * min_block).
All quadtree levels are computed at once from block reshapes; a block is a
leaf when it exists (its parent was split) and is not split itself.

Merge (host numpy, float64 statistics, union-find): leaves are nodes of a
region adjacency graph (4-adjacency). Every adjacent pair whose union satisfies
P is a candidate; the pair with the smallest union statistic (variance or
range; ties to lower ids) is merged first, the merged region's pairs are
re-scored, and this repeats until no adjacent pair has a homogeneous union.
Merged regions satisfy P by construction; a leaf left inhomogeneous at the
minimum block size keeps failing P unless a merge absorbs it. With min_block=1
an inhomogeneous block can always be split (down to single pixels), so every
region satisfies P.
"""
import functools
import heapq
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

PREDICATES = ("variance", "range")


def _intensity(image) -> np.ndarray:
  """[H, W] float64 intensities of a gray or [H, W, C] colour image."""
  image = np.asarray(image)
  if image.ndim == 3:
    image = image.astype(np.float64).mean(axis=-1)
  elif image.ndim != 2:
    raise ValueError(f"image has shape {image.shape}; expected [H, W] or [H, W, C].")
  if image.size == 0:
    raise ValueError("image is empty.")
  return image.astype(np.float64)


def _limit(predicate: str, max_variance: float, max_range: Optional[float]) -> float:
  """The checked threshold of the chosen predicate."""
  if predicate not in PREDICATES:
    raise ValueError(f"unknown predicate {predicate!r}; choose one of {PREDICATES}.")
  if predicate == "range":
    if max_range is None:
      raise ValueError('predicate="range" needs max_range.')
    limit = max_range
  else:
    limit = max_variance
  if not np.isfinite(limit) or limit < 0:
    raise ValueError(f"the {predicate} threshold must be finite and >= 0, got {limit}.")
  return float(limit)


def _relabel_raster(labels: np.ndarray) -> np.ndarray:
  """Ids renumbered 0..R-1 in raster order of first appearance, int32."""
  ids, first, inverse = np.unique(labels.reshape(-1), return_index=True, return_inverse=True)
  rank = np.empty(len(ids), np.int32)
  rank[np.argsort(first, kind="stable")] = np.arange(len(ids), dtype=np.int32)
  return rank[inverse].reshape(labels.shape)


def _block_statistic(values, valid, size: int, predicate: str):
  """Per-block variance or range over valid pixels (0 for empty blocks)."""
  blocks = values.shape[0] // size
  x = values.reshape(blocks, size, blocks, size)
  v = valid.reshape(blocks, size, blocks, size)
  count = v.sum(axis=(1, 3))
  if predicate == "variance":
    mean = jnp.where(v, x, 0.0).sum(axis=(1, 3)) / jnp.maximum(count, 1)
    squared = jnp.where(v, jnp.square(x - mean[:, None, :, None]), 0.0)
    return squared.sum(axis=(1, 3)) / jnp.maximum(count, 1)
  high = jnp.where(v, x, -jnp.inf).max(axis=(1, 3))
  low = jnp.where(v, x, jnp.inf).min(axis=(1, 3))
  return jnp.where(count > 0, high - low, 0.0)


@functools.partial(jax.jit, static_argnames=("predicate", "min_block"))
def _quadtree_leaf_ids(values, valid, limit, predicate: str, min_block: int):
  """Per-pixel leaf id (unique over the whole tree) of the quadtree split."""
  side = values.shape[0]
  exists = jnp.ones((1, 1), bool)
  leaf_ids = jnp.zeros(values.shape, jnp.int32)
  offset, size = 0, side
  while True:
    blocks = side // size
    can_split = size >= 2 * min_block
    split = exists & (_block_statistic(values, valid, size, predicate) > limit) & can_split
    leaf = exists & ~split
    ids = jnp.where(leaf, offset + jnp.arange(blocks * blocks).reshape(blocks, blocks), 0)
    leaf_ids = leaf_ids + jnp.repeat(jnp.repeat(ids, size, axis=0), size, axis=1)
    if not can_split:
      return leaf_ids
    exists = jnp.repeat(jnp.repeat(split, 2, axis=0), 2, axis=1)
    offset += blocks * blocks
    size //= 2


def quadtree_split(image, predicate: str = "variance", max_variance: float = 1.0,
                   max_range: Optional[float] = None, min_block: int = 2) -> np.ndarray:
  """The split stage alone: int32 [H, W] labels 0..R-1 of the quadtree leaves.

  Labels are numbered in raster order of first appearance. See the module doc
  for the predicates, the padding and the stopping rule.
  """
  values = _intensity(image)
  limit = _limit(predicate, max_variance, max_range)
  if not isinstance(min_block, (int, np.integer)) or min_block < 1:
    raise ValueError(f"min_block must be an int >= 1, got {min_block}.")
  height, width = values.shape
  side = 1 << int(np.ceil(np.log2(max(height, width))))
  padded = np.zeros((side, side), np.float32)
  padded[:height, :width] = values
  valid = np.zeros((side, side), bool)
  valid[:height, :width] = True
  leaf_ids = _quadtree_leaf_ids(jnp.asarray(padded), jnp.asarray(valid), jnp.float32(limit),
                                predicate, int(min_block))
  return _relabel_raster(np.asarray(leaf_ids)[:height, :width])


class _Regions:
  """Per-region count, mean, sum of squared deviations, min and max (float64)."""

  def __init__(self, values: np.ndarray, labels: np.ndarray, num: int):
    flat, x = labels.reshape(-1), values.reshape(-1)
    self.count = np.bincount(flat, minlength=num).astype(np.float64)
    self.mean = np.bincount(flat, weights=x, minlength=num) / self.count
    self.m2 = np.bincount(flat, weights=np.square(x - self.mean[flat]), minlength=num)
    self.low = np.full(num, np.inf)
    self.high = np.full(num, -np.inf)
    np.minimum.at(self.low, flat, x)
    np.maximum.at(self.high, flat, x)

  def union(self, a, b):
    """(count, mean, m2, low, high) of the unions of regions a and b (arrays or ints)."""
    count = self.count[a] + self.count[b]
    delta = self.mean[b] - self.mean[a]
    mean = self.mean[a] + delta * self.count[b] / count
    m2 = self.m2[a] + self.m2[b] + np.square(delta) * self.count[a] * self.count[b] / count
    return (count, mean, m2, np.minimum(self.low[a], self.low[b]),
            np.maximum(self.high[a], self.high[b]))

  def set(self, index: int, stats) -> None:
    """Overwrites region `index` with `stats` from `union`."""
    for field, value in zip((self.count, self.mean, self.m2, self.low, self.high), stats):
      field[index] = value


def _statistic(stats, predicate: str):
  """Variance or range of (count, mean, m2, low, high) region statistics."""
  count, _, m2, low, high = stats
  return m2 / count if predicate == "variance" else high - low


def _merge(values: np.ndarray, labels: np.ndarray, limit: float, predicate: str) -> np.ndarray:
  """Greedy RAG merging of `labels` (0..N-1); see the module doc."""
  num = int(labels.max()) + 1
  regions = _Regions(values, labels, num)
  pairs = np.concatenate([
      np.stack([labels[:, :-1].reshape(-1), labels[:, 1:].reshape(-1)], axis=1),
      np.stack([labels[:-1].reshape(-1), labels[1:].reshape(-1)], axis=1)])
  pairs = np.unique(np.sort(pairs[pairs[:, 0] != pairs[:, 1]], axis=1), axis=0)
  neighbours = [set() for _ in range(num)]
  for a, b in pairs.tolist():
    neighbours[a].add(b)
    neighbours[b].add(a)
  cost = _statistic(regions.union(pairs[:, 0], pairs[:, 1]), predicate)
  keep = cost <= limit
  heap = [(c, a, b, 0, 0) for c, (a, b) in zip(cost[keep].tolist(), pairs[keep].tolist())]
  heapq.heapify(heap)
  version = [0] * num
  parent = np.arange(num)
  while heap:
    _, a, b, version_a, version_b = heapq.heappop(heap)
    if parent[a] != a or parent[b] != b or version[a] != version_a or version[b] != version_b:
      continue
    parent[b] = a
    regions.set(a, regions.union(a, b))
    version[a] += 1
    for n in neighbours[b]:
      neighbours[n].discard(b)
      if n != a:
        neighbours[n].add(a)
        neighbours[a].add(n)
    neighbours[a].discard(b)
    neighbours[b] = set()
    for n in neighbours[a]:
      stats = regions.union(a, n)
      c = float(_statistic(stats, predicate))
      if c <= limit:
        low, high = min(a, n), max(a, n)
        heapq.heappush(heap, (c, low, high, version[low], version[high]))
  roots = parent.copy()
  while True:
    jumped = roots[roots]
    if np.array_equal(jumped, roots):
      break
    roots = jumped
  return _relabel_raster(roots[labels])


def split_and_merge(image, predicate: str = "variance", max_variance: float = 1.0,
                    max_range: Optional[float] = None, min_block: int = 2) -> np.ndarray:
  """Quadtree split then greedy RAG merge; int32 [H, W] labels 0..R-1.

  Args:
    image: [H, W] gray or [H, W, C] image (split on the channel mean).
    predicate: "variance" (variance <= max_variance) or "range"
      (max - min <= max_range), the homogeneity test P.
    max_variance: the variance predicate's limit (intensity units squared).
    max_range: the range predicate's limit; required for predicate="range".
    min_block: smallest block side the split may produce (>= 1).

  Returns:
    Region labels in raster order of first appearance. Every region satisfies P
    except leaves of size `min_block` that were already inhomogeneous and found
    no homogeneous merge (none when min_block=1).
  """
  values = _intensity(image)
  leaves = quadtree_split(values, predicate, max_variance, max_range, min_block)
  return _merge(values, leaves, _limit(predicate, max_variance, max_range), predicate)
