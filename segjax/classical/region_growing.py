"""Seeded region growing with a (optionally adaptive) mean-intensity test.

Regions start at labelled seed pixels and grow one ring of neighbours per round.
An unlabelled pixel x next to region i (4- or 8-connectivity) may join it when

  |I(x) - M(i)| <= T(i),

with M(i) the region's current mean intensity and, for `adaptive=True`,
T(i) = max(0, (1 - sd(i) / |M(i)|) * T), sd(i) the region's population standard
deviation; otherwise T(i) = T. A region with sd(i) = 0 gets T(i) = T (whatever its
mean, so a constant region of zeros keeps the full threshold); a region with
M(i) = 0 and sd(i) > 0 gets T(i) = 0 (the ratio is infinite). Statistics are those
of the region at the start of the round, so all pixels of one ring are judged
against the same M(i), T(i). A pixel that passes the test for several regions
joins the one with the smallest |I(x) - M(i)|, ties going to the lower id.
Growing stops when a round adds no pixel (or after `max_iterations` rounds).

Everything runs in one `jax.lax.while_loop` with static shapes: region statistics
are segment sums over `num_regions` static slots, so the function is jittable and
vmappable once `num_regions` is given.
"""
import functools
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

_OFFSETS = {4: ((-1, 0), (1, 0), (0, -1), (0, 1)),
            8: ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))}


def _concrete(value) -> Optional[np.ndarray]:
  """`value` as numpy, or None while it is traced (inside jit or vmap)."""
  try:
    return np.asarray(value)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def seeds_from_points(shape: Sequence[int], points: Sequence[Tuple[int, int]]) -> np.ndarray:
  """An int32 [H, W] seed map with point k = (row, col) labelled k + 1, 0 elsewhere.

  Args:
    shape: the image shape; its first two entries are (H, W).
    points: (row, col) integer pixel positions, one seed region each.
  """
  if len(shape) < 2:
    raise ValueError(f"shape {tuple(shape)} needs at least (H, W).")
  height, width = int(shape[0]), int(shape[1])
  points = np.asarray(points)
  if points.size == 0:
    raise ValueError("points is empty; give at least one (row, col) seed.")
  if points.ndim != 2 or points.shape[1] != 2:
    raise ValueError(f"points has shape {points.shape}; expected (S, 2) (row, col) pairs.")
  if not np.issubdtype(points.dtype, np.integer):
    raise ValueError(f"points has dtype {points.dtype}; seeds are integer pixel positions.")
  outside = ((points[:, 0] < 0) | (points[:, 0] >= height) | (points[:, 1] < 0)
             | (points[:, 1] >= width))
  if outside.any():
    raise ValueError(f"seed points {points[outside].tolist()} lie outside the "
                     f"{height}x{width} image.")
  if len({tuple(p) for p in points.tolist()}) != len(points):
    raise ValueError("points has repeated positions; give each seed its own pixel.")
  seeds = np.zeros((height, width), np.int32)
  seeds[points[:, 0], points[:, 1]] = np.arange(1, len(points) + 1, dtype=np.int32)
  return seeds


def _neighbour(labels: jax.Array, dr: int, dc: int) -> jax.Array:
  """labels[r + dr, c + dc] at every (r, c); 0 (unlabelled) outside the image."""
  height, width = labels.shape
  padded = jnp.pad(labels, 1)
  return padded[1 + dr:1 + dr + height, 1 + dc:1 + dc + width]


def _region_thresholds(intensity, labels, threshold, adaptive: bool, num_regions: int):
  """Per-slot mean M and threshold T (slot 0 is the unlabelled pixels)."""
  flat = labels.reshape(-1)
  values = intensity.reshape(-1)
  counts = jax.ops.segment_sum(jnp.ones_like(values), flat, num_regions + 1)
  counts = jnp.maximum(counts, 1.0)
  mean = jax.ops.segment_sum(values, flat, num_regions + 1) / counts
  if not adaptive:
    return mean, jnp.full_like(mean, threshold)
  squared = jnp.square(values - mean[flat])
  sd = jnp.sqrt(jax.ops.segment_sum(squared, flat, num_regions + 1) / counts)
  ratio = jnp.where(sd == 0, 0.0, sd / jnp.abs(mean))
  return mean, jnp.maximum((1.0 - ratio) * threshold, 0.0)


@functools.partial(jax.jit, static_argnames=("adaptive", "connectivity", "num_regions",
                                             "max_iterations"))
