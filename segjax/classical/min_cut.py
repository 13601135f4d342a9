"""Minimum cuts: seeded s-t graph cuts (Boykov & Jolly, 2001) and the global minimum cut.

s-t cuts use `scipy.sparse.csgraph.maximum_flow` (Dinic). It needs int32
capacities, so weights are scaled so that their total is 2^30 and rounded; the
source side is then the set of nodes reachable from the source in the exact integer
residual graph (breadth-first search), and cut values are recomputed in float64
from the original weights. The cut found is optimal for the rounded capacities, so
its true value exceeds the minimum by at most (number of edges) * total / 2^30.

Terminals may be node sets: all source (sink) nodes are contracted into one node,
which is the same as tying each to the terminal with an infinite-capacity t-link.

`global_min_cut` (Stoer & Wagner, 1997) shows the classic failure mode that
normalized cuts fix: the cheapest cut of an image graph usually isolates a few
weakly attached pixels rather than separating objects.

All of this runs on the host (numpy/scipy); inputs may be jax or numpy arrays.
"""
from typing import Tuple

import numpy as np
from scipy.sparse import csr_array
from scipy.sparse.csgraph import breadth_first_order, maximum_flow

from segjax.classical.affinity import check_affinity_matrix

_CAPACITY_TOTAL = 2 ** 30


def _terminal_cut(num_nodes: int, heads: np.ndarray, tails: np.ndarray, weights: np.ndarray,
                  sources: np.ndarray, sinks: np.ndarray) -> np.ndarray:
  """Source side [num_nodes] of a minimum cut of an undirected graph between node sets."""
  is_source = np.zeros(num_nodes, bool)
  is_source[sources] = True
  is_sink = np.zeros(num_nodes, bool)
  is_sink[sinks] = True
  free = ~(is_source | is_sink)
  node = np.empty(num_nodes, np.int64)
  node[is_source] = 0
  node[is_sink] = 1
  node[free] = 2 + np.arange(int(free.sum()))
  size = 2 + int(free.sum())
  a, b = node[heads], node[tails]
  weights = np.asarray(weights, np.float64)
  keep = (a != b) & (weights > 0)
  a, b, weights = a[keep], b[keep], weights[keep]
  total = weights.sum()
  scale = _CAPACITY_TOTAL / total if total > 0 else 1.0
  capacity = np.rint(weights * scale).astype(np.int64)
  keep = capacity > 0
  a, b, capacity = a[keep], b[keep], capacity[keep]
  graph = csr_array((np.concatenate([capacity, capacity]).astype(np.int32),
                     (np.concatenate([a, b]), np.concatenate([b, a]))), shape=(size, size))
  graph.sum_duplicates()
  residual = (graph - maximum_flow(graph, 0, 1).flow).tocsr()
  residual.data = (residual.data > 0).astype(np.int32)
  residual.eliminate_zeros()
  reached = breadth_first_order(residual, 0, directed=True, return_predecessors=False)
  side = np.zeros(size, bool)
  side[reached] = True
  return side[node]


def _node_set(nodes, num_nodes: int, name: str) -> np.ndarray:
  nodes = np.atleast_1d(np.asarray(nodes))
  if nodes.ndim != 1 or nodes.size == 0:
    raise ValueError(f"{name} must be a node index or a non-empty 1-D list of them, got shape "
                     f"{nodes.shape}.")
  if not np.issubdtype(nodes.dtype, np.integer):
    raise ValueError(f"{name} must hold integer node indices, got dtype {nodes.dtype}.")
  if np.any((nodes < 0) | (nodes >= num_nodes)):
    raise ValueError(f"{name} has indices outside [0, {num_nodes}).")
  return np.unique(nodes)


def _cut_weight(weights: np.ndarray, mask: np.ndarray) -> float:
  return float(weights[np.ix_(mask, ~mask)].sum())


def _checked_weights(affinity) -> np.ndarray:
  check_affinity_matrix(affinity)
  return np.asarray(affinity, np.float64)


