"""Clustering segmentation: k-means (k-means++ seeding, Lloyd iterations) and mean shift.

Pixels become feature vectors (`pixel_features`: the channels, optionally with the
pixel position) and are grouped without regard to connectivity; the segment maps
are the cluster labels reshaped to [H, W].

k-means (`kmeans`): k-means++ seeding (first centre uniform, each next one drawn
with probability proportional to the squared distance to the nearest chosen centre),
then Lloyd iterations in one `jax.lax.while_loop`. Iteration i recomputes the
centres as the means of the previous labels (an empty cluster keeps its centre),
reassigns every point to its nearest centre and records
SSE_i = sum ||x - centre(label(x))||^2. It stops after iteration i when
SSE_{i-1} - SSE_i <= tolerance * SSE_{i-1} (SSE_0: the seeding's assignment) or
after `max_iterations`. The returned labels are the nearest-centre assignment to
the returned centres.

Mean shift (`mean_shift`): every point y starts at its feature x and moves to the
kernel-weighted mean of the original points, flat kernel: the points within
`bandwidth` of y; gaussian kernel: all points weighted by
exp(-||y - x||^2 / (2 bandwidth^2)). All points move together until the largest
shift is below 1e-3 * bandwidth or after `max_iterations`. Converged points within
bandwidth / 2 of each other are linked and each connected group is one cluster, labelled in
order of its first point (0..C-1). It builds an [N, N] distance matrix per step
(64 MiB at N = 4096), so it is meant for images up to about 64 x 64 pixels, or a
downsampled image / a subsample of the pixels.

Every function handles one image (or one feature set) with static shapes and is
jittable; batch with `jax.vmap` (each batch element keeps its own iteration count).
"""
import functools
import numbers

import jax
import jax.numpy as jnp

FEATURE_MODES = ("color", "color_position")
KERNELS = ("flat", "gaussian")
# Mean shift stops when no point moves more than this fraction of the bandwidth.
_SHIFT_TOLERANCE = 1e-3
_HIGHEST = jax.lax.Precision.HIGHEST


