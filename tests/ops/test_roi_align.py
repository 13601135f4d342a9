"""RoIAlign in three parts: segjax's RoIAlign / RoIPool / multi-level RoIAlign against
detectron2's vectors, torchvision and numpy; the gather path of multi-level RoIAlign against the
dense path and a numpy port of the C++ loop; and the lean torch RoIAlign the other tests use as
a reference (`tests.torch_reference.lean_roi_align`) against torchvision's own.

torchvision's compiled kernels do not load here; its pure-Python `_roi_align` (unwrapped from
its lazy torch.compile) is the torch reference. That Python version omits the C++ kernel's
"samples beyond [-1, H] contribute 0" rule and caps the adaptive grid at the map size, so boxes
reaching far outside the map or larger than it are checked against a numpy port of the C++
loop written here instead; the lean reference is checked against `_roi_align` with that rule
put back, for values and input gradients. The boxes cover several images, boxes partly and
wholly outside the map, boxes under one cell and the usual ones.
"""
import functools
import importlib
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.ops.roi_align import fpn_levels, multilevel_roi_align, roi_align, roi_pool
from tests import torch_reference
from tests.torch_reference import import_torchvision, lean_roi_align

# One compilation per configuration instead of one per primitive, to keep the file fast.
_roi_align = jax.jit(roi_align, static_argnums=(2, 3, 4, 5, 6))


def _torch_roi_align():
  """torchvision.ops.roi_align._roi_align without its torch.compile wrapper, and torch."""
  import_torchvision()
  import torch
  module = sys.modules["torchvision.ops.roi_align"]
  return module._roi_align.__wrapped__, torch