def minimum_cut(affinity, source, sink) -> Tuple[float, np.ndarray]:
  """Minimum s-t cut of the undirected graph W.

  Args:
    affinity: symmetric non-negative [N, N] weights (the diagonal is ignored).
    source: node index, or indices all forced onto the source side.
    sink: node index, or indices all forced onto the sink side (disjoint from source).

  Returns:
    (cut value, boolean [N] source-side mask): the value is sum of w_ij over i on
    the source side and j off it, in float64.
  """
  weights = _checked_weights(affinity)
  n = weights.shape[0]
  sources = _node_set(source, n, "source")
  sinks = _node_set(sink, n, "sink")
  if np.intersect1d(sources, sinks).size:
    raise ValueError("source and sink share nodes; a node cannot be on both sides of the cut.")
  heads, tails = np.nonzero(np.triu(weights, 1))
  mask = _terminal_cut(n, heads, tails, weights[heads, tails], sources, sinks)
  return _cut_weight(weights, mask), mask


def global_min_cut(affinity) -> Tuple[float, np.ndarray]:
  """Global minimum cut of W by Stoer-Wagner, O(N^3): for small graphs (hundreds of nodes).

  Args:
    affinity: symmetric non-negative [N, N] weights, N >= 2 (the diagonal is ignored).

  Returns:
    (cut value, boolean [N] mask of the smaller side: the piece cut off; on a tie in
    size, the side without node 0).
  """
  original = _checked_weights(affinity)
  n = original.shape[0]
  if n < 2:
    raise ValueError(f"global_min_cut needs at least 2 nodes, got {n}.")
  weights = original.copy()
  np.fill_diagonal(weights, 0)
  groups = [[i] for i in range(n)]
  active = np.ones(n, bool)
  best_value, best_group = np.inf, None
  for _ in range(n - 1):
    # One phase: add the most tightly connected node until all active nodes are in.
    start = int(np.argmax(active))
    added = np.zeros(n, bool)
    added[start] = True
    connection = weights[start].copy()
    previous, last, phase_cut = start, start, 0.0
    for _ in range(int(active.sum()) - 1):
      nxt = int(np.argmax(np.where(active & ~added, connection, -np.inf)))
      previous, last, phase_cut = last, nxt, connection[nxt]
      added[nxt] = True
      connection += weights[nxt]
    if phase_cut < best_value:
      best_value, best_group = phase_cut, list(groups[last])
    weights[previous] += weights[last]
    weights[:, previous] += weights[:, last]
    weights[previous, previous] = 0
    weights[last] = 0
    weights[:, last] = 0
    active[last] = False
    groups[previous].extend(groups[last])
  mask = np.zeros(n, bool)
  mask[best_group] = True
  if 2 * mask.sum() > n or (2 * mask.sum() == n and mask[0]):
    mask = ~mask
  return _cut_weight(original, mask), mask


def _seed_mask(seeds, shape, name: str) -> np.ndarray:
  seeds = np.asarray(seeds)
  if seeds.shape != shape:
    raise ValueError(f"{name} must be a boolean mask of the image size {shape}, got shape "
                     f"{seeds.shape}.")
  if seeds.dtype != bool and not np.all((seeds == 0) | (seeds == 1)):
    raise ValueError(f"{name} must be a boolean mask (0/1 values).")
  seeds = seeds.astype(bool)
  if not seeds.any():
    raise ValueError(f"{name} marks no pixel; give at least one seed pixel.")
  return seeds


def _region_costs(grey: np.ndarray, foreground: np.ndarray, background: np.ndarray,
                  num_bins: int) -> Tuple[np.ndarray, np.ndarray]:
  """-log Pr(I_p | object), -log Pr(I_p | background) from add-one smoothed seed histograms."""
  low, high = grey.min(), grey.max()
  span = high - low if high > low else 1.0
  bins = np.clip(np.floor((grey - low) / span * num_bins), 0, num_bins - 1).astype(np.int64)
  costs = []
  for seeds in (foreground, background):
    counts = np.bincount(bins[seeds], minlength=num_bins)
    costs.append(-np.log((counts[bins] + 1) / (counts.sum() + num_bins)))
  return costs[0], costs[1]