def _grow(intensity, seeds, threshold, adaptive, connectivity, num_regions, max_iterations):
  """The while_loop; see `region_grow`."""
  labels = jnp.where((seeds >= 1) & (seeds <= num_regions), seeds, 0).astype(jnp.int32)

  def one_round(labels):
    mean, region_threshold = _region_thresholds(intensity, labels, threshold, adaptive,
                                                 num_regions)
    free = labels == 0
    best_cost = jnp.full(labels.shape, jnp.inf, intensity.dtype)
    best_id = jnp.zeros_like(labels)
    for dr, dc in _OFFSETS[connectivity]:
      region = _neighbour(labels, dr, dc)
      cost = jnp.abs(intensity - mean[region])
      ok = free & (region > 0) & (cost <= region_threshold[region])
      cost = jnp.where(ok, cost, jnp.inf)
      better = (cost < best_cost) | (ok & (cost == best_cost) & (region < best_id))
      best_cost = jnp.where(better, cost, best_cost)
      best_id = jnp.where(better, region, best_id)
    return jnp.where(best_id > 0, best_id, labels)

  def cond(state):
    _, changed, rounds = state
    if max_iterations is None:
      return changed
    return changed & (rounds < max_iterations)

  def body(state):
    labels, _, rounds = state
    grown = one_round(labels)
    return grown, jnp.any(grown != labels), rounds + 1

  labels, _, _ = jax.lax.while_loop(cond, body, (labels, jnp.array(True), jnp.array(0)))
  return labels


def region_grow(image, seeds, threshold, adaptive: bool = True, connectivity: int = 4,
                max_iterations: Optional[int] = None, *,
                num_regions: Optional[int] = None) -> jax.Array:
  """Seeded region growing; int32 [H, W] labels, 0 where no region reached.

  Args:
    image: [H, W] gray or [H, W, C] image; a colour image is grown on its channel
      mean (one intensity per pixel, so M, sd and T are scalars per region).
    seeds: integer [H, W] map, 0 = unlabelled, 1..S = seed region ids (a region
      may start from several pixels); see `seeds_from_points` for (row, col) seeds.
      Ids outside 1..num_regions are treated as unlabelled when traced.
    threshold: T >= 0, in image intensity units.
    adaptive: use T(i) = max(0, (1 - sd(i) / |M(i)|) T) (see module doc) instead
      of T.
    connectivity: 4 or 8 neighbours.
    max_iterations: at most this many growth rounds (one ring each); None grows
      until a round adds nothing.
    num_regions: S, the static number of region slots. None reads max(seeds),
      which needs concrete seeds; pass it under jit or vmap.
  """
  image = jnp.asarray(image)
  if image.ndim not in (2, 3):
    raise ValueError(f"image has shape {image.shape}; expected [H, W] or [H, W, C].")
  intensity = image.astype(jnp.float32)
  if image.ndim == 3:
    intensity = intensity.mean(axis=-1)
  seeds = jnp.asarray(seeds)
  if seeds.shape != intensity.shape:
    raise ValueError(f"seeds has shape {seeds.shape}; expected the image's "
                     f"{intensity.shape} (use seeds_from_points for (row, col) seeds).")
  if not jnp.issubdtype(seeds.dtype, jnp.integer):
    raise ValueError(f"seeds has dtype {seeds.dtype}; expected integer region ids.")
  if connectivity not in _OFFSETS:
    raise ValueError(f"connectivity must be 4 or 8, got {connectivity}.")
  if max_iterations is not None and (not isinstance(max_iterations, int) or max_iterations < 0):
    raise ValueError(f"max_iterations must be None or an int >= 0, got {max_iterations}.")
  threshold = jnp.asarray(threshold, jnp.float32)
  if threshold.ndim != 0:
    raise ValueError(f"threshold must be a scalar, got shape {threshold.shape}.")
  known_threshold = _concrete(threshold)
  if known_threshold is not None and not known_threshold >= 0:
    raise ValueError(f"threshold must be >= 0, got {float(known_threshold)}.")
  known_seeds = _concrete(seeds)
  if known_seeds is not None and known_seeds.min() < 0:
    raise ValueError("seeds has negative ids; use 0 for unlabelled and 1..S for regions.")
  if num_regions is None:
    if known_seeds is None:
      raise ValueError("num_regions is needed when seeds are traced (under jit or vmap).")
    num_regions = int(known_seeds.max())
    if num_regions == 0:
      raise ValueError("seeds has no labelled pixel; mark each seed region with an id >= 1.")
  elif not isinstance(num_regions, int) or num_regions < 1:
    raise ValueError(f"num_regions must be an int >= 1, got {num_regions}.")
  elif known_seeds is not None and known_seeds.max() > num_regions:
    raise ValueError(f"seeds has id {int(known_seeds.max())} > num_regions={num_regions}.")
  return _grow(intensity, seeds, threshold, adaptive, connectivity, num_regions,
               max_iterations)