def pixel_features(image, mode: str = "color", position_weight: float = 1.0) -> jnp.ndarray:
  """Float32 features [H * W, D] of an [H, W] or [H, W, C] image, pixels in raster order.

  Args:
    image: [H, W] grayscale, [H, W, C] color, or any [H, W, D] feature map (e.g.
      filter-bank responses); values are used as they are (cast to float32).
    mode: "color": the channels (D = C, so a feature map passes through unchanged);
      "color_position": the channels followed by (row / (H - 1), col / (W - 1)) times
      `position_weight` (D = C + 2), which favours spatially compact clusters.
    position_weight: scale of the position features, in the units of the channels
      (with [0, 1] colors, 1.0 weighs crossing the image like the largest color step).
  """
  image = jnp.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3:
    raise ValueError(f"image must be [H, W] or [H, W, C], got shape {image.shape}; batch with "
                     "jax.vmap.")
  if mode not in FEATURE_MODES:
    raise ValueError(f"Unknown feature mode {mode!r}; expected one of {FEATURE_MODES}.")
  height, width, channels = image.shape
  features = image.astype(jnp.float32).reshape(height * width, channels)
  if mode == "color":
    return features
  rows = jnp.arange(height, dtype=jnp.float32) / max(height - 1, 1)
  cols = jnp.arange(width, dtype=jnp.float32) / max(width - 1, 1)
  grid = jnp.stack(jnp.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(height * width, 2)
  return jnp.concatenate([features, grid * jnp.float32(position_weight)], axis=1)


def _check_features(features) -> jnp.ndarray:
  features = jnp.asarray(features)
  if features.ndim != 2:
    raise ValueError(f"features must be [N, D], got shape {features.shape}; use pixel_features "
                     "for images and jax.vmap for batches.")
  if features.shape[0] < 1:
    raise ValueError("features has no points.")
  return features.astype(jnp.float32)


def _check_iterations(max_iterations: int) -> None:
  if not isinstance(max_iterations, int) or max_iterations < 1:
    raise ValueError(f"max_iterations must be an integer >= 1, got {max_iterations!r}.")


def _squared_distances(points, centers) -> jnp.ndarray:
  """[N, M] squared Euclidean distances, clamped at 0 (the expanded form can round below)."""
  cross = jnp.matmul(points, centers.T, precision=_HIGHEST)
  squared = (jnp.sum(points**2, axis=1)[:, None] - 2 * cross + jnp.sum(centers**2, axis=1)[None])
  return jnp.maximum(squared, 0)


def _assign(points, centers) -> jnp.ndarray:
  return jnp.argmin(_squared_distances(points, centers), axis=1).astype(jnp.int32)


def _sse(points, labels, centers) -> jnp.ndarray:
  return jnp.sum((points - centers[labels])**2)


def _kmeans_plus_plus(points, k: int, key) -> jnp.ndarray:
  """k initial centres by D^2 sampling (first one uniform)."""
  key, first_key = jax.random.split(key)
  first = points[jax.random.randint(first_key, (), 0, points.shape[0])]
  centers = jnp.zeros((k, points.shape[1]), points.dtype).at[0].set(first)
  closest = jnp.sum((points - first)**2, axis=1)

  def add_center(i, state):
    centers, closest, key = state
    key, draw_key = jax.random.split(key)
    # All points on chosen centres (fewer distinct points than k): draw uniformly.
    logits = jnp.where(closest.sum() > 0, jnp.log(closest), 0)
    center = points[jax.random.categorical(draw_key, logits)]
    closest = jnp.minimum(closest, jnp.sum((points - center)**2, axis=1))
    return centers.at[i].set(center), closest, key

  centers, _, _ = jax.lax.fori_loop(1, k, add_center, (centers, closest, key))
  return centers


@functools.partial(jax.jit, static_argnames=("k", "max_iterations", "tolerance"))
def kmeans(features, k: int, key, max_iterations: int = 100, tolerance: float = 1e-4):
  """k-means of features [N, D] with k-means++ seeding (see the module docstring).

  Args:
    features: [N, D] points.
    k: number of clusters, 1 <= k <= N (static).
    key: a jax.random key for the seeding.
    max_iterations: most Lloyd iterations (static, >= 1).
    tolerance: stop when the SSE drops by at most this fraction of the previous SSE.

  Returns:
    labels: int32 [N] cluster of each point.
    centers: float32 [k, D] cluster means (an emptied cluster keeps its last centre).
    sse_history: float32 [max_iterations], the SSE after each iteration, the final
      value repeated after stopping (never increases, up to float rounding).
    num_iterations: int32 number of Lloyd iterations run.
  """
  points = _check_features(features)
  num_points = points.shape[0]
  if not isinstance(k, int) or not 1 <= k <= num_points:
    raise ValueError(f"k must be an integer in [1, {num_points}] (the number of points), got "
                     f"{k!r}.")
  _check_iterations(max_iterations)
  if not tolerance >= 0:
    raise ValueError(f"tolerance must be >= 0, got {tolerance!r}.")
  # Centring keeps the expanded squared distances accurate for features far from 0.
  offset = jnp.mean(points, axis=0)
  points = points - offset
  centers = _kmeans_plus_plus(points, k, key)
  labels = _assign(points, centers)
  history = jnp.zeros((max_iterations,), jnp.float32)

  def keep_going(state):
    iteration, _, _, _, _, done = state
    return (iteration < max_iterations) & ~done

  def lloyd_step(state):
    iteration, centers, labels, previous, history, _ = state
    sums = jax.ops.segment_sum(points, labels, num_segments=k)
    counts = jax.ops.segment_sum(jnp.ones((num_points,), jnp.float32), labels, num_segments=k)
    centers = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], centers)
    labels = _assign(points, centers)
    sse = _sse(points, labels, centers)
    done = previous - sse <= tolerance * previous
    return iteration + 1, centers, labels, sse, history.at[iteration].set(sse), done

  state = (jnp.int32(0), centers, labels, _sse(points, labels, centers), history, jnp.bool_(False))
  iterations, centers, labels, sse, history, _ = jax.lax.while_loop(keep_going, lloyd_step, state)
  history = jnp.where(jnp.arange(max_iterations) < iterations, history, sse)
  return labels, centers + offset, history, iterations


def kmeans_segment(image, k: int, key, mode: str = "color", position_weight: float = 1.0,
                   max_iterations: int = 100, tolerance: float = 1e-4) -> jnp.ndarray:
  """int32 [H, W] k-means cluster labels of an [H, W] or [H, W, C] image.

  Args:
    image: the image; see `pixel_features`.
    k, key, max_iterations, tolerance: as in `kmeans`.
    mode, position_weight: as in `pixel_features`.
  """
  features = pixel_features(image, mode, position_weight)
  labels, _, _, _ = kmeans(features, k, key, max_iterations, tolerance)
  return labels.reshape(jnp.shape(image)[:2])


