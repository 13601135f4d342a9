"""Gather path of multi-level RoIAlign against the dense path and a numpy port of the C++ loop.

The dense path (`roi_align` per level, then the assigned level selected) is itself checked
against torchvision and the numpy port in tests/ops/test_roi_align.py.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.ops.roi_align import fpn_levels, multilevel_roi_align
from tests.ops.test_roi_align import _bilinear

_LEVELS = (2, 3, 4, 5)
_IMAGE_H, _IMAGE_W = 96, 128  # maps 24x32, 12x16, 6x8, 3x4
_OUT = (3, 4)


def _maps(rng, channels=3, batch=2):
  return [rng.normal(size=(batch, _IMAGE_H >> k, _IMAGE_W >> k, channels)).astype(np.float32)
          for k in _LEVELS]


def _boxes(rng, batch=2):
  """Boxes of all FPN levels: inside, crossing the border, far outside, tiny, degenerate,
  ending on the last row / column, and larger than the image."""
  per_image = []
  for _ in range(batch):
    centers = rng.uniform([-40, -40], [_IMAGE_W + 40, _IMAGE_H + 40], (24, 2))
    sizes = np.exp(rng.uniform(np.log(0.5), np.log(700.0), (24, 2)))
    random = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1)
    fixed = np.array([
        [0.0, 0.0, _IMAGE_W, _IMAGE_H],  # whole image
        [_IMAGE_W - 8.0, _IMAGE_H - 6.0, _IMAGE_W, _IMAGE_H],  # ends on the last row / col
        [_IMAGE_W - 1.0, _IMAGE_H - 1.0, _IMAGE_W + 3.0, _IMAGE_H + 2.0],
        [-300.0, -200.0, -250.0, -150.0],  # entirely outside (samples below -1)
        [_IMAGE_W + 20.0, 10.0, _IMAGE_W + 200.0, 190.0],  # entirely outside, large
        [-10.0, -10.0, 400.0, 300.0],  # P4 / P5, sticking out
        [-200.0, -150.0, 600.0, 500.0],  # P5, far beyond the map
        [-60.0, -50.0, 500.0, 400.0],  # P5, samples on both sides of -1
        [5.0, 7.0, 5.0, 7.0],  # empty
        [30.0, 20.0, 30.3, 20.1],  # tiny
        [60.0, 40.0, 60.0, 90.0],  # zero width
    ])
    per_image.append(np.concatenate([random, fixed]))
  return np.stack(per_image).astype(np.float32)


def _numpy_fixed_ratio(fmap, box, scale, ratio, aligned):
  """torchvision's C++ RoIAlign loop for one RoI with a fixed sampling ratio -> [*_OUT, C]."""
  offset = 0.5 if aligned else 0.0
  x1, y1, x2, y2 = [float(v) * scale - offset for v in box]
  roi_w, roi_h = x2 - x1, y2 - y1
  if not aligned:
    roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
  bin_h, bin_w = roi_h / _OUT[0], roi_w / _OUT[1]
  result = np.zeros(_OUT + fmap.shape[-1:])
  for ph in range(_OUT[0]):
    for pw in range(_OUT[1]):
      for iy in range(ratio):
        for ix in range(ratio):
          y = y1 + ph * bin_h + (iy + 0.5) * bin_h / ratio
          x = x1 + pw * bin_w + (ix + 0.5) * bin_w / ratio
          result[ph, pw] += _bilinear(fmap, y, x) / ratio**2
  return result


