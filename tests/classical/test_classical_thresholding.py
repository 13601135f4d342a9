"""Otsu / multi-Otsu thresholds against scikit-image and a numpy brute-force search."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.exposure import histogram
from skimage.filters import threshold_multiotsu, threshold_otsu

from segjax.classical.thresholding import (apply_thresholds, multi_otsu_thresholds,
                                           otsu_threshold, to_gray)

SHAPE = (24, 40)


def _mixture(rng, means, sigma, shape=SHAPE):
  """Float64 image of equal parts of normal intensity modes, shuffled."""
  size = int(np.prod(shape))
  parts = np.array_split(np.arange(size), len(means))
  values = np.concatenate([rng.normal(m, sigma, len(p)) for m, p in zip(means, parts)])
  return rng.permutation(values).reshape(shape)


def _images(seed):
  """A uniform, a bimodal and a skewed bimodal float64 image in roughly [0, 1]."""
  rng = np.random.default_rng(seed)
  skewed = np.where(rng.random(SHAPE) < 0.8, rng.normal(0.25, 0.1, SHAPE),
                    rng.normal(0.75, 0.05, SHAPE))
  return [rng.random(SHAPE), _mixture(rng, (0.3, 0.7), 0.1), skewed]


def _to_uint8(image):
  return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def _between_class_variance(counts, centres, indices):
  """Float64 sum_k w_k (mu_k - mu)^2 for thresholds at the given bin indices."""
  counts = counts.astype(np.float64)
  mean = np.sum(counts * centres) / counts.sum()
  edges = [0, *[i + 1 for i in indices], len(counts)]
  total = 0.0
  for lo, hi in zip(edges[:-1], edges[1:]):
    weight = counts[lo:hi].sum()
    if weight > 0:
      total += weight * (np.sum(counts[lo:hi] * centres[lo:hi]) / weight - mean)**2
  return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_otsu_uint8_equals_skimage(seed):
  for image in map(_to_uint8, _images(seed)):
    assert float(otsu_threshold(image)) == float(threshold_otsu(image))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_otsu_float_matches_skimage(seed):
  for image in _images(seed):
    for dtype in (np.float32, np.float64):
      typed = image.astype(dtype)
      # Bin edges agree with numpy's to one float32 ulp (XLA may fuse the multiply-add).
      np.testing.assert_allclose(float(otsu_threshold(typed)), threshold_otsu(typed),
                                 rtol=2e-7, atol=1e-7)


def test_otsu_bins_and_int8():
  image = _images(3)[1].astype(np.float32)
  np.testing.assert_allclose(float(otsu_threshold(image, bins=64)),
                             threshold_otsu(image, nbins=64), rtol=2e-7)
  signed = np.clip(np.round(_images(4)[2] * 200 - 100), -128, 127).astype(np.int8)
  assert float(otsu_threshold(signed)) == float(threshold_otsu(signed))


def test_otsu_separates_two_levels_and_constant_image():
  image = np.full(SHAPE, 40, np.uint8)
  image[:, 20:] = 200
  threshold = otsu_threshold(image)
  assert float(threshold) == 40.0  # the first bin of the empty run between the levels
  np.testing.assert_array_equal(np.asarray(image > threshold), image == 200)
  np.testing.assert_array_equal(np.asarray(apply_thresholds(image, threshold[None])),
                                image == 200)
  assert float(otsu_threshold(np.full(SHAPE, 7, np.uint8))) == 7.0
  assert float(otsu_threshold(np.full(SHAPE, 0.25, np.float32))) == 0.25


def test_otsu_vmap_matches_single_images():
  batch = np.stack([_to_uint8(image) for image in _images(5)])
  batched = np.asarray(jax.vmap(otsu_threshold)(batch))
  np.testing.assert_array_equal(batched, [float(threshold_otsu(image)) for image in batch])


def test_multi_otsu_trimodal_equals_skimage():
  rng = np.random.default_rng(6)
  image = _mixture(rng, (0.2, 0.5, 0.8), 0.06)
  as_uint8 = _to_uint8(image)
  np.testing.assert_array_equal(np.asarray(multi_otsu_thresholds(as_uint8, classes=3)),
                                threshold_multiotsu(as_uint8, classes=3))
  as_float = image.astype(np.float32)
  np.testing.assert_allclose(np.asarray(multi_otsu_thresholds(as_float, classes=3)),
                             threshold_multiotsu(as_float, classes=3), rtol=2e-7)


@pytest.mark.parametrize("seed", [7, 8])
def test_multi_otsu_at_least_as_good_as_skimage(seed):
  """skimage searches in float32 and may settle on a near-tie; ours is never worse in float64."""
  images = [_to_uint8(image) for image in _images(seed)]
  # Uniform noise where skimage's pick is 3.7e-7 (relative) below the float64 optimum.
  rng = np.random.default_rng(63)
  images.append((rng.random(tuple(rng.integers(8, 64, 2))) * 255).astype(np.uint8))
  for image in images:
    counts, centres = histogram(image)
    ours = np.asarray(multi_otsu_thresholds(image, classes=3)).astype(int) - centres[0]
    theirs = threshold_multiotsu(image, classes=3) - centres[0]
    gain = (_between_class_variance(counts, centres, ours)
            - _between_class_variance(counts, centres, theirs))
    assert gain >= -1e-6 * _between_class_variance(counts, centres, theirs)
    if gain <= 0:
      np.testing.assert_array_equal(ours, theirs)


def test_multi_otsu_four_classes_equals_brute_force():
  rng = np.random.default_rng(9)
  image = np.clip(np.round(_mixture(rng, (5, 14, 24, 33), 2.5)), 0, 38).astype(np.uint8)
  counts, centres = histogram(image)
  best = max(itertools.combinations(range(len(counts) - 1), 3),
             key=lambda idx: _between_class_variance(counts, centres, idx))
  np.testing.assert_array_equal(np.asarray(multi_otsu_thresholds(image, classes=4)),
                                centres[list(best)])


def test_multi_otsu_too_few_values_is_nan():
  image = np.zeros(SHAPE, np.uint8)
  image[:, 10:] = 90
  assert np.isnan(np.asarray(multi_otsu_thresholds(image, classes=3))).all()
  assert not np.isnan(np.asarray(multi_otsu_thresholds(image, classes=2))).any()


def test_apply_thresholds_equals_right_closed_digitize():
  rng = np.random.default_rng(10)
  image = rng.integers(0, 256, SHAPE).astype(np.uint8)
  thresholds = np.array([50.0, 120.0, 121.0, 200.0], np.float32)
  np.testing.assert_array_equal(np.asarray(apply_thresholds(image, thresholds)),
                                np.digitize(image, thresholds, right=True))
  floats = rng.random((3, 5, 7)).astype(np.float32)
  edges = np.sort(rng.random(2)).astype(np.float32)
  labels = apply_thresholds(floats, edges)
  assert labels.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(labels), np.digitize(floats, edges, right=True))


def test_to_gray_uses_bt601_weights():
  rgb = np.random.default_rng(11).random((4, 5, 3)).astype(np.float32)
  expected = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
  np.testing.assert_allclose(np.asarray(to_gray(rgb)), expected, rtol=1e-6)


def test_bad_input_raises():
  with pytest.raises(ValueError, match="grayscale"):
    otsu_threshold(np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(ValueError, match="bins"):
    otsu_threshold(np.zeros((4, 4), np.float32), bins=1)
  with pytest.raises(ValueError, match="classes"):
    multi_otsu_thresholds(np.zeros((4, 4), np.float32), classes=1)
  with pytest.raises(ValueError, match="RGB"):
    to_gray(np.zeros((4, 4, 2)))
  with pytest.raises(ValueError, match="1-D"):
    apply_thresholds(np.zeros((4, 4)), np.zeros((2, 2)))
