"""Normalized cut segmentation (Shi & Malik, 2000).

A two-way partition (A, B) of a weighted graph has

  Ncut(A, B) = cut(A, B) / assoc(A, V) + cut(A, B) / assoc(B, V),

cut the weight between the sides and assoc(A, V) the total weight from A to all
nodes. Unlike the plain minimum cut, cutting off a single weakly attached node costs
Ncut >= 1, so balanced splits of weakly joined groups win.

Minimising Ncut is NP-complete; the relaxation solves (D - W) y = lambda D y, D the
diagonal degree matrix, through the symmetric form
D^-1/2 (D - W) D^-1/2 z = lambda z, y = D^-1/2 z (`jnp.linalg.eigh`). The smallest
eigenvalue is 0 with constant y (z = D^1/2 1, known exactly, so it is deflated
before the solve and projected out after, keeping float32 rounding from mixing it
into a second eigenvalue close to 0); the second-smallest eigenvector is thresholded.
Every threshold between consecutive distinct values of y is a candidate (the
exhaustive form of Shi & Malik's l evenly spaced splitting points), and the one with
the smallest Ncut is taken; all N - 1 candidates are scored in O(N^2) with suffix
sums of non-negative weights, so there is no cancellation.

More than two segments: recursive two-way cuts. The largest segment (most nodes)
is split on its own subgraph (weights to other segments dropped, as Shi & Malik
repartition each part); a split whose Ncut exceeds `max_ncut` (or that has no valid
threshold) is rejected, that segment is frozen and the next largest is tried, until
`num_segments` segments exist or none can be split. Subgraph solves keep the static
[N, N] shape: nodes outside the segment are decoupled with eigenvalue 3, above the
[0, 2] spectrum of the normalized Laplacian, so one compiled solve serves all splits.

Nodes with zero degree (within the subgraph) are decoupled like outside nodes and
get y = 0: they add nothing to any cut or association, so the side they fall on does
not change Ncut. Other disconnected components show up as extra zero eigenvalues and
are split off with Ncut 0.

W is dense [N, N]: meant for small images (up to about 64x64); the eigen-solve is
O(N^3) per split (a 32x32 two-way cut takes a few seconds on a 2-core CPU, 64x64
about a minute).
"""
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from segjax.classical.affinity import affinity_matrix, check_affinity_matrix

_OUTSIDE_EIGENVALUE = 3.0


def _as_mask(mask, num_nodes: int, name: str) -> jax.Array:
  mask = jnp.asarray(mask)
  if mask.size != num_nodes:
    raise ValueError(f"{name} must have one entry per node ({num_nodes}), got shape "
                     f"{mask.shape}.")
  return mask.reshape(num_nodes).astype(bool)


def _segment(segment, num_nodes: int) -> jax.Array:
  if segment is None:
    return jnp.ones((num_nodes,), bool)
  segment = _as_mask(segment, num_nodes, "segment")
  if not isinstance(segment, jax.core.Tracer) and int(np.sum(np.asarray(segment))) < 2:
    raise ValueError("segment must contain at least 2 nodes to be split.")
  return segment


def ncut_value(affinity, mask) -> jax.Array:
  """Ncut(A, B) of the partition A = mask, B = ~mask of graph W (float32 scalar).

  Jittable. NaN when a side has zero association (e.g. it is empty), where Ncut is
  undefined.

  Args:
    affinity: symmetric non-negative [N, N] weights.
    mask: boolean side A, [N] or any shape with N entries in node order.
  """
  w = check_affinity_matrix(affinity)
  in_a = _as_mask(mask, w.shape[0], "mask").astype(w.dtype)
  degree = jnp.sum(w, axis=1)
  assoc_a = jnp.sum(degree * in_a)
  assoc_b = jnp.sum(degree * (1 - in_a))
  cut = jnp.sum(w * in_a[:, None] * (1 - in_a)[None, :])  # elementwise: no matmul precision
  defined = (assoc_a > 0) & (assoc_b > 0)
  value = cut / jnp.where(defined, assoc_a, 1) + cut / jnp.where(defined, assoc_b, 1)
  return jnp.where(defined, value, jnp.nan)


