"""Tests for graph-based classical segmentation: affinities, normalized cut, minimum cuts."""
import colorsys
import itertools
import math

import jax
import numpy as np
import pytest
import scipy.linalg

from segjax.classical.affinity import affinity_matrix, check_affinity_matrix
from segjax.classical.min_cut import global_min_cut, min_cut_segment, minimum_cut
from segjax.classical.normalized_cut import (ncut_eigenvector, ncut_value, normalized_cut_segment,
                                             normalized_cut_graph, two_way_ncut)

# The motivating example: two blobs (left half 0.2, right half 0.6) whose only links are
# weak ones across the edge between them, plus one pixel (0, 0) of value 0.8 that is
# attached to its blob only very weakly.
_PARAMS = dict(sigma_position=2.0, sigma_feature=0.1, radius=2.0)


def _two_blobs():
  image = np.full((12, 12), 0.2, np.float32)
  image[:, 6:] = 0.6
  image[0, 0] = 0.8
  return image


def _np_ncut(weights, mask):
  weights = np.asarray(weights, np.float64)
  cut = weights[np.ix_(mask, ~mask)].sum()
  degree = weights.sum(axis=1)
  return cut / degree[mask].sum() + cut / degree[~mask].sum()


def _np_cut(weights, mask):
  return np.asarray(weights, np.float64)[np.ix_(mask, ~mask)].sum()


def _random_graph(rng, n, density=0.7):
  upper = np.triu(rng.uniform(0.05, 1.0, (n, n)) * (rng.uniform(size=(n, n)) < density), 1)
  return upper + upper.T


def _loop_affinity(features, shape, sigma_position, sigma_feature, radius):
  height, width = shape
  n = height * width
  expected = np.zeros((n, n))
  for i in range(n):
    for j in range(n):
      (yi, xi), (yj, xj) = divmod(i, width), divmod(j, width)
      dist2 = (yi - yj) ** 2 + (xi - xj) ** 2
      if i != j and math.sqrt(dist2) < radius:
        feat2 = float(np.sum((features[i] - features[j]) ** 2))
        expected[i, j] = (math.exp(-feat2 / (2 * sigma_feature ** 2))
                          * math.exp(-dist2 / (2 * sigma_position ** 2)))
  return expected


def test_affinity_intensity_matches_double_loop():
  rng = np.random.default_rng(0)
  image = rng.uniform(size=(3, 4)).astype(np.float32)
  params = dict(sigma_position=1.5, sigma_feature=0.3, radius=2.5)
  expected = _loop_affinity(image.reshape(-1, 1).astype(np.float64), (3, 4), **params)
  got = jax.jit(lambda im: affinity_matrix(im, **params))(image)
  assert got.shape == (12, 12) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  # A multi-channel image's intensity is its channel mean.
  rgb = rng.uniform(size=(3, 4, 3)).astype(np.float32)
  expected = _loop_affinity(rgb.mean(-1).reshape(-1, 1).astype(np.float64), (3, 4), **params)
  np.testing.assert_allclose(affinity_matrix(rgb, **params), expected, rtol=1e-5, atol=1e-7)


def test_affinity_color_matches_colorsys_hsv_cone():
  rng = np.random.default_rng(1)
  rgb = rng.uniform(size=(3, 3, 3)).astype(np.float32)
  rgb[0, 0] = [0.5, 0.5, 0.5]  # grey: no hue
  rgb[0, 1] = [0.9, 0.9, 0.1]  # tie between the red and green maxima
  features = []
  for r, g, b in rgb.reshape(-1, 3).astype(np.float64):
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    features.append([v, v * s * math.sin(2 * math.pi * h), v * s * math.cos(2 * math.pi * h)])
  params = dict(sigma_position=2.0, sigma_feature=0.25, radius=math.inf)
  expected = _loop_affinity(np.array(features), (3, 3), **params)
  got = affinity_matrix(rgb, features="color", **params)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_global_min_cut_isolates_outlier_but_ncut_separates_blobs():
  image = _two_blobs()
  weights = np.asarray(affinity_matrix(image, **_PARAMS), np.float64)
  outlier = np.zeros(144, bool)
  outlier[0] = True
  left = np.zeros((12, 12), bool)
  left[:, :6] = True
  left = left.ravel()

  value, mask = global_min_cut(weights)
  np.testing.assert_array_equal(mask, outlier)
  np.testing.assert_allclose(value, weights[0].sum(), rtol=1e-12)
  assert value < _np_cut(weights, left)

  labels = normalized_cut_segment(image, 2, **_PARAMS)
  np.testing.assert_array_equal(labels.ravel(), np.where(left, 0, 1))
  # Cutting off one node always costs Ncut >= 1; the blob split is far cheaper.
  assert float(ncut_value(weights, outlier)) >= 1.0
  split, split_ncut = two_way_ncut(weights)
  split = np.asarray(split)
  assert np.array_equal(split, left) or np.array_equal(split, ~left)
  np.testing.assert_allclose(split_ncut, _np_ncut(weights, split), rtol=1e-4)
  np.testing.assert_allclose(jax.jit(ncut_value)(weights, split), _np_ncut(weights, split),
                             rtol=1e-4)
  assert split_ncut < 1e-3