def _bilinear(fmap, y, x):
  """One sample of torchvision's C++ bilinear_interpolate; fmap [H, W, C]."""
  height, width = fmap.shape[:2]
  if y < -1.0 or y > height or x < -1.0 or x > width:
    return np.zeros(fmap.shape[-1])
  y, x = max(y, 0.0), max(x, 0.0)
  y_low, x_low = int(y), int(x)
  if y_low >= height - 1:
    y_low = y_high = height - 1
    y = float(y_low)
  else:
    y_high = y_low + 1
  if x_low >= width - 1:
    x_low = x_high = width - 1
    x = float(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1.0 - ly, 1.0 - lx
  return (hy * hx * fmap[y_low, x_low] + hy * lx * fmap[y_low, x_high]
          + ly * hx * fmap[y_high, x_low] + ly * lx * fmap[y_high, x_high])


def _numpy_roi_align(fmap, box, out, scale, ratio, aligned):
  """torchvision's C++ RoIAlign forward for one RoI; fmap [H, W, C] -> [out, out, C]."""
  offset = 0.5 if aligned else 0.0
  x1, y1, x2, y2 = [v * scale - offset for v in box]
  roi_w, roi_h = x2 - x1, y2 - y1
  if not aligned:
    roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
  bin_h, bin_w = roi_h / out, roi_w / out
  grid_h = ratio if ratio > 0 else math.ceil(roi_h / out)
  grid_w = ratio if ratio > 0 else math.ceil(roi_w / out)
  count = max(grid_h * grid_w, 1)
  result = np.zeros((out, out, fmap.shape[-1]))
  for ph in range(out):
    for pw in range(out):
      for iy in range(grid_h):
        y = y1 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
        for ix in range(grid_w):
          x = x1 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
          result[ph, pw] += _bilinear(fmap, y, x)
  return result / count


def _numpy_roi_pool(fmap, box, out_h, out_w, scale):
  """torchvision's C++ RoIPool forward for one RoI; fmap [H, W, C] -> [out_h, out_w, C]."""
  height, width = fmap.shape[:2]
  x1, y1, x2, y2 = [int(math.floor(abs(v * scale) + 0.5) * np.sign(v)) for v in box]
  # float32 bin sizes as in the C++ kernel (exact bin edges for these small sizes).
  bin_h = np.float32(max(y2 - y1 + 1, 1)) / np.float32(out_h)
  bin_w = np.float32(max(x2 - x1 + 1, 1)) / np.float32(out_w)
  result = np.zeros((out_h, out_w, fmap.shape[-1]))
  for ph in range(out_h):
    hs = min(max(int(math.floor(ph * bin_h)) + y1, 0), height)
    he = min(max(int(math.ceil((ph + 1) * bin_h)) + y1, 0), height)
    for pw in range(out_w):
      ws = min(max(int(math.floor(pw * bin_w)) + x1, 0), width)
      we = min(max(int(math.ceil((pw + 1) * bin_w)) + x1, 0), width)
      if he > hs and we > ws:
        result[ph, pw] = fmap[hs:he, ws:we].reshape(-1, fmap.shape[-1]).max(0)
  return result


def _random_boxes(rng, num, size, low=0.0, high=None):
  """[num, 4] boxes with corners in [low, high] (image coords), x1 < x2 and y1 < y2."""
  high = size if high is None else high
  corners = rng.uniform(low, high, (num, 2, 2))
  corners.sort(axis=1)
  return np.concatenate([corners[:, 0], corners[:, 1]], axis=1).astype(np.float32)


def _boxes_set(rng, image):
  """Inside, border-crossing, tiny, large and degenerate boxes in image coordinates."""
  return np.concatenate([
      _random_boxes(rng, 6, image),
      _random_boxes(rng, 4, image, -0.3 * image, 1.3 * image),
      np.array([[3.0, 4.0, 3.5, 4.2], [0.0, 0.0, image, image], [5.0, 5.0, 5.0, 9.0],
                [image - 2.0, 1.0, image + 1.0, image]], np.float32),
  ])


@pytest.mark.parametrize("aligned,expected_first,expected_last", [
    (False, [7.5, 8, 8.5, 9], [15, 15.5, 16, 16.5]),
    (True, [4.5, 5, 5.5, 6], [12, 12.5, 13, 13.5]),
])
def test_detectron2_vectors(aligned, expected_first, expected_last):
  features = jnp.arange(25.0).reshape(1, 5, 5, 1)
  out = np.asarray(roi_align(features, jnp.array([[[1.0, 1, 3, 3]]]), 4, aligned=aligned))
  out = out[0, 0, :, :, 0]
  np.testing.assert_allclose(out[0], expected_first)
  np.testing.assert_allclose(out[-1], expected_last)
  np.testing.assert_allclose(out[:, 0], np.array(expected_first[0]) + [0, 2.5, 5, 7.5])


@pytest.mark.parametrize("scale,image", [(1.0, 12), (0.25, 48), (1 / 32, 384)])
@pytest.mark.parametrize("aligned", [False, True])
def test_matches_torchvision(scale, image, aligned):
  tv_roi_align, torch = _torch_roi_align()
  rng = np.random.default_rng(int(image + 10 * aligned))
  size = int(image * scale)
  features = rng.normal(size=(2, size, size + 2, 3)).astype(np.float32)
  # Within torchvision's Python domain: samples inside [-1, H] and RoIs no larger than the map.
  boxes = np.stack([_random_boxes(rng, 7, image, -0.5 / scale, image) for _ in range(2)])
  boxes[0, 0] = [0.0, 0.0, image, image]
  boxes[1, 0] = [2.0 / scale, 1.0 / scale, 2.2 / scale, 1.1 / scale]
  rois = torch.from_numpy(np.concatenate(
      [np.repeat(np.arange(2.0), 7)[:, None], boxes.reshape(-1, 4)], 1).astype(np.float32))
  torch_features = torch.from_numpy(features).permute(0, 3, 1, 2)
  for ratio in range(4):
    expected = tv_roi_align(torch_features, rois, scale, 3, 4, ratio, aligned)
    expected = expected.permute(0, 2, 3, 1).numpy().reshape(2, 7, 3, 4, 3)
    out = _roi_align(jnp.asarray(features), jnp.asarray(boxes), (3, 4), scale, ratio, aligned)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aligned", [False, True])
def test_matches_cpp_semantics_outside_map(aligned):
  rng = np.random.default_rng(3)
  features = rng.normal(size=(1, 10, 10, 2)).astype(np.float32)
  boxes = _boxes_set(rng, 40)[None]  # up to 16 px on the 10 px map: max_sampling 8 is exact
  for ratio in (0, 2):
    out = np.asarray(_roi_align(jnp.asarray(features), jnp.asarray(boxes), 3, 0.25, ratio,
                                aligned, 8))
    expected = np.stack([_numpy_roi_align(features[0], b, 3, 0.25, ratio, aligned)
                         for b in boxes[0]])
    np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-5)