def _subgraph(w, segment):
  inside = segment.astype(w.dtype)
  return w * inside[:, None] * inside[None, :]


@jax.jit
def _second_eigenvector(w, segment):
  w = _subgraph(w, segment)
  degree = jnp.sum(w, axis=1)
  connected = degree > 0
  inv_sqrt = jnp.where(connected, jax.lax.rsqrt(jnp.where(connected, degree, 1)), 0)
  diagonal = jnp.where(segment & connected, 1, _OUTSIDE_EIGENVALUE).astype(w.dtype)
  laplacian = jnp.diag(diagonal) - inv_sqrt[:, None] * w * inv_sqrt[None, :]
  # The trivial eigenvector D^1/2 1 (eigenvalue 0) is known exactly: deflate it to the
  # outside eigenvalue so float32 rounding cannot mix it into a second eigenvector
  # whose eigenvalue is close to 0 (weakly joined segments).
  trivial = jnp.sqrt(degree)
  trivial = trivial / jnp.maximum(jnp.linalg.norm(trivial), jnp.finfo(w.dtype).tiny)
  laplacian = laplacian + _OUTSIDE_EIGENVALUE * trivial[:, None] * trivial[None, :]
  eigenvalues, eigenvectors = jnp.linalg.eigh(laplacian)
  z = eigenvectors[:, 0]
  z = z - jnp.sum(trivial * z) * trivial
  z = z / jnp.maximum(jnp.linalg.norm(z), jnp.finfo(w.dtype).tiny)
  y = z * inv_sqrt
  y = y * jnp.sign(y[jnp.argmax(jnp.abs(y))])
  return eigenvalues[0], y


@jax.jit
def _sweep(w, segment, y):
  """Best threshold split of `segment` along y: (mask, Ncut); Ncut is inf if none is valid."""
  n = w.shape[0]
  w = _subgraph(w, segment)
  key = jnp.where(segment, y, jnp.inf)
  order = jnp.argsort(key)
  sorted_key = key[order]
  w = w[order][:, order]
  degree = jnp.sum(w, axis=1)
  zero = jnp.zeros((n, 1), w.dtype)
  # after[i, k] = sum_{j > k} w[i, j]; cut of the prefix {0..k} sums it over rows i <= k.
  after = jnp.concatenate([jnp.cumsum(w[:, ::-1], axis=1)[:, ::-1][:, 1:], zero], axis=1)
  cut = jnp.sum(jnp.triu(after), axis=0)
  assoc_a = jnp.cumsum(degree)
  assoc_b = jnp.concatenate([jnp.cumsum(degree[::-1])[::-1][1:], zero[0]])
  next_key = jnp.concatenate([sorted_key[1:], jnp.full((1,), jnp.inf, w.dtype)])
  position = jnp.arange(n)
  valid = ((position < jnp.sum(segment) - 1) & (sorted_key < next_key) & (assoc_a > 0)
           & (assoc_b > 0))
  value = (cut / jnp.where(valid, assoc_a, 1) + cut / jnp.where(valid, assoc_b, 1))
  value = jnp.where(valid, value, jnp.inf)
  best = jnp.argmin(value)
  return segment & (y <= sorted_key[best]), value[best]


@jax.jit
def _two_way(w, segment):
  return _sweep(w, segment, _second_eigenvector(w, segment)[1])


def ncut_eigenvector(affinity, segment=None):
  """Second-smallest generalized eigenpair (lambda, y) of (D - W) y = lambda D y.

  Jittable. y is D-normalised (y^T D y = 1), D-orthogonal to the constant vector and
  signed so its largest-magnitude entry is positive.

  Args:
    affinity: symmetric non-negative [N, N] weights.
    segment: optional boolean [N]; solve on the subgraph of these nodes (y is 0
      outside). Default: the whole graph.

  Returns:
    (eigenvalue, y): float32 scalar and [N].
  """
  w = check_affinity_matrix(affinity)
  return _second_eigenvector(w, _segment(segment, w.shape[0]))


