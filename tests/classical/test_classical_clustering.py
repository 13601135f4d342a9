"""k-means and mean shift against synthetic blobs and numpy re-computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.classical import clustering
from segjax.classical.clustering import (kmeans, kmeans_segment, mean_shift, mean_shift_segment,
                                         pixel_features)

BLOB_CENTERS = np.array([[0.0, 0.0, 0.0], [8.0, 0.0, 2.0], [0.0, 9.0, -3.0], [7.0, 8.0, 6.0]])


def _blobs(seed, per_blob=40, sigma=0.5, centers=BLOB_CENTERS):
  """Float32 points [B * per_blob, D] and their blob ids, shuffled."""
  rng = np.random.default_rng(seed)
  truth = np.repeat(np.arange(len(centers)), per_blob)
  points = centers[truth] + rng.normal(0, sigma, (len(truth), centers.shape[1]))
  order = rng.permutation(len(truth))
  return points[order].astype(np.float32), truth[order]


def _same_partition(labels, truth):
  pairs = set(zip(np.asarray(labels).tolist(), np.asarray(truth).tolist()))
  return len(pairs) == len(set(np.asarray(labels).tolist())) == len(set(truth.tolist()))


def _components(adjacent):
  """Smallest index of each node's connected component, by depth-first search."""
  root = -np.ones(len(adjacent), int)
  for start in range(len(adjacent)):
    if root[start] >= 0:
      continue
    stack = [start]
    while stack:
      node = stack.pop()
      if root[node] < 0:
        root[node] = start
        stack.extend(np.flatnonzero(adjacent[node] & (root < 0)).tolist())
  return root


def _numpy_mean_shift(points, bandwidth, max_iterations):
  """Flat-kernel mean shift and bandwidth / 2 merging, in float64 numpy."""
  points = points.astype(np.float64)
  positions = points.copy()
  for _ in range(max_iterations):
    inside = ((positions[:, None] - points[None])**2).sum(-1) <= bandwidth**2
    moved = inside @ points / inside.sum(1, keepdims=True)
    shift = np.sqrt(((moved - positions)**2).sum(1)).max()
    positions = moved
    if shift < 1e-3 * bandwidth:
      break
  close = ((positions[:, None] - positions[None])**2).sum(-1) <= (bandwidth / 2)**2
  root = _components(close)
  roots = np.unique(root)
  labels = np.searchsorted(roots, root)
  modes = np.stack([positions[labels == c].mean(0) for c in range(len(roots))])
  return labels, modes


def test_kmeans_recovers_blobs_and_is_self_consistent():
  points, truth = _blobs(0)
  tolerance = 1e-4
  for seed in range(3):
    labels, centers, history, iterations = kmeans(points, 4, jax.random.key(seed),
                                                  max_iterations=20, tolerance=tolerance)
    labels, centers, history = map(np.asarray, (labels, centers, history))
    iterations = int(iterations)
    assert _same_partition(labels, truth)
    # Independent checks: nearest-centre labels, centres are label means, SSE history.
    distances = ((points[:, None].astype(np.float64) - centers[None])**2).sum(-1)
    np.testing.assert_array_equal(labels, distances.argmin(1))
    means = np.stack([points[labels == c].mean(0) for c in range(4)])
    np.testing.assert_allclose(centers, means, atol=1e-5)
    np.testing.assert_allclose(history[-1], distances.min(1).sum(), rtol=1e-5)
    assert 1 <= iterations < 20
    assert (np.diff(history) <= 1e-6 * history[:-1]).all()
    assert (history[iterations - 1:] == history[-1]).all()
    if iterations >= 2:
      drops = history[:iterations - 1] - history[1:iterations]
      assert drops[-1] <= tolerance * history[iterations - 2]
      assert (drops[:-1] > tolerance * history[:iterations - 2]).all()


def test_kmeans_plus_plus_seeds_distinct_blobs():
  points, truth = _blobs(1)
  keys = jax.random.split(jax.random.key(1), 20)
  all_seeds = jax.vmap(lambda key: clustering._kmeans_plus_plus(jnp.asarray(points), 4, key))(keys)
  distinct = 0
  # Uniform sampling would hit 4 distinct blobs with probability 4! / 4^4 < 10%.
  for seeds in np.asarray(all_seeds):
    match = (seeds[:, None] == points[None]).all(-1)
    assert (match.sum(1) >= 1).all()  # every seed is a data point
    distinct += len(set(truth[match.argmax(1)].tolist())) == 4
  assert distinct >= 18