def min_cut_segment(image, foreground_seeds, background_seeds, sigma: float = 0.1,
                    lambda_: float = 0.0, num_bins: int = 16) -> np.ndarray:
  """Seeded foreground/background segmentation by an s-t minimum cut (Boykov & Jolly).

  The graph is the 4-connected pixel grid with n-links
  B_pq = exp(-||I_p - I_q||^2 / (2 sigma^2)) (colour distance for [H, W, C] images).
  Seeds are tied to their terminal (infinite t-links, here contraction). With
  lambda_ > 0 every other pixel also gets Boykov-Jolly region t-links:
  lambda_ * -log Pr(I_p | background) to the source and lambda_ * -log Pr(I_p | object)
  to the sink, with Pr from add-one smoothed `num_bins`-bin histograms of the seed
  pixels' grey value (channel mean) over the image's range. The minimised energy is
  lambda_ * sum_p R_p(label_p) + sum over cut n-links of B_pq.

  Args:
    image: [H, W] or [H, W, C] array (default sigma assumes values in [0, 1]).
    foreground_seeds: boolean [H, W] mask of object seed pixels.
    background_seeds: boolean [H, W] mask of background seed pixels, disjoint from it.
    sigma: n-link contrast scale (> 0).
    lambda_: weight of the region term (>= 0; 0 uses the boundary term only).
    num_bins: histogram bins of the region term.

  Returns:
    Boolean [H, W] foreground (source side) mask.
  """
  image = np.asarray(image, np.float64)
  if image.ndim not in (2, 3) or image.size == 0:
    raise ValueError(f"image must be a non-empty [H, W] or [H, W, C] array, got shape "
                     f"{image.shape}.")
  if not np.all(np.isfinite(image)):
    raise ValueError("image has non-finite values; replace NaN/inf pixels first.")
  if not sigma > 0:
    raise ValueError(f"sigma must be > 0, got {sigma}.")
  if not lambda_ >= 0:
    raise ValueError(f"lambda_ must be >= 0, got {lambda_}.")
  if not (isinstance(num_bins, (int, np.integer)) and num_bins >= 1):
    raise ValueError(f"num_bins must be an int >= 1, got {num_bins!r}.")
  height, width = image.shape[:2]
  foreground = _seed_mask(foreground_seeds, (height, width), "foreground_seeds")
  background = _seed_mask(background_seeds, (height, width), "background_seeds")
  if np.any(foreground & background):
    raise ValueError("foreground_seeds and background_seeds overlap; a pixel can seed only one "
                     "side.")
  n = height * width
  pixels = image.reshape(n, -1)
  index = np.arange(n).reshape(height, width)
  heads = np.concatenate([index[:, :-1].ravel(), index[:-1, :].ravel()])
  tails = np.concatenate([index[:, 1:].ravel(), index[1:, :].ravel()])
  weights = np.exp(-np.sum((pixels[heads] - pixels[tails]) ** 2, axis=1) / (2 * sigma ** 2))
  foreground, background = foreground.ravel(), background.ravel()
  sources, sinks = np.flatnonzero(foreground), np.flatnonzero(background)
  num_nodes = n
  if lambda_ > 0:
    object_cost, background_cost = _region_costs(pixels.mean(axis=1), foreground, background,
                                                 num_bins)
    free = np.flatnonzero(~(foreground | background))
    source_node, sink_node = n, n + 1
    heads = np.concatenate([heads, np.full(free.size, source_node), free])
    tails = np.concatenate([tails, free, np.full(free.size, sink_node)])
    weights = np.concatenate([weights, lambda_ * background_cost[free],
                              lambda_ * object_cost[free]])
    sources = np.append(sources, source_node)
    sinks = np.append(sinks, sink_node)
    num_nodes = n + 2
  side = _terminal_cut(num_nodes, heads, tails, weights, sources, sinks)
  return side[:n].reshape(height, width)
