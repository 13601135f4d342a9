"""Region growing, split-and-merge and the scikit-image wrappers, against numpy references."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from skimage import filters, measure, morphology, segmentation

from segjax.classical.region_growing import region_grow, seeds_from_points
from segjax.classical.split_merge import quadtree_split, split_and_merge
from segjax.classical.watershed import (felzenszwalb_segment, h_minima_markers,
                                        watershed_segment)

_NEIGHBOURS = {4: [(-1, 0), (1, 0), (0, -1), (0, 1)],
               8: [(-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)]}


def reference_grow(image, seeds, threshold, adaptive, connectivity, max_rounds=None):
  """Pixel-loop seeded region growing in float64, one ring per round."""
  image = np.asarray(image, np.float64)
  labels = np.asarray(seeds).copy()
  height, width = labels.shape
  rounds = 0
  while max_rounds is None or rounds < max_rounds:
    means, limits = {}, {}
    for i in range(1, int(seeds.max()) + 1):
      pixels = image[labels == i]
      if pixels.size == 0:
        continue
      mean, sd = pixels.mean(), pixels.std()
      limits[i] = threshold
      if adaptive:
        ratio = 0.0 if sd == 0 else (np.inf if mean == 0 else sd / abs(mean))
        limits[i] = max(0.0, (1.0 - ratio) * threshold)
      means[i] = mean
    grown = labels.copy()
    for r in range(height):
      for c in range(width):
        if labels[r, c]:
          continue
        best = None
        for dr, dc in _NEIGHBOURS[connectivity]:
          if 0 <= r + dr < height and 0 <= c + dc < width and labels[r + dr, c + dc]:
            i = labels[r + dr, c + dc]
            distance = abs(image[r, c] - means[i])
            if distance <= limits[i] and (best is None or (distance, i) < best):
              best = (distance, i)
        if best is not None:
          grown[r, c] = best[1]
    if np.array_equal(grown, labels):
      break
    labels = grown
    rounds += 1
  return labels


def same_partition(a, b):
  """True when label maps a and b split the pixels identically (up to relabelling)."""
  a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
  pairs = len(np.unique(np.stack([a, b], axis=1), axis=0))
  return pairs == len(np.unique(a)) == len(np.unique(b))


def patchy_image(rng, shape=(12, 12)):
  """Integer-valued blocks of different levels plus integer noise."""
  levels = rng.integers(0, 4, (3, 3)) * 50 + 40
  blocks = np.kron(levels, np.ones((shape[0] // 3 + 1, shape[1] // 3 + 1)))
  return (blocks[:shape[0], :shape[1]] + rng.integers(-20, 21, shape)).astype(np.float32)


# ----------------------------------------------------------------------------- region growing


def test_seeds_from_points():
  seeds = seeds_from_points((4, 5, 3), [(0, 0), (3, 4), (2, 1)])
  expected = np.zeros((4, 5), np.int32)
  expected[0, 0], expected[3, 4], expected[2, 1] = 1, 2, 3
  np.testing.assert_array_equal(seeds, expected)
  assert seeds.dtype == np.int32
  with pytest.raises(ValueError, match="outside"):
    seeds_from_points((4, 5), [(0, 0), (4, 0)])
  with pytest.raises(ValueError, match="outside"):
    seeds_from_points((4, 5), [(0, -1)])
  with pytest.raises(ValueError, match="repeated"):
    seeds_from_points((4, 5), [(1, 1), (1, 1)])
  with pytest.raises(ValueError, match="shape"):
    seeds_from_points((4, 5), [1, 2, 3])


@pytest.mark.parametrize("adaptive", [True, False])
def test_grow_fills_constant_region_4_vs_8(adaptive):
  rng = np.random.default_rng(0)
  image = rng.uniform(0, 100, (10, 10)).astype(np.float32)
  first = np.zeros((10, 10), bool)
  first[2:5, 2:5] = True
  second = np.zeros((10, 10), bool)
  second[5:8, 5:8] = True  # touches `first` only diagonally, at (4, 4)-(5, 5)
  image[first | second] = 200.0
  seeds = seeds_from_points(image.shape, [(3, 3)])
  four = np.asarray(region_grow(image, seeds, 10.0, adaptive=adaptive, connectivity=4))
  eight = np.asarray(region_grow(image, seeds, 10.0, adaptive=adaptive, connectivity=8))
  np.testing.assert_array_equal(four, first.astype(np.int32))
  np.testing.assert_array_equal(eight, (first | second).astype(np.int32))
  assert four.dtype == np.int32


def test_adaptive_threshold_formula_hand_case():
  # Region 1 starts as {10, 20}: M = 15, sd = 5, so T(1) = (1 - 5/15) * 6 = 4 < |20 - 15|.
  image = np.array([[10.0, 20.0, 20.0, 90.0]], np.float32)
  seeds = np.array([[1, 1, 0, 0]], np.int32)
  mean, sd = image[0, :2].mean(), image[0, :2].std()
  adaptive_limit = (1 - sd / mean) * 6.0
  assert adaptive_limit < abs(20.0 - mean) <= 6.0
  np.testing.assert_array_equal(region_grow(image, seeds, 6.0, adaptive=True), [[1, 1, 0, 0]])
  np.testing.assert_array_equal(region_grow(image, seeds, 6.0, adaptive=False), [[1, 1, 1, 0]])


def test_adaptive_zero_mean_rules():
  # sd = 0 keeps T even at M = 0; M = 0 with sd > 0 gives T(i) = 0.
  zeros = np.array([[0.0, 0.0, 0.5, 3.0]], np.float32)
  np.testing.assert_array_equal(region_grow(zeros, np.array([[1, 1, 0, 0]]), 1.0),
                                [[1, 1, 1, 0]])
  signed = np.array([[-1.0, 1.0, 0.5, 0.5]], np.float32)
  seeds = np.array([[1, 1, 0, 0]])
  np.testing.assert_array_equal(region_grow(signed, seeds, 1.0), [[1, 1, 0, 0]])
  np.testing.assert_array_equal(region_grow(signed, seeds, 1.0, adaptive=False),
                                [[1, 1, 1, 1]])


def test_competing_regions_closest_mean_then_lower_id():
  seeds = np.array([[2, 0, 1]], np.int32)
  tie = np.array([[10.0, 15.0, 20.0]], np.float32)
  np.testing.assert_array_equal(region_grow(tie, seeds, 10.0), [[2, 1, 1]])
  closer = np.array([[10.0, 14.0, 20.0]], np.float32)
  np.testing.assert_array_equal(region_grow(closer, seeds, 10.0), [[2, 2, 1]])


@pytest.mark.parametrize("connectivity", [4, 8])
def test_grow_matches_numpy_reference(connectivity):
  rng = np.random.default_rng(1)
  differ = 0
  for _ in range(3):
    image = patchy_image(rng)
    seeds = seeds_from_points(image.shape, [(1, 1), (6, 6), (10, 2)])
    results = {}
    for adaptive in (True, False):
      got = np.asarray(region_grow(image, seeds, 20.0, adaptive, connectivity))
      want = reference_grow(image, seeds, 20.0, adaptive, connectivity)
      np.testing.assert_array_equal(got, want)
      results[adaptive] = got
    differ += not np.array_equal(results[True], results[False])
  assert differ  # the adaptive threshold changes at least one of these segmentations


def test_max_iterations_and_colour():
  rng = np.random.default_rng(2)
  image = patchy_image(rng)
  seeds = seeds_from_points(image.shape, [(1, 1), (6, 6)])
  for rounds in (0, 1, 3):
    np.testing.assert_array_equal(region_grow(image, seeds, 20.0, max_iterations=rounds),
                                  reference_grow(image, seeds, 20.0, True, 4, rounds))
  colour = np.stack([image - 6, image, image + 6], axis=-1)
  np.testing.assert_array_equal(region_grow(colour, seeds, 20.0),
                                reference_grow(image, seeds, 20.0, True, 4))


def test_vmap_equals_per_image():
  rng = np.random.default_rng(3)
  images = np.stack([patchy_image(rng) for _ in range(3)])
  seeds = np.stack([seeds_from_points((12, 12), [(1, 1), (6, 6), (10, 2)]),
                    seeds_from_points((12, 12), [(11, 11), (0, 5)]),
                    seeds_from_points((12, 12), [(4, 4)])])
  thresholds = np.array([20.0, 15.0, 30.0], np.float32)
  grow = functools.partial(region_grow, connectivity=8, num_regions=3)
  batched = np.asarray(jax.jit(jax.vmap(grow))(images, seeds, thresholds))
  for image, seed, threshold, got in zip(images, seeds, thresholds, batched):
    np.testing.assert_array_equal(got, region_grow(image, seed, float(threshold),
                                                   connectivity=8))
    np.testing.assert_array_equal(got, reference_grow(image, seed, threshold, True, 8))


def test_region_grow_errors():
  image = np.zeros((4, 4), np.float32)
  seeds = seeds_from_points(image.shape, [(0, 0)])
  with pytest.raises(ValueError, match="image has shape"):
    region_grow(np.zeros((4,)), seeds, 1.0)
  with pytest.raises(ValueError, match="seeds has shape"):
    region_grow(image, np.zeros((4, 5), np.int32), 1.0)
  with pytest.raises(ValueError, match="dtype"):
    region_grow(image, seeds.astype(np.float32), 1.0)
  with pytest.raises(ValueError, match="threshold must be >= 0"):
    region_grow(image, seeds, -1.0)
  with pytest.raises(ValueError, match="connectivity"):
    region_grow(image, seeds, 1.0, connectivity=6)
  with pytest.raises(ValueError, match="negative"):
    region_grow(image, -seeds, 1.0)
  with pytest.raises(ValueError, match="no labelled pixel"):
    region_grow(image, np.zeros_like(seeds), 1.0)
  with pytest.raises(ValueError, match="num_regions"):
    region_grow(image, 2 * seeds, 1.0, num_regions=1)
  with pytest.raises(ValueError, match="num_regions is needed"):
    jax.jit(lambda s: region_grow(image, s, 1.0))(jnp.asarray(seeds))
  with pytest.raises(ValueError, match="max_iterations"):
    region_grow(image, seeds, 1.0, max_iterations=-1)


# ----------------------------------------------------------------------------- split and merge


def reference_quadtree(values, predicate, limit, min_block):
  """Recursive quadtree split on the padded power-of-two square; leaf id per pixel."""
  height, width = values.shape
  side = 1 << int(np.ceil(np.log2(max(height, width))))
  leaves = np.full((side, side), -1)

  def split(r, c, size):
    block = values[r:min(r + size, height), c:min(c + size, width)]
    if block.size:
      statistic = block.var() if predicate == "variance" else np.ptp(block)
      if statistic > limit and size >= 2 * min_block:
        half = size // 2
        for dr, dc in ((0, 0), (0, half), (half, 0), (half, half)):
          split(r + dr, c + dc, half)
        return
    leaves[r:r + size, c:c + size] = r * side + c

  split(0, 0, side)
  return leaves[:height, :width]


@pytest.mark.parametrize("predicate,limit,min_block",
                         [("variance", 8.3, 1), ("variance", 8.3, 2), ("range", 8.5, 1),
                          ("range", 8.5, 2), ("range", 8.5, 3)])
def test_quadtree_split_matches_recursive_reference(predicate, limit, min_block):
  rng = np.random.default_rng(4)
  values = patchy_image(rng, (13, 11)).astype(np.float64) / 4
  kwargs = {"max_variance": limit} if predicate == "variance" else {"max_range": limit}
  got = quadtree_split(values, predicate, min_block=min_block, **kwargs)
  want = reference_quadtree(values, predicate, limit, min_block)
  assert same_partition(got, want)
  assert got.dtype == np.int32 and set(np.unique(got)) == set(range(got.max() + 1))


def region_statistic(values, mask, predicate):
  return values[mask].var() if predicate == "variance" else np.ptp(values[mask])


@pytest.mark.parametrize("predicate,limit", [("variance", 2.0), ("range", 3.0)])
def test_split_and_merge_regions_homogeneous_connected_maximal(predicate, limit):
  rng = np.random.default_rng(5)
  values = rng.integers(0, 10, (12, 12)).astype(np.float64)
  kwargs = {"max_variance": limit} if predicate == "variance" else {"max_range": limit}
  labels = split_and_merge(values, predicate, min_block=1, **kwargs)
  assert labels.dtype == np.int32 and labels.shape == values.shape
  count = labels.max() + 1
  assert set(np.unique(labels)) == set(range(count)) and 1 < count < values.size
  for region in range(count):
    mask = labels == region
    assert region_statistic(values, mask, predicate) <= limit
    assert ndimage.label(mask)[1] == 1
  pairs = {tuple(sorted(p)) for p in zip(labels[:, :-1].ravel(), labels[:, 1:].ravel())}
  pairs |= {tuple(sorted(p)) for p in zip(labels[:-1].ravel(), labels[1:].ravel())}
  for a, b in pairs:
    if a != b:  # greedy merging stops only when no adjacent union is homogeneous
      assert region_statistic(values, (labels == a) | (labels == b), predicate) > limit


def components(values):
  """4-connected components of equal value, as one label map."""
  labels = np.zeros(values.shape, int)
  for value in np.unique(values):
    component, count = ndimage.label(values == value)
    labels[component > 0] = component[component > 0] + labels.max()
  return labels


def test_split_and_merge_recovers_piecewise_constant():
  truth = np.zeros((13, 10))
  truth[2:9, 3:8] = 5.0
  truth[9:, :4] = 10.0
  truth[0:3, 7:] = 10.0
  truth[10:, 6:] = 5.0  # same value as the centre block, not connected to it
  want = components(truth)
  assert same_partition(split_and_merge(truth, max_variance=0.01, min_block=1), want)
  noisy = truth + np.random.default_rng(6).uniform(-0.5, 0.5, truth.shape)
  assert same_partition(split_and_merge(noisy, "range", max_range=1.5, min_block=1), want)
  colour = np.stack([noisy, noisy + 0.1, noisy - 0.1], axis=-1)
  assert same_partition(split_and_merge(colour, "range", max_range=1.5, min_block=1), want)
  aligned = np.kron(np.array([[0.0, 3.0, 3.0], [7.0, 7.0, 0.0], [0.0, 7.0, 3.0]]),
                    np.ones((2, 2)))
  assert same_partition(split_and_merge(aligned, max_variance=0.01, min_block=2),
                        components(aligned))


def test_split_and_merge_errors():
  image = np.zeros((8, 8))
  with pytest.raises(ValueError, match="min_block"):
    split_and_merge(image, min_block=0)
  with pytest.raises(ValueError, match="unknown predicate"):
    split_and_merge(image, predicate="entropy")
  with pytest.raises(ValueError, match="needs max_range"):
    split_and_merge(image, predicate="range")
  with pytest.raises(ValueError, match=">= 0"):
    split_and_merge(image, max_variance=-1.0)
  with pytest.raises(ValueError, match="image has shape"):
    split_and_merge(np.zeros((2, 8, 8, 3)))


# ----------------------------------------------------------------------------- scikit-image


def two_region_image():
  rows, cols = np.mgrid[:20, :20]
  disk = (rows - 9.5) ** 2 + (cols - 9.5) ** 2 < 36
  image = np.where(disk, 200.0, 50.0)
  return image, disk


def test_watershed_two_regions_and_equals_skimage():
  image, disk = two_region_image()
  labels = watershed_segment(image)
  assert labels.dtype == np.int32 and set(np.unique(labels)) == {1, 2}
  assert same_partition(labels, disk)
  gradient = filters.sobel(image)
  markers = measure.label(morphology.h_minima(gradient, 0.05 * np.ptp(gradient)),
                          connectivity=1)
  np.testing.assert_array_equal(h_minima_markers(gradient), markers)
  np.testing.assert_array_equal(labels, segmentation.watershed(gradient, markers))
  given = np.zeros(image.shape, np.int32)
  given[10, 10], given[0, 0] = 5, 9
  np.testing.assert_array_equal(
      watershed_segment(image, given, compactness=0.01),
      segmentation.watershed(gradient, given, compactness=0.01))
  rgb = np.stack([image] * 3, axis=-1)
  np.testing.assert_array_equal(watershed_segment(rgb), labels)


def test_felzenszwalb_two_regions_and_equals_skimage():
  image, disk = two_region_image()
  labels = felzenszwalb_segment(image, scale=100, sigma=0.8, min_size=20)
  assert labels.dtype == np.int32
  assert same_partition(labels, disk)
  np.testing.assert_array_equal(
      labels, segmentation.felzenszwalb(image, scale=100, sigma=0.8, min_size=20,
                                        channel_axis=None))
  rgb = np.stack([image, 1 - image, image], axis=-1)
  np.testing.assert_array_equal(felzenszwalb_segment(rgb, scale=50, min_size=10),
                                segmentation.felzenszwalb(rgb, scale=50, min_size=10))


def test_wrapper_errors():
  image, _ = two_region_image()
  with pytest.raises(ValueError, match="compactness"):
    watershed_segment(image, compactness=-1.0)
  with pytest.raises(ValueError, match="markers has shape"):
    watershed_segment(image, np.ones((3, 3), np.int32))
  with pytest.raises(ValueError, match="no marked pixel"):
    watershed_segment(image, np.zeros(image.shape, np.int32))
  with pytest.raises(ValueError, match="image has shape"):
    watershed_segment(np.zeros((4, 4, 2)))
  with pytest.raises(ValueError, match="scale"):
    felzenszwalb_segment(image, scale=0)
  with pytest.raises(ValueError, match="min_size"):
    felzenszwalb_segment(image, min_size=-1)
  with pytest.raises(ValueError, match="image has shape"):
    felzenszwalb_segment(np.zeros(5))