def test_kmeans_vmap_batch_matches_single_runs():
  rng = np.random.default_rng(2)
  images = np.stack([np.where(rng.random((10, 12, 1)) < 0.5, 0.2, 0.8)
                     + rng.normal(0, 0.03, (10, 12, 3)) for _ in range(3)]).astype(np.float32)
  keys = jax.random.split(jax.random.key(3), 3)
  segment = lambda image, key: kmeans_segment(image, 2, key)
  batched = np.asarray(jax.vmap(segment)(images, keys))
  for image, key, labels in zip(images, keys, batched):
    np.testing.assert_array_equal(labels, np.asarray(segment(image, key)))
    assert _same_partition(labels.ravel(), (image[..., 0] > 0.5).ravel().astype(int))


def test_color_position_splits_constant_image_spatially():
  image = np.full((10, 10, 3), 0.4, np.float32)
  rows, cols = np.mgrid[:10, :10]
  for seed in range(3):
    labels = np.asarray(kmeans_segment(image, 2, jax.random.key(seed), mode="color_position"))
    assert labels.shape == (10, 10)
    assert (_same_partition(labels.ravel(), (rows >= 5).ravel().astype(int))
            or _same_partition(labels.ravel(), (cols >= 5).ravel().astype(int)))


def test_pixel_features_layout():
  image = np.random.default_rng(4).random((3, 5, 2)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(pixel_features(image)), image.reshape(15, 2))
  features = np.asarray(pixel_features(image, "color_position", position_weight=2.0))
  rows, cols = np.mgrid[:3, :5]
  expected = np.concatenate([image.reshape(15, 2), 2.0 * rows.reshape(15, 1) / 2,
                             2.0 * cols.reshape(15, 1) / 4], axis=1)
  np.testing.assert_allclose(features, expected, rtol=1e-6)
  assert pixel_features(image[..., 0]).shape == (15, 1)


def test_mean_shift_flat_matches_numpy_and_blobs():
  points, truth = _blobs(5, per_blob=30)
  labels, modes, valid = map(np.asarray, mean_shift(points, 3.0))
  expected_labels, expected_modes = _numpy_mean_shift(points, 3.0, 50)
  assert valid.sum() == 4 and valid[:4].all()
  np.testing.assert_array_equal(labels, expected_labels)
  np.testing.assert_allclose(modes[:4], expected_modes, atol=1e-4)
  assert (modes[4:] == 0).all()
  assert _same_partition(labels, truth)


def test_mean_shift_gaussian_finds_blobs():
  points, truth = _blobs(6, per_blob=30)
  labels, modes, valid = map(np.asarray, mean_shift(points, 1.0, kernel="gaussian"))
  assert valid.sum() == 4
  assert _same_partition(labels, truth)
  blob_means = np.stack([points[truth == b].mean(0) for b in range(4)])
  nearest = ((modes[:4, None] - blob_means[None])**2).sum(-1).min(1)
  assert (np.sqrt(nearest) < 0.3).all()


def test_mean_shift_segment_finds_color_regions_under_vmap():
  rng = np.random.default_rng(7)
  images = np.zeros((2, 9, 12, 3), np.float32)
  images[0, :, 4:8] = images[1, 3:6] = (0.9, 0.1, 0.1)
  images[0, :, 8:] = images[1, 6:] = (0.1, 0.2, 0.9)
  images += rng.normal(0, 0.02, images.shape).astype(np.float32)
  labels = np.asarray(jax.vmap(lambda image: mean_shift_segment(image, 0.3))(images))
  stripes = np.repeat([[0] * 4 + [1] * 4 + [2] * 4], 9, axis=0)
  np.testing.assert_array_equal(labels[0], stripes)
  np.testing.assert_array_equal(labels[1], np.repeat(np.arange(3), 3)[:, None].repeat(12, 1))


def test_bad_input_raises():
  points = np.zeros((5, 2), np.float32)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="k must be"):
    kmeans(points, 0, key)
  with pytest.raises(ValueError, match="k must be"):
    kmeans(points, 6, key)
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    kmeans(np.zeros((2, 3, 4)), 2, key)
  with pytest.raises(ValueError, match="max_iterations"):
    kmeans(points, 2, key, max_iterations=0)
  with pytest.raises(ValueError, match="bandwidth"):
    mean_shift(points, 0.0)
  with pytest.raises(ValueError, match="kernel"):
    mean_shift(points, 1.0, kernel="epanechnikov")
  with pytest.raises(ValueError, match="feature mode"):
    pixel_features(np.zeros((4, 4, 3)), mode="texture")
  with pytest.raises(ValueError, match=r"\[H, W\]"):
    pixel_features(np.zeros((2, 4, 4, 3)))