def test_boxes_larger_than_map_need_max_sampling():
  rng = np.random.default_rng(4)
  features = rng.normal(size=(1, 6, 6, 2)).astype(np.float32)
  boxes = np.array([[[-10.0, -8.0, 30.0, 25.0], [1.0, 0.0, 5.0, 16.0]]], np.float32)
  expected = np.stack([_numpy_roi_align(features[0], b, 2, 1.0, 0, True) for b in boxes[0]])
  exact = roi_align(jnp.asarray(features), jnp.asarray(boxes), 2, max_sampling=20)
  np.testing.assert_allclose(np.asarray(exact)[0], expected, rtol=1e-5, atol=1e-6)
  # The default bound (ceil(6 / 2) = 3) spreads 3 samples per bin over the too-large RoIs.
  bounded = roi_align(jnp.asarray(features), jnp.asarray(boxes), 2)
  clipped = [_numpy_roi_align(features[0], b, 2, 1.0, 3, True) for b in boxes[0]]
  np.testing.assert_allclose(np.asarray(bounded)[0, 0], clipped[0], rtol=1e-5, atol=1e-6)


def test_gradient_matches_torch_autograd():
  tv_roi_align, torch = _torch_roi_align()
  rng = np.random.default_rng(5)
  features = rng.normal(size=(1, 8, 9, 2)).astype(np.float32)
  boxes = _random_boxes(rng, 5, 32, -2.0, 34.0)[None]
  cotangent = rng.normal(size=(1, 5, 2, 3, 2)).astype(np.float32)
  for ratio, aligned in [(0, True), (2, False)]:
    torch_features = torch.from_numpy(features).permute(0, 3, 1, 2).requires_grad_(True)
    rois = torch.from_numpy(np.concatenate([np.zeros((5, 1)), boxes[0]], 1).astype(np.float32))
    out = tv_roi_align(torch_features, rois, 0.25, 2, 3, ratio, aligned)
    (out * torch.from_numpy(cotangent[0]).permute(0, 3, 1, 2)).sum().backward()
    expected = torch_features.grad.permute(0, 2, 3, 1).numpy()

    def loss(f, ratio=ratio, aligned=aligned):
      pooled = roi_align(f, jnp.asarray(boxes), (2, 3), 0.25, ratio, aligned)
      return jnp.sum(pooled * cotangent)

    grad = jax.jit(jax.grad(loss))(jnp.asarray(features))
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-5)


def test_roi_pool_matches_numpy():
  rng = np.random.default_rng(6)
  features = rng.normal(size=(2, 9, 11, 3)).astype(np.float32)
  boxes = np.stack([_boxes_set(rng, 36) for _ in range(2)])
  boxes[0, 0] = [2.0, 6.0, 10.0, 14.0]  # corners at x.5 after scaling: rounding of halves
  out = np.asarray(roi_pool(jnp.asarray(features), jnp.asarray(boxes), (3, 2), 0.25))
  for b in range(2):
    for r, box in enumerate(boxes[b]):
      np.testing.assert_allclose(out[b, r], _numpy_roi_pool(features[b], box, 3, 2, 0.25))
  assert (out == 0).all(axis=(-3, -2, -1)).any()  # a RoI entirely outside the map


