"""RoIAlign / RoIPool / multi-level RoIAlign against detectron2's vectors, torchvision and numpy.

torchvision's compiled kernels do not load here; its pure-Python `_roi_align` (unwrapped from
its lazy torch.compile) is the torch reference. That Python version omits the C++ kernel's
"samples beyond [-1, H] contribute 0" rule and caps the adaptive grid at the map size, so boxes
reaching far outside the map or larger than it are checked against a numpy port of the C++
loop written here instead.
"""
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.ops.roi_align import fpn_levels, multilevel_roi_align, roi_align, roi_pool
from tests.torch_reference import import_torchvision

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