@functools.partial(jax.jit, static_argnames=("ratio", "aligned", "method"))
def _pool_and_grad(maps, boxes, cotangent, ratio, aligned, method):
  """Pooled features and the gradient of <pooled, cotangent> w.r.t. every level."""
  pool = functools.partial(multilevel_roi_align, boxes=boxes, output_size=_OUT, levels=_LEVELS,
                           sampling_ratio=ratio, aligned=aligned, method=method)
  pooled, vjp = jax.vjp(pool, maps)
  return pooled, vjp(cotangent.astype(pooled.dtype))[0]


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [1, 2, 3])
def test_gather_equals_dense_values_and_gradients(ratio, aligned):
  rng = np.random.default_rng(10 * ratio + aligned)
  maps = [jnp.asarray(m) for m in _maps(rng)]
  boxes = jnp.asarray(_boxes(rng))
  assert set(np.asarray(fpn_levels(boxes)).ravel().tolist()) == {0, 1, 2, 3}
  cotangent = jnp.asarray(rng.normal(size=boxes.shape[:2] + _OUT + (3,)).astype(np.float32))
  gathered, gather_grads = _pool_and_grad(maps, boxes, cotangent, ratio, aligned, "gather")
  dense, dense_grads = _pool_and_grad(maps, boxes, cotangent, ratio, aligned, "dense")
  assert gathered.shape == dense.shape == boxes.shape[:2] + _OUT + (3,)
  np.testing.assert_allclose(np.asarray(gathered), np.asarray(dense), rtol=1e-5, atol=1e-5)
  # Some RoIs are entirely outside their map: exactly zero, not merely small.
  assert (np.abs(np.asarray(gathered)).max(axis=(2, 3, 4)) == 0).sum() >= 2
  for level, (g, d) in enumerate(zip(gather_grads, dense_grads)):
    assert np.abs(np.asarray(d)).max() > 0, level
    np.testing.assert_allclose(np.asarray(g), np.asarray(d), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aligned", [False, True])
def test_gather_matches_numpy_cpp_loop(aligned):
  rng = np.random.default_rng(20 + aligned)
  maps, boxes = _maps(rng), _boxes(rng)
  cotangent = jnp.zeros(boxes.shape[:2] + _OUT + (3,))
  out, _ = _pool_and_grad([jnp.asarray(m) for m in maps], jnp.asarray(boxes), cotangent, 2,
                          aligned, "gather")
  assigned = np.asarray(fpn_levels(jnp.asarray(boxes)))
  for b in range(boxes.shape[0]):
    for r, box in enumerate(boxes[b]):
      index = assigned[b, r]
      expected = _numpy_fixed_ratio(maps[index][b], box, 2.0**-_LEVELS[index], 2, aligned)
      np.testing.assert_allclose(np.asarray(out[b, r]), expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_accumulates_in_float32():
  rng = np.random.default_rng(30)
  maps = [jnp.asarray(m, jnp.bfloat16) for m in _maps(rng)]
  boxes = jnp.asarray(_boxes(rng))
  cotangent = jnp.asarray(rng.normal(size=boxes.shape[:2] + _OUT + (3,)).astype(np.float32))
  out, grads = _pool_and_grad(maps, boxes, cotangent, 2, True, "gather")
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  # float32 reference on the same (bf16-valued) inputs: the result is its rounding to bf16.
  reference, reference_grads = _pool_and_grad([m.astype(jnp.float32) for m in maps], boxes,
                                              cotangent.astype(jnp.bfloat16).astype(jnp.float32),
                                              2, True, "dense")
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(reference),
                             rtol=2**-8, atol=1e-6)
  for g, r in zip(grads, reference_grads):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r), rtol=2**-8, atol=1e-6)


def test_method_selection_and_errors():
  maps = [jnp.zeros((1, 24 >> k, 32 >> k, 2)) for k in range(4)]
  boxes = jnp.zeros((1, 3, 4))

  def primitives(ratio, method):
    jaxpr = jax.make_jaxpr(lambda m: multilevel_roi_align(m, boxes, 2, sampling_ratio=ratio,
                                                          method=method))(maps)
    return {equation.primitive.name for equation in jaxpr.jaxpr.eqns}

  assert "gather" in primitives(2, "auto") and "dot_general" not in primitives(2, "auto")
  assert "dot_general" in primitives(0, "auto") and "dot_general" in primitives(2, "dense")
  with pytest.raises(ValueError, match="sampling_ratio > 0"):
    multilevel_roi_align(maps, boxes, 2, sampling_ratio=0, method="gather")
  with pytest.raises(ValueError, match="method must be"):
    multilevel_roi_align(maps, boxes, 2, sampling_ratio=2, method="sparse")
  with pytest.raises(ValueError, match="same channel count"):
    multilevel_roi_align(maps[:3] + [jnp.zeros((1, 3, 4, 5))], boxes, 2, sampling_ratio=2)