def test_fpn_levels_match_formula_and_torchvision():
  import_torchvision()
  import torch
  from torchvision.ops.poolers import LevelMapper
  rng = np.random.default_rng(7)
  boxes = _random_boxes(rng, 200, 800)
  boxes = np.concatenate([boxes, [[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 448, 448],
                                  [10, 10, 11, 11], [0, 0, 800, 800]]]).astype(np.float32)
  levels = np.asarray(fpn_levels(jnp.asarray(boxes)))
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  formula = np.clip(np.floor(4 + np.log2(np.sqrt(area) / 224) + 1e-6), 2, 5) - 2
  np.testing.assert_array_equal(levels, formula)
  mapper = LevelMapper(2, 5)
  np.testing.assert_array_equal(levels, mapper([torch.from_numpy(boxes)]).numpy())
  np.testing.assert_array_equal(levels[-5:], [2, 1, 3, 0, 3])
  assert set(levels.tolist()) == {0, 1, 2, 3}


def test_multilevel_equals_pooling_assigned_level():
  rng = np.random.default_rng(8)
  image = 256
  maps = [jnp.asarray(rng.normal(size=(2, image >> k, image >> k, 2)).astype(np.float32))
          for k in (2, 3, 4, 5)]
  boxes = np.stack([np.concatenate([_random_boxes(rng, 10, image),
                                    [[10, 10, 30, 40], [0, 0, 250, 250]]]) for _ in range(2)])
  boxes = jnp.asarray(boxes.astype(np.float32))
  out = np.asarray(jax.jit(lambda m, b: multilevel_roi_align(m, b, 3))(maps, boxes))
  assigned = np.asarray(fpn_levels(boxes))
  assert len(set(assigned.ravel().tolist())) >= 3
  for index, level in enumerate((2, 3, 4, 5)):
    direct = np.asarray(_roi_align(maps[index], boxes, 3, 2.0**-level, 0, True, None))
    np.testing.assert_allclose(out[assigned == index], direct[assigned == index], rtol=1e-6)


def test_jit_vmap_and_sharding():
  rng = np.random.default_rng(9)
  features = jnp.asarray(rng.normal(size=(8, 6, 7, 2)).astype(np.float32))
  boxes = jnp.asarray(np.stack([_random_boxes(rng, 3, 24) for _ in range(8)]))
  eager = _roi_align(features, boxes, 2, 0.25, 0, True, None)
  expected = [_numpy_roi_align(np.asarray(features[0]), b, 2, 0.25, 0, True) for b in boxes[0]]
  np.testing.assert_allclose(np.asarray(eager[0]), np.stack(expected), rtol=1e-5, atol=1e-6)
  mapped = jax.jit(jax.vmap(lambda f, b: roi_align(f[None], b[None], 2, 0.25)[0]))(features,
                                                                                   boxes)
  np.testing.assert_allclose(np.asarray(mapped), np.asarray(eager), rtol=1e-6, atol=1e-6)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  sharded = jax.jit(lambda f, b: roi_align(f, b, 2, 0.25))(
      jax.device_put(features, spec), jax.device_put(boxes, spec))
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(eager), rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="NHWC"):
    roi_align(jnp.zeros((4, 4, 1)), jnp.zeros((1, 1, 4)), 2)
  with pytest.raises(ValueError, match="boxes must be"):
    roi_align(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 4)), 2)
  with pytest.raises(ValueError, match="output_size"):
    roi_align(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 1, 4)), 0)
  with pytest.raises(ValueError, match="one map per level"):
    multilevel_roi_align([jnp.zeros((1, 4, 4, 1))], jnp.zeros((1, 1, 4)), 2)


# --- Gather path of multi-level RoIAlign, against the dense path and the C++ loop ---

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


# --- tests.torch_reference.lean_roi_align, the other tests' reference, against torchvision ---

MAP = 12  # feature map side, cells
POOLED = (3, 2)  # output bins (PH, PW)