def test_eigenvector_solves_generalized_problem():
  weights = np.asarray(affinity_matrix(_two_blobs(), **_PARAMS), np.float64)
  degree = np.diag(weights.sum(axis=1))
  laplacian = degree - weights
  ref_values, ref_vectors = scipy.linalg.eigh(laplacian, degree)
  eigenvalue, y = jax.jit(ncut_eigenvector)(weights)
  y = np.asarray(y, np.float64)
  np.testing.assert_allclose(eigenvalue, ref_values[1], atol=2e-6)
  residual = laplacian @ y - float(eigenvalue) * degree @ y
  assert np.linalg.norm(residual) < 1e-4 * np.linalg.norm(degree @ y)
  np.testing.assert_allclose(y @ degree @ y, 1.0, rtol=1e-4)
  assert abs(y @ degree @ np.ones(144)) < 1e-4
  ref = ref_vectors[:, 1]
  cosine = (y @ degree @ ref) / np.sqrt((y @ degree @ y) * (ref @ degree @ ref))
  assert abs(cosine) > 1 - 1e-6


def test_two_way_threshold_is_best_over_all_thresholds():
  rng = np.random.default_rng(2)
  for _ in range(3):
    weights = _random_graph(rng, 10)
    _, y = ncut_eigenvector(weights)
    y = np.asarray(y)
    candidates = [y <= t for t in np.unique(y)[:-1]]
    values = [_np_ncut(weights, m) for m in candidates]
    mask, value = two_way_ncut(weights)
    np.testing.assert_allclose(value, min(values), rtol=1e-4)
    np.testing.assert_array_equal(mask, candidates[int(np.argmin(values))])


def test_isolated_node_and_disconnected_components():
  # Two 4-cliques joined by one weak edge, plus node 8 with no edges at all.
  weights = np.zeros((9, 9))
  weights[:4, :4] = weights[4:8, 4:8] = 1.0
  np.fill_diagonal(weights, 0)
  weights[3, 4] = weights[4, 3] = 0.01
  eigenvalue, y = ncut_eigenvector(weights)
  y = np.asarray(y, np.float64)
  assert y[8] == 0
  degree = np.diag(weights.sum(axis=1))
  residual = (degree - weights) @ y - float(eigenvalue) * degree @ y
  assert np.linalg.norm(residual) < 1e-5
  mask, value = two_way_ncut(weights)
  mask = np.asarray(mask)[:8]
  assert np.array_equal(mask, np.arange(8) < 4) or np.array_equal(mask, np.arange(8) >= 4)
  np.testing.assert_allclose(value, 0.01 / 12.01 * 2, rtol=1e-4)
  # Without the weak edge the cliques are separate components: Ncut 0.
  weights[3, 4] = weights[4, 3] = 0
  labels = normalized_cut_graph(weights, 2)
  np.testing.assert_array_equal(labels[:8], np.repeat([0, 1], 4))
  np.testing.assert_allclose(two_way_ncut(weights)[1], 0, atol=1e-7)


