"""Tests of segjax.ops box ops against torchvision's Python code and plain greedy NMS."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.ops.anchors import generate_anchors
from segjax.ops.boxes import (box_area, clip_boxes, decode_boxes, encode_boxes, pairwise_iou)
from segjax.ops.masks import paste_masks
from segjax.ops.nms import batched_nms, nms
from tests.torch_reference import import_torchvision


def _random_boxes(rng, n, extent=200.0, max_size=60.0):
  xy = rng.uniform(0, extent, (n, 2))
  wh = rng.uniform(1, max_size, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def _np_iou(a, b):
  a, b = a.astype(np.float64), b.astype(np.float64)
  out = np.zeros((len(a), len(b)))
  for i, p in enumerate(a):
    for j, q in enumerate(b):
      iw = max(min(p[2], q[2]) - max(p[0], q[0]), 0)
      ih = max(min(p[3], q[3]) - max(p[1], q[1]), 0)
      union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - iw * ih
      out[i, j] = iw * ih / union if union > 0 else 0
  return out


def _greedy_nms(boxes, scores, threshold):
  """Plain greedy NMS in torch (torchvision.ops.nms semantics)."""
  torch = pytest.importorskip("torch")
  boxes, scores = torch.from_numpy(boxes), torch.from_numpy(scores)
  order = torch.argsort(scores, descending=True)
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  keep = []
  while order.numel():
    i = order[0]
    keep.append(int(i))
    rest = order[1:]
    lt = torch.maximum(boxes[i, :2], boxes[rest, :2])
    rb = torch.minimum(boxes[i, 2:], boxes[rest, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    iou = inter / (area[i] + area[rest] - inter)
    order = rest[iou <= threshold]
  return np.array(keep, np.int64)


def test_area_iou_clip():
  rng = np.random.default_rng(0)
  a, b = _random_boxes(rng, 7), _random_boxes(rng, 5)
  b[0] = [3, 3, 3, 3]
  a[0] = [3, 3, 3, 3]
  np.testing.assert_allclose(pairwise_iou(a, b), _np_iou(a, b), rtol=1e-5, atol=1e-7)
  assert float(pairwise_iou(a, b)[0, 0]) == 0.0
  np.testing.assert_allclose(box_area(a), (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))
  clipped = clip_boxes(jnp.array([[-5., 2., 300., 40.]]), 30, 250)
  np.testing.assert_array_equal(clipped, [[0, 2, 250, 30]])
  with pytest.raises(ValueError, match="last axis of size 4"):
    box_area(np.zeros((3, 5)))


def test_box_coder_matches_torchvision_and_round_trips():
  import_torchvision()
  import torch
  from torchvision.models.detection._utils import BoxCoder
  rng = np.random.default_rng(1)
  proposals, gt = _random_boxes(rng, 50), _random_boxes(rng, 50)
  coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
  ref_codes = coder.encode_single(torch.from_numpy(gt), torch.from_numpy(proposals)).numpy()
  codes = jax.jit(encode_boxes)(gt, proposals)
  np.testing.assert_allclose(codes, ref_codes, rtol=1e-5, atol=1e-5)
  deltas = rng.normal(0, 3, (50, 4)).astype(np.float32)
  deltas[0, 2:] = 100.0  # exercises the clamp
  ref_boxes = coder.decode_single(torch.from_numpy(deltas), torch.from_numpy(proposals)).numpy()
  np.testing.assert_allclose(jax.jit(decode_boxes)(deltas, proposals), ref_boxes, rtol=1e-5,
                             atol=1e-3)
  np.testing.assert_allclose(decode_boxes(codes, proposals), gt, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("n,threshold,max_out,block", [
    (1, 0.5, 4, 256), (37, 0.3, 37, 8), (300, 0.5, 300, 64), (300, 0.7, 50, 32),
    (700, 0.0, 700, 256), (700, 0.45, 700, 100)])
def test_nms_matches_greedy(n, threshold, max_out, block):
  rng = np.random.default_rng(n)
  boxes = _random_boxes(rng, n)
  scores = rng.permutation(n).astype(np.float32)
  ref = _greedy_nms(boxes, scores, threshold)
  fn = jax.jit(nms, static_argnames=("max_output_size", "block_size"))
  idx, num = fn(boxes, scores, threshold, max_output_size=max_out, block_size=block)
  k = min(len(ref), max_out)
  assert int(num) == k
  np.testing.assert_array_equal(np.asarray(idx)[:k], ref[:k])
  assert np.all(np.asarray(idx)[k:] == -1)


def test_nms_ignores_invalid_boxes():
  rng = np.random.default_rng(3)
  boxes = _random_boxes(rng, 200)
  scores = rng.permutation(200).astype(np.float32)
  valid = rng.uniform(size=200) < 0.6
  ref = np.flatnonzero(valid)[_greedy_nms(boxes[valid], scores[valid], 0.5)]
  idx, num = nms(boxes, scores, 0.5, 200, valid=valid, block_size=64)
  assert int(num) == len(ref)
  np.testing.assert_array_equal(np.asarray(idx)[:len(ref)], ref)


def test_batched_nms_matches_per_class_greedy():
  rng = np.random.default_rng(4)
  n = 400
  boxes = _random_boxes(rng, n, extent=100)
  scores = rng.permutation(n).astype(np.float32)
  classes = rng.integers(0, 5, n).astype(np.int32)
  kept = []
  for c in range(5):
    members = np.flatnonzero(classes == c)
    kept.extend(members[_greedy_nms(boxes[members], scores[members], 0.5)])
  ref = np.array(sorted(kept, key=lambda i: -scores[i]))
  idx, num = jax.jit(batched_nms, static_argnums=(4,))(boxes, scores, classes, 0.5, n)
  assert int(num) == len(ref)
  np.testing.assert_array_equal(np.asarray(idx)[:len(ref)], ref)


def test_nms_vmap():
  rng = np.random.default_rng(5)
  boxes = np.stack([_random_boxes(rng, 120) for _ in range(3)])
  scores = np.stack([rng.permutation(120).astype(np.float32) for _ in range(3)])
  valid = rng.uniform(size=(3, 120)) < 0.8
  fn = jax.jit(jax.vmap(lambda b, s, v: nms(b, s, 0.4, 60, valid=v, block_size=32)))
  idx, num = fn(boxes, scores, valid)
  for i in range(3):
    ref = np.flatnonzero(valid[i])[_greedy_nms(boxes[i][valid[i]], scores[i][valid[i]], 0.4)]
    k = min(len(ref), 60)
    assert int(num[i]) == k
    np.testing.assert_array_equal(np.asarray(idx[i])[:k], ref[:k])


def test_nms_rejects_bad_arguments():
  with pytest.raises(ValueError, match="max_output_size"):
    nms(np.zeros((4, 4)), np.zeros(4), 0.5, 0)
  with pytest.raises(ValueError, match="scores must be"):
    nms(np.zeros((4, 4)), np.zeros(3), 0.5, 2)


@pytest.mark.parametrize("image_size", [(64, 96), (100, 75)])
def test_anchors_match_torchvision(image_size):
  import_torchvision()
  import torch
  from torchvision.models.detection.anchor_utils import AnchorGenerator
  from torchvision.models.detection.image_list import ImageList
  strides, sizes = (4, 8, 16, 32, 64), (32, 64, 128, 256, 512)
  ours = generate_anchors(image_size, strides, sizes)
  gen = AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * 5)
  feats = [torch.zeros(1, 1, math.ceil(image_size[0] / s), math.ceil(image_size[1] / s))
           for s in strides]
  images = ImageList(torch.zeros(1, 3, *image_size), [image_size])
  ref = gen(images, feats)[0].numpy()
  np.testing.assert_array_equal(np.concatenate([np.asarray(a) for a in ours]), ref)


def test_anchors_by_hand():
  (level,) = generate_anchors((8, 12), strides=(4,), sizes=(8,), aspect_ratios=(0.5, 1.0, 2.0))
  # Grid 2 x 3; cell anchors: ratio 0.5 -> w = 8 / sqrt(.5) = 11.31, h = 5.66 -> round(+-5.66),
  # round(+-2.83); ratio 1 -> +-4; ratio 2 -> w 5.66, h 11.31.
  cells = np.array([[-6, -3, 6, 3], [-4, -4, 4, 4], [-3, -6, 3, 6]], np.float32)
  shifts = np.array([[x, y, x, y] for y in (0, 4) for x in (0, 4, 8)], np.float32)
  np.testing.assert_array_equal(level, (shifts[:, None] + cells[None]).reshape(-1, 4))


def test_paste_masks_matches_torchvision():
  import_torchvision()
  import torch
  from torchvision.models.detection.roi_heads import paste_masks_in_image
  rng = np.random.default_rng(6)
  r, h, w = 60, 70, 90
  masks = rng.uniform(0, 1, (r, 28, 28)).astype(np.float32)
  xy = rng.uniform(-15, 60, (r, 2))
  wh = rng.uniform(16, 60, (r, 2))
  wh[:10] = rng.uniform(0, 3, (10, 2))  # boxes thinner than one pixel after truncation
  xy[:10] = rng.uniform(0, 60, (10, 2))
  boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  ref = paste_masks_in_image(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes),
                             (h, w))[:, 0].numpy()
  out = np.asarray(jax.jit(paste_masks, static_argnums=2)(masks, boxes, (h, w)))
  # Same indices and weights; float32 rounding of the bilinear sum differs by <= 2 ulp.
  np.testing.assert_allclose(out, ref, rtol=0, atol=3e-7)
  np.testing.assert_array_equal(out == 0, ref == 0)
  binary = np.asarray(paste_masks(masks, boxes, (h, w), threshold=0.5))
  near = np.abs(ref - 0.5) < 1e-6
  np.testing.assert_array_equal(binary[~near], (ref > 0.5)[~near])