def _python_roi_align(torch):
  """torchvision's `_roi_align` with the C++ kernel's out-of-map rule, as roi_align's signature."""
  import_torchvision()
  module = importlib.import_module("torchvision.ops.roi_align")  # the module, not the function
  interpolate = module._bilinear_interpolate

  def bilinear_interpolate(features, batch_index, y, x, ymask, xmask):
    height, width = features.shape[-2:]
    inside_y = (y >= -1) & (y <= height)  # [K, PH, IY]
    inside_x = (x >= -1) & (x <= width)  # [K, PW, IX]
    inside = inside_y[:, None, :, None, :, None] & inside_x[:, None, None, :, None, :]
    return torch.where(inside, interpolate(features, batch_index, y, x, ymask, xmask), 0)

  def roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned):
    module._bilinear_interpolate = bilinear_interpolate
    try:
      return module._roi_align.__wrapped__(features, rois, spatial_scale, *output_size,
                                           sampling_ratio, aligned)
    finally:
      module._bilinear_interpolate = interpolate
  return roi_align


def _kernel_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned):
  """torchvision's C++ RoIAlign forward, one sample at a time (numpy, float64)."""
  _, channels, height, width = features.shape
  pooled_h, pooled_w = output_size

  def bilinear(image, y, x):
    if y < -1 or y > height or x < -1 or x > width:
      return np.zeros(channels)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= height - 1:
      y0 = y1 = height - 1
      y = float(y0)
    else:
      y1 = y0 + 1
    if x0 >= width - 1:
      x0 = x1 = width - 1
      x = float(x0)
    else:
      x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * image[:, y0, x0] + (1 - ly) * lx * image[:, y0, x1]
            + ly * (1 - lx) * image[:, y1, x0] + ly * lx * image[:, y1, x1])

  out = np.zeros((len(rois), channels, pooled_h, pooled_w))
  offset = 0.5 if aligned else 0.0
  for k, (b, *box) in enumerate(rois):
    x1, y1, x2, y2 = (v * spatial_scale - offset for v in box)
    roi_h, roi_w = y2 - y1, x2 - x1
    if not aligned:
      roi_h, roi_w = max(roi_h, 1.0), max(roi_w, 1.0)
    bin_h, bin_w = roi_h / pooled_h, roi_w / pooled_w
    grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / pooled_h)
    grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pooled_w)
    for i in range(pooled_h):
      for j in range(pooled_w):
        total = np.zeros(channels)
        for iy in range(grid_h):
          for ix in range(grid_w):
            total += bilinear(features[int(b)], y1 + i * bin_h + (iy + 0.5) * bin_h / grid_h,
                              x1 + j * bin_w + (ix + 0.5) * bin_w / grid_w)
        out[k, :, i, j] = total / max(grid_h * grid_w, 1)
  return out


def _inputs(torch, spatial_scale, dtype=None, seed=0):
  """Features [3, 4, MAP, MAP] and RoIs [K, 5] in image coordinates (map / spatial_scale)."""
  dtype = dtype or torch.float64
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(3, 4, MAP, MAP))
  side = MAP / spatial_scale
  cells = np.array([
      [0, 1.0, 2.0, 9.0, 7.5],  # inside
      [1, 0.3, 0.6, 11.7, 11.2],  # almost the whole map
      [2, 4.2, 5.1, 4.6, 5.3],  # under a cell
      [0, 6.0, 6.0, 6.0, 6.0],  # empty
      [1, -3.5, 8.0, 2.5, 14.5],  # partly left and below the map
      [2, 10.5, -2.7, 16.0, 3.0],  # partly right and above
      [0, 13.5, 1.0, 20.0, 6.0],  # wholly right of the map
      [1, -9.0, -8.0, -1.6, -1.2],  # wholly above-left
      [2, 11.4, 11.6, 11.9, 12.0],  # a thin sliver at the bottom-right edge
  ])
  random = np.concatenate([rng.integers(0, 3, (6, 1)), rng.uniform(-2, 14, (6, 4))], 1)
  random[:, 3:] = np.maximum(random[:, 1:3], random[:, 3:]) + rng.uniform(0, 3, (6, 2))
  rois = np.concatenate([cells, random])
  rois[:, 1:] *= side / MAP
  return (torch.tensor(features, dtype=dtype, requires_grad=True),
          torch.tensor(rois, dtype=dtype))