def test_recursive_ncut_on_stripes_and_max_ncut():
  image = np.repeat(np.array([0.1, 0.5, 0.9], np.float32), [3, 4, 3])[None, :].repeat(8, 0)
  expected = np.repeat(np.arange(3), [3, 4, 3])[None, :].repeat(8, 0)
  params = dict(sigma_position=2.0, sigma_feature=0.1, radius=2.0)
  labels = normalized_cut_segment(image, 3, **params)
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(labels, expected)
  np.testing.assert_array_equal(normalized_cut_segment(image, 1, **params), np.zeros_like(expected))
  # The first split's Ncut is about 1e-4; a stricter threshold rejects every split.
  np.testing.assert_array_equal(normalized_cut_segment(image, 3, max_ncut=1e-9, **params),
                                np.zeros_like(expected))
  # Restricting the solve to a segment splits that subgraph only.
  weights = affinity_matrix(image, **params)
  segment = (expected > 0).ravel()
  mask, _ = jax.jit(two_way_ncut)(weights, segment)
  mask = np.asarray(mask)
  assert not mask[~segment].any()
  assert np.array_equal(mask, (expected == 1).ravel()) or np.array_equal(
      mask, (expected == 2).ravel())
  graph_labels = normalized_cut_graph(weights, 3)
  np.testing.assert_array_equal(graph_labels, expected.ravel())


def test_min_cut_segment_returns_constant_regions():
  yy, xx = np.mgrid[:10, :10]
  disk = (yy - 4) ** 2 + (xx - 5) ** 2 <= 9
  image = np.where(disk, 0.8, 0.3)
  fg = np.zeros_like(disk)
  fg[4, 5] = True
  bg = np.zeros_like(disk)
  bg[9, 0] = True
  np.testing.assert_array_equal(min_cut_segment(image, fg, bg, sigma=0.1), disk)
  rgb = np.stack([np.where(disk, 0.9, 0.1), np.full(disk.shape, 0.5), np.where(disk, 0.2, 0.7)],
                 axis=-1)
  np.testing.assert_array_equal(min_cut_segment(rgb, fg, bg, sigma=0.1, lambda_=0.5), disk)


def test_min_cut_segment_region_term_claims_unseeded_object():
  image = np.zeros((8, 12))
  image[1:4, 1:4] = 1.0
  image[4:7, 7:11] = 1.0
  fg = np.zeros(image.shape, bool)
  fg[2, 2] = True
  bg = np.zeros(image.shape, bool)
  bg[7, 0] = True
  boundary_only = min_cut_segment(image, fg, bg, sigma=0.1)
  expected = np.zeros(image.shape, bool)
  expected[1:4, 1:4] = True
  np.testing.assert_array_equal(boundary_only, expected)
  with_region = min_cut_segment(image, fg, bg, sigma=0.1, lambda_=1.0)
  np.testing.assert_array_equal(with_region, image > 0.5)


def test_min_cut_segment_minimises_energy_brute_force():
  rng = np.random.default_rng(3)
  image = rng.uniform(size=(3, 3))
  fg = np.zeros((3, 3), bool)
  fg[0, 0] = True
  bg = np.zeros((3, 3), bool)
  bg[2, 2] = True
  sigma, lam, bins = 0.3, 0.4, 4
  # Independent energy: boundary penalties of 4-neighbours with different labels plus
  # lambda * -log of add-one smoothed seed histograms.
  edges = [((r, c), (r, c + 1)) for r in range(3) for c in range(2)]
  edges += [((r, c), (r + 1, c)) for r in range(2) for c in range(3)]
  low, high = image.min(), image.max()
  bin_of = np.minimum(((image - low) / (high - low) * bins).astype(int), bins - 1)

  def cost(seeds):
    counts = np.bincount(bin_of[seeds], minlength=bins)
    return -np.log((counts[bin_of] + 1) / (counts.sum() + bins))

  obj_cost, bkg_cost = cost(fg), cost(bg)

  def energy(mask):
    boundary = sum(math.exp(-(image[p] - image[q]) ** 2 / (2 * sigma ** 2))
                   for p, q in edges if mask[p] != mask[q])
    free = ~(fg | bg)
    region = np.where(mask, obj_cost, bkg_cost)[free].sum()
    return boundary + lam * region

  best = np.inf
  free_pixels = np.flatnonzero(~(fg | bg).ravel())
  for bits in itertools.product([False, True], repeat=free_pixels.size):
    mask = fg.ravel().copy()
    mask[free_pixels] = bits
    best = min(best, energy(mask.reshape(3, 3)))
  got = min_cut_segment(image, fg, bg, sigma=sigma, lambda_=lam, num_bins=bins)
  assert got[0, 0] and not got[2, 2]
  np.testing.assert_allclose(energy(got), best, rtol=1e-6)


