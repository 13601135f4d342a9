"""Dense CRF: exact and windowed mean field against a numpy double loop, and refinement quality."""
import functools

import jax
import numpy as np
import pytest
from scipy import ndimage

from segjax.classical.crf import crf_refine_labels, dense_crf

SMALL = dict(gaussian_sxy=1.5, bilateral_sxy=3.0, bilateral_srgb=40.0)


def numpy_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def numpy_crf(logits, image, num_iterations, gaussian_sxy, gaussian_weight, bilateral_sxy,
              bilateral_srgb, bilateral_weight, normalization, window=None, stride=1):
  """Mean field on one [H, W, K] image with the Potts energy written out, in float64.

  Kernels by a double loop over pixel pairs; with a window, the smoothness kernel is cut to
  |dy|, |dx| <= window * stride and the appearance kernel to senders whose stride-cell is within
  `window` cells of the receiver's, the sender taking its cell's mean position and colour.
  """
  h, w, k = logits.shape
  image = image.astype(np.float64)
  n = h * w
  coords = [(y, x) for y in range(h) for x in range(w)]
  cell_mean = {}
  for y, x in coords:
    cell = (y // stride, x // stride)
    cell_mean.setdefault(cell, []).append((y, x, *image[y, x]))
  cell_mean = {cell: np.mean(v, axis=0) for cell, v in cell_mean.items()}
  smooth = np.zeros((n, n))
  appearance = np.zeros((n, n))
  for i, (yi, xi) in enumerate(coords):
    for j, (yj, xj) in enumerate(coords):
      if i == j:
        continue
      if window is None or max(abs(yi - yj), abs(xi - xj)) <= window * stride:
        smooth[i, j] = np.exp(-((yi - yj) ** 2 + (xi - xj) ** 2) / (2 * gaussian_sxy ** 2))
      ci, cj = (yi // stride, xi // stride), (yj // stride, xj // stride)
      if window is None or max(abs(ci[0] - cj[0]), abs(ci[1] - cj[1])) <= window:
        mean = cell_mean[cj]
        dpos = (yi - mean[0]) ** 2 + (xi - mean[1]) ** 2
        dcol = np.sum((image[yi, xi] - mean[2:]) ** 2)
        appearance[i, j] = np.exp(-dpos / (2 * bilateral_sxy ** 2)
                                  - dcol / (2 * bilateral_srgb ** 2))
  kernels = []
  for weight, kern in ((gaussian_weight, smooth), (bilateral_weight, appearance)):
    if normalization == "symmetric":
      d = kern.sum(1)
      kern = kern / np.sqrt(np.outer(d, d))
    kernels.append((weight, kern))
  unary = logits.reshape(n, k).astype(np.float64)
  q = numpy_softmax(unary)
  for _ in range(num_iterations):
    energy = sum(weight * kern @ (1.0 - q) for weight, kern in kernels)
    q = numpy_softmax(unary - energy)
  return q.reshape(h, w, k)


def random_inputs(seed, shape, classes=3):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 1.5, shape + (classes,)).astype(np.float32)
  image = rng.uniform(0, 255, shape + (3,)).astype(np.float32)
  image[:, : shape[1] // 2] *= 0.3  # two colour populations, so the kernel is not flat
  return logits, image


@pytest.mark.parametrize("normalization,weights,iterations", [
    ("symmetric", dict(gaussian_weight=3.0, bilateral_weight=5.0), 1),
    ("symmetric", dict(gaussian_weight=3.0, bilateral_weight=5.0), 3),
    ("none", dict(gaussian_weight=0.4, bilateral_weight=0.3), 2),
])
def test_exact_matches_numpy_double_loop(normalization, weights, iterations):
  logits, image = random_inputs(0, (2, 6, 7))
  params = dict(SMALL, **weights)
  got = np.asarray(dense_crf(logits, image, num_iterations=iterations,
                             normalization=normalization, **params))
  want = np.stack([numpy_crf(l, i, iterations, normalization=normalization, **params)
                   for l, i in zip(logits, image)])
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert np.abs(want - numpy_softmax(logits)).max() > 0.1  # the messages matter


@pytest.mark.parametrize("window,stride", [(2, 1), (1, 2), (1, 3)])
def test_windowed_matches_numpy_double_loop(window, stride):
  logits, image = random_inputs(1, (1, 7, 10))
  params = dict(SMALL, gaussian_weight=3.0, bilateral_weight=5.0)
  got = np.asarray(dense_crf(logits, image, num_iterations=2, window=window, stride=stride,
                             **params))
  want = numpy_crf(logits[0], image[0], 2, normalization="symmetric", window=window,
                   stride=stride, **params)
  np.testing.assert_allclose(got[0], want, atol=2e-5)


@pytest.mark.parametrize("normalization", ["symmetric", "none"])
def test_window_covering_image_equals_exact(normalization):
  logits, image = random_inputs(2, (2, 9, 11), classes=4)
  params = dict(num_iterations=3, normalization=normalization, gaussian_sxy=2.0,
                bilateral_sxy=6.0, bilateral_srgb=30.0)
  if normalization == "none":
    params.update(gaussian_weight=0.3, bilateral_weight=0.2)
  exact = np.asarray(dense_crf(logits, image, **params))
  windowed = np.asarray(dense_crf(logits, image, window=10, **params))
  np.testing.assert_allclose(windowed, exact, atol=1e-5)
  assert np.abs(exact - numpy_softmax(logits)).max() > 0.1


def test_zero_iterations_is_softmax():
  logits, image = random_inputs(3, (2, 5, 6))
  np.testing.assert_allclose(np.asarray(dense_crf(logits, image, num_iterations=0)),
                             numpy_softmax(logits), atol=1e-6)


def synthetic_scenes(size=48, seeds=(0, 1, 2)):
  """Three flat noisy colour regions (background, disk, wedge) and blurred noisy logits."""
  yy, xx = np.mgrid[:size, :size]
  labels = np.zeros((size, size), np.int64)
  labels[(yy - 20) ** 2 + (xx - 18) ** 2 < 11 ** 2] = 1
  labels[(xx + 0.6 * yy > 52) & (yy > 26)] = 2
  colours = np.array([[60, 70, 180], [200, 60, 50], [70, 190, 80]], np.float64)
  onehot = np.eye(3)[labels]
  blurred = np.stack([ndimage.gaussian_filter(onehot[..., c], 4.0) for c in range(3)], -1)
  images, logits = [], []
  for seed in seeds:
    rng = np.random.default_rng(seed)
    images.append(np.clip(colours[labels] + rng.normal(0, 10, (size, size, 3)), 0, 255))
    logits.append(4.0 * blurred + rng.normal(0, 0.3, blurred.shape))
  edge = np.zeros((size, size), bool)
  edge[:-1] |= labels[:-1] != labels[1:]
  edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
  band = ndimage.distance_transform_edt(~edge) <= 3
  return (labels, band, np.stack(images).astype(np.float32),
          np.stack(logits).astype(np.float32))


@pytest.mark.parametrize("approximation", [dict(), dict(window=6, stride=4)])
def test_crf_sharpens_blurred_logits(approximation):
  labels, band, images, logits = synthetic_scenes()
  before = logits.argmax(-1) == labels
  after = np.asarray(crf_refine_labels(logits, images, **approximation)) == labels
  assert before[:, band].mean() < 0.93  # the blur really damages the boundaries
  assert after[:, band].mean() >= before[:, band].mean() + 0.05
  assert after.mean() > before.mean()
  assert after.mean() >= 0.99


def test_batch_jit_and_labels():
  logits, image = random_inputs(4, (3, 10, 13))
  crf = functools.partial(dense_crf, num_iterations=3, window=2, stride=2, **SMALL)
  batched = np.asarray(jax.jit(crf)(logits, image))
  singles = np.concatenate([np.asarray(crf(logits[i:i + 1], image[i:i + 1])) for i in range(3)])
  np.testing.assert_allclose(batched, singles, atol=1e-6)
  labels = crf_refine_labels(logits, image, num_iterations=3, window=2, stride=2, **SMALL)
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(np.asarray(labels), batched.argmax(-1))


@pytest.mark.parametrize("logit_shape,image_shape,kwargs,match", [
    ((6, 7, 3), (6, 7, 3), {}, "logits must be"),
    ((1, 6, 7, 3), (1, 6, 7), {}, "image must be"),
    ((1, 6, 7, 3), (1, 6, 8, 3), {}, "must share batch, height and width"),
    ((2, 6, 7, 3), (1, 6, 7, 3), {}, "must share batch, height and width"),
    ((1, 6, 7, 3), (1, 6, 7, 3), dict(num_iterations=-1), "num_iterations"),
    ((1, 6, 7, 3), (1, 6, 7, 3), dict(gaussian_sxy=0.0), "gaussian_sxy"),
    ((1, 6, 7, 3), (1, 6, 7, 3), dict(bilateral_srgb=-1.0), "bilateral_srgb"),
    ((1, 6, 7, 3), (1, 6, 7, 3), dict(bilateral_sxy=float("nan")), "bilateral_sxy"),
    ((1, 6, 7, 3), (1, 6, 7, 3), dict(bilateral_weight=-1.0), "bilateral_weight"),
    ((1, 6, 7, 3), (1, 6, 7, 3), dict(window=0), "window"),
    ((1, 6, 7, 3), (1, 6, 7, 3), dict(stride=2), "set window"),
    ((1, 6, 7, 3), (1, 6, 7, 3), dict(normalization="after"), "normalization"),
    ((1, 129, 128, 2), (1, 129, 128, 3), {}, "MAX_DENSE_PIXELS"),
])
def test_bad_arguments(logit_shape, image_shape, kwargs, match):
  with pytest.raises(ValueError, match=match):
    dense_crf(np.zeros(logit_shape, np.float32), np.zeros(image_shape, np.float32), **kwargs)