def _forward_and_grad(roi_align, features, rois, grad, *args):
  features.grad = None
  out = roi_align(features, rois, *args)
  (out * grad).sum().backward()
  return out.detach().numpy(), features.grad.numpy()


@pytest.mark.parametrize("spatial_scale", [0.25, 1 / 32])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("aligned", [False, True])
def test_matches_torchvision_python_roi_align(aligned, sampling_ratio, spatial_scale):
  import_torchvision()
  import torch
  features, rois = _inputs(torch, spatial_scale)
  # The Python reference samples adaptive grids of at most MAP per bin; stay within them.
  assert (rois[:, 3:] - rois[:, 1:3]).max() * spatial_scale / min(POOLED) <= MAP
  grad = torch.randn(len(rois), features.shape[1], *POOLED, generator=torch.Generator()
                     .manual_seed(1), dtype=features.dtype)
  args = (POOLED, spatial_scale, sampling_ratio, aligned)
  out, grad_in = _forward_and_grad(lean_roi_align, features, rois, grad, *args)
  ref, _ = _forward_and_grad(_python_roi_align(torch), features, rois, grad, *args)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # A RoI without samples (aligned, adaptive, zero size: a 0 / 0 sample step) has a NaN input
  # gradient in the Python version and none in the kernel; leave it out of the reference's.
  adaptive_empty = aligned and sampling_ratio <= 0
  sampled = (rois[:, 3:] - rois[:, 1:3]).min(1).values > 0 if adaptive_empty else slice(None)
  _, ref_grad = _forward_and_grad(_python_roi_align(torch), features, rois[sampled],
                                  grad[sampled], *args)
  np.testing.assert_allclose(grad_in, ref_grad, rtol=1e-5, atol=1e-5)
  kernel = _kernel_roi_align(features.detach().numpy(), rois.numpy(), *args)
  np.testing.assert_allclose(out, kernel, rtol=1e-5, atol=1e-5)
  # The boxes outside the map make the out-of-map rule matter: reading the clamped border
  # instead (the Python version as shipped) changes some outputs.
  from torchvision.ops.roi_align import _roi_align
  with torch.no_grad():
    border = _roi_align.__wrapped__(features, rois, spatial_scale, *POOLED, sampling_ratio,
                                    aligned)
  assert np.abs(out - border.numpy()).max() > 1e-3


def test_float32_list_boxes_and_chunks(monkeypatch):
  """float32 features, boxes as one [Ki, 4] tensor per image and RoIs split into many chunks
  give the reference's values and gradients."""
  import_torchvision()
  import torch
  features, rois = _inputs(torch, 0.25, torch.float32, seed=3)
  grad = torch.randn(len(rois), features.shape[1], 2, 2, generator=torch.Generator()
                     .manual_seed(2))
  order = torch.argsort(rois[:, 0], stable=True)
  rois = rois[order]
  per_image = [rois[rois[:, 0] == i, 1:] for i in range(3)]
  ref, ref_grad = _forward_and_grad(_python_roi_align(torch), features, rois, grad, (2, 2), 0.25,
                                    0, False)
  monkeypatch.setattr(torch_reference, "_ROI_ALIGN_PAIRS", 100)  # 1 RoI per chunk at most
  out, grad_in = _forward_and_grad(lean_roi_align, features, per_image, grad, 2, 0.25, 0, False)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_in, ref_grad, rtol=1e-5, atol=1e-5)


def test_no_rois_and_bad_boxes():
  import_torchvision()
  import torch
  features = torch.randn(2, 3, 8, 8, requires_grad=True)
  out = lean_roi_align(features, torch.zeros(0, 5), 7, 0.25, 2)
  assert out.shape == (0, 3, 7, 7)
  out.sum().backward()
  assert features.grad.abs().sum() == 0
  with pytest.raises(ValueError, match=r"\[K, 5\]"):
    lean_roi_align(features, torch.zeros(4, 4), 7)
  with pytest.raises(ValueError, match=r"\[Ki, 4\]"):
    lean_roi_align(features, [torch.zeros(4, 5)], 7)
  with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
    lean_roi_align(features[0], torch.zeros(1, 5), 7)