def _link_components(adjacent) -> jnp.ndarray:
  """Smallest index in each point's connected component (`adjacent`: symmetric, reflexive)."""
  num_points = adjacent.shape[0]
  index = jnp.arange(num_points, dtype=jnp.int32)

  def propagate(state):
    labels, _ = state
    new = jnp.min(jnp.where(adjacent, labels[None, :], num_points), axis=1)
    new = new[new]
    return new, jnp.any(new != labels)

  labels, _ = jax.lax.while_loop(lambda state: state[1], propagate, (index, jnp.bool_(True)))
  return labels


@functools.partial(jax.jit, static_argnames=("bandwidth", "max_iterations", "kernel"))
def mean_shift(features, bandwidth: float, max_iterations: int = 50, kernel: str = "flat"):
  """Mean-shift clustering of features [N, D] (see the module docstring); O(N^2) per step.

  Args:
    features: [N, D] points.
    bandwidth: kernel radius (flat) or standard deviation (gaussian), a Python
      number > 0 (static).
    max_iterations: most shift steps (static, >= 1).
    kernel: "flat" or "gaussian".

  Returns:
    labels: int32 [N] cluster of each point, 0..C-1 in order of the clusters' first points.
    modes: float32 [N, D]; row c < C is the mean converged position of cluster c,
      rows >= C are 0.
    valid: bool [N], True for the C rows of `modes` that are clusters.
  """
  points = _check_features(features)
  if not isinstance(bandwidth, numbers.Real) or not bandwidth > 0:
    raise ValueError(f"bandwidth must be a Python number > 0, got {bandwidth!r}.")
  _check_iterations(max_iterations)
  if kernel not in KERNELS:
    raise ValueError(f"Unknown kernel {kernel!r}; expected one of {KERNELS}.")
  num_points = points.shape[0]
  offset = jnp.mean(points, axis=0)
  points = points - offset
  radius2 = jnp.float32(bandwidth)**2
  stop_shift = jnp.float32(_SHIFT_TOLERANCE * bandwidth)

  def keep_going(state):
    iteration, _, largest_shift = state
    return (iteration < max_iterations) & (largest_shift >= stop_shift)

  def shift_step(state):
    iteration, positions, _ = state
    squared = _squared_distances(positions, points)
    if kernel == "flat":
      weights = (squared <= radius2).astype(jnp.float32)
    else:
      weights = jnp.exp(-squared / (2 * radius2))
    total = jnp.sum(weights, axis=1, keepdims=True)
    means = jnp.matmul(weights, points, precision=_HIGHEST) / jnp.maximum(total, 1e-30)
    moved = jnp.where(total > 0, means, positions)
    largest_shift = jnp.sqrt(jnp.max(jnp.sum((moved - positions)**2, axis=1)))
    return iteration + 1, moved, largest_shift

  state = (jnp.int32(0), points, jnp.float32(jnp.inf))
  _, positions, _ = jax.lax.while_loop(keep_going, shift_step, state)

  index = jnp.arange(num_points, dtype=jnp.int32)
  close = _squared_distances(positions, positions) <= jnp.float32(bandwidth / 2)**2
  first = _link_components(close | close.T | (index[:, None] == index[None, :]))
  is_first = first == index
  labels = (jnp.cumsum(is_first, dtype=jnp.int32) - 1)[first]
  sums = jax.ops.segment_sum(positions, labels, num_segments=num_points)
  counts = jax.ops.segment_sum(jnp.ones((num_points,), jnp.float32), labels,
                               num_segments=num_points)
  valid = index < jnp.sum(is_first)
  modes = jnp.where(valid[:, None], sums / jnp.maximum(counts, 1)[:, None] + offset, 0)
  return labels, modes, valid


def mean_shift_segment(image, bandwidth: float, mode: str = "color",
                       position_weight: float = 1.0, max_iterations: int = 50,
                       kernel: str = "flat") -> jnp.ndarray:
  """int32 [H, W] mean-shift cluster labels of an [H, W] or [H, W, C] image.

  Args:
    image: the image; see `pixel_features`.
    bandwidth, max_iterations, kernel: as in `mean_shift`.
    mode, position_weight: as in `pixel_features`.
  """
  features = pixel_features(image, mode, position_weight)
  labels, _, _ = mean_shift(features, bandwidth, max_iterations, kernel)
  return labels.reshape(jnp.shape(image)[:2])