def two_way_ncut(affinity, segment=None):
  """Shi & Malik's two-way cut: (mask, Ncut) of the best threshold on the eigenvector.

  Jittable. mask (boolean [N]) is the side with y <= threshold, within `segment`;
  Ncut is measured on the (sub)graph and is inf when no threshold splits it (all
  eigenvector values equal).

  Args:
    affinity: symmetric non-negative [N, N] weights.
    segment: optional boolean [N] subgraph to split; default the whole graph.
  """
  w = check_affinity_matrix(affinity)
  return _two_way(w, _segment(segment, w.shape[0]))


def _raster_order(labels: np.ndarray) -> np.ndarray:
  """Relabels segments 0..K-1 in order of their first node."""
  values, first = np.unique(labels, return_index=True)
  remap = np.empty(values.max() + 1, np.int32)
  remap[values[np.argsort(first)]] = np.arange(len(values), dtype=np.int32)
  return remap[labels]


def normalized_cut_graph(affinity, num_segments: int = 2, *,
                         max_ncut: Optional[float] = None) -> np.ndarray:
  """Segments a graph by recursive normalized cuts (see the module docstring).

  Runs on the host: a Python loop over splits, each split one jitted solve.

  Args:
    affinity: symmetric non-negative [N, N] weights with some positive weight.
    num_segments: wanted number of segments (>= 1); fewer come back when no segment
      can be split (all rejected by `max_ncut` or unsplittable).
    max_ncut: reject splits with a larger Ncut (Ncut lies in [0, 2]); None accepts all.

  Returns:
    int32 [N] labels 0..K-1, numbered by first node.
  """
  w = check_affinity_matrix(affinity)
  if isinstance(w, jax.core.Tracer):
    raise ValueError("normalized_cut_graph loops over splits on the host and cannot be traced; "
                     "jit `two_way_ncut` instead.")
  if not (isinstance(num_segments, (int, np.integer)) and num_segments >= 1):
    raise ValueError(f"num_segments must be an int >= 1, got {num_segments!r}.")
  if max_ncut is not None and not max_ncut >= 0:
    raise ValueError(f"max_ncut must be >= 0 or None, got {max_ncut}.")
  if not bool(jnp.any(w > 0)):
    raise ValueError("W has no positive weight, so there is nothing to cut.")
  labels = np.zeros(w.shape[0], np.int32)
  frozen = set()
  count = 1
  while count < num_segments:
    sizes = np.bincount(labels, minlength=count)
    open_labels = [int(i) for i in np.argsort(-sizes, kind="stable") if int(i) not in frozen]
    if not open_labels:
      break
    target = open_labels[0]
    segment = labels == target
    if segment.sum() < 2:
      frozen.add(target)
      continue
    mask, value = _two_way(w, jnp.asarray(segment))
    value = float(value)
    if not np.isfinite(value) or (max_ncut is not None and value > max_ncut):
      frozen.add(target)
      continue
    labels[np.asarray(mask)] = count
    count += 1
  return _raster_order(labels)


def normalized_cut_segment(image, num_segments: int = 2, *, sigma_position: float = 4.0,
                   sigma_feature: float = 0.1, radius: float = 5.0,
                   features: str = "intensity", max_ncut: Optional[float] = None) -> np.ndarray:
  """Normalized cut segmentation of a small image (up to about 64x64).

  Builds `affinity_matrix(image, ...)` and runs `normalized_cut_graph` on it.

  Args:
    image: [H, W] or [H, W, C] array (defaults assume values in [0, 1]).
    num_segments: wanted number of segments (>= 1).
    sigma_position, sigma_feature, radius, features: see `affinity_matrix`.
    max_ncut: reject splits with a larger Ncut; None accepts all.

  Returns:
    int32 [H, W] labels 0..K-1, numbered in raster order of first pixel.
  """
  image = jnp.asarray(image)
  if image.ndim not in (2, 3):
    raise ValueError(f"image must be [H, W] or [H, W, C], got shape {image.shape}.")
  affinity = affinity_matrix(image, sigma_position=sigma_position,
                             sigma_feature=sigma_feature, radius=radius, features=features)
  labels = normalized_cut_graph(affinity, num_segments, max_ncut=max_ncut)
  return labels.reshape(image.shape[:2])