def test_minimum_cut_matches_brute_force():
  rng = np.random.default_rng(4)
  weights = _random_graph(rng, 7, density=0.6)
  for source, sink in ((0, 6), ([0, 1], [5, 6]), (3, [0, 2])):
    sources, sinks = np.atleast_1d(source), np.atleast_1d(sink)
    free = [i for i in range(7) if i not in sources and i not in sinks]
    best = np.inf
    for bits in itertools.product([False, True], repeat=len(free)):
      mask = np.zeros(7, bool)
      mask[sources] = True
      mask[free] = bits
      best = min(best, _np_cut(weights, mask))
    value, mask = minimum_cut(weights, source, sink)
    assert mask[sources].all() and not mask[sinks].any()
    np.testing.assert_allclose(value, best, rtol=1e-6)
    np.testing.assert_allclose(value, _np_cut(weights, mask), rtol=1e-12)


def test_global_min_cut_matches_brute_force():
  rng = np.random.default_rng(5)
  for n in (2, 5, 8):
    weights = _random_graph(rng, n, density=0.8)
    best = np.inf
    for bits in itertools.product([False, True], repeat=n - 1):
      mask = np.array((False,) + bits)
      if mask.any():
        best = min(best, _np_cut(weights, mask))
    value, mask = global_min_cut(weights)
    np.testing.assert_allclose(value, best, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_np_cut(weights, mask), value, rtol=1e-12, atol=1e-12)
    assert 0 < mask.sum() <= n // 2


def test_bad_inputs_raise():
  image = np.zeros((4, 4), np.float32)
  seeds = np.zeros((4, 4), bool)
  fg, bg = seeds.copy(), seeds.copy()
  fg[0, 0], bg[3, 3] = True, True
  weights = np.asarray(affinity_matrix(_two_blobs()[:4, :4], **_PARAMS))
  with pytest.raises(ValueError, match="sigma_feature"):
    affinity_matrix(image, sigma_feature=0.0)
  with pytest.raises(ValueError, match="radius"):
    affinity_matrix(image, radius=-1.0)
  with pytest.raises(ValueError, match=r"\[H, W\]"):
    affinity_matrix(np.zeros(5))
  with pytest.raises(ValueError, match="RGB"):
    affinity_matrix(image, features="color")
  with pytest.raises(ValueError, match="features"):
    affinity_matrix(image, features="texture")
  with pytest.raises(ValueError, match="square"):
    check_affinity_matrix(np.ones((3, 4)))
  asymmetric = weights.copy()
  asymmetric[0, 1] += 1.0
  with pytest.raises(ValueError, match="symmetric"):
    normalized_cut_graph(asymmetric)
  with pytest.raises(ValueError, match="negative"):
    minimum_cut(-weights, 0, 1)
  with pytest.raises(ValueError, match="no positive weight"):
    normalized_cut_graph(np.zeros((4, 4)))
  with pytest.raises(ValueError, match="num_segments"):
    normalized_cut_graph(weights, 0)
  with pytest.raises(ValueError, match="one entry per node"):
    ncut_value(weights, np.ones(3, bool))
  with pytest.raises(ValueError, match="at least 2 nodes"):
    two_way_ncut(weights, np.eye(1, 16, dtype=bool)[0])
  with pytest.raises(ValueError, match="share nodes"):
    minimum_cut(weights, [0, 1], [1, 2])
  with pytest.raises(ValueError, match="outside"):
    minimum_cut(weights, 0, 16)
  with pytest.raises(ValueError, match="at least 2 nodes"):
    global_min_cut(np.zeros((1, 1)))
  with pytest.raises(ValueError, match="overlap"):
    min_cut_segment(image, fg, fg | bg)
  with pytest.raises(ValueError, match="no pixel"):
    min_cut_segment(image, fg, seeds)
  with pytest.raises(ValueError, match="image size"):
    min_cut_segment(image, fg[:3], bg)
  with pytest.raises(ValueError, match=r"\[H, W\]"):
    min_cut_segment(np.zeros(16), fg, bg)
  with pytest.raises(ValueError, match="non-finite"):
    min_cut_segment(np.full((4, 4), np.nan), fg, bg)
  with pytest.raises(ValueError, match="sigma"):
    min_cut_segment(image, fg, bg, sigma=0)
  with pytest.raises(ValueError, match="lambda_"):
    min_cut_segment(image, fg, bg, lambda_=-1.0)
