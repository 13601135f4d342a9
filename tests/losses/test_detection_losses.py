"""Tests of segjax.losses.detection against torchvision's detection losses and RoIAlign.

torchvision's RPN `compute_loss` and `fastrcnn_loss` run on the same data (the RPN with a stub
sampler returning the same sampled sets). Mask targets are checked against torchvision's
pure-Python `_roi_align` (aligned, adaptive) plus the threshold, as detectron2 builds them;
torchvision's own `maskrcnn_loss` builds different targets (unaligned, no threshold), so the
mask loss is checked against torch's BCE on the same targets.
"""
import math
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.losses.detection import fast_rcnn_losses, mask_loss, mask_targets, rpn_losses
from segjax.ops import foreground_slots
from segjax.ops.targets import RoiTargets, RpnTargets, roi_targets, rpn_targets
from tests.torch_reference import import_torchvision

# One compilation per shape instead of op-by-op dispatch, to keep the file fast.
_rpn_grads = jax.jit(jax.grad(lambda o, d, t: sum(rpn_losses(o, d, t)), argnums=(0, 1)))
_fast_rcnn_grads = jax.jit(jax.grad(lambda c, b, t: sum(fast_rcnn_losses(c, b, t)),
                                    argnums=(0, 1)))
_mask_targets = jax.jit(mask_targets, static_argnums=(4, 5, 6))


def _random_boxes(rng, n, extent=(48.0, 40.0), min_size=3.0, max_size=30.0):
  """n float32 boxes (x1, y1, x2, y2) inside an image of width, height = extent."""
  wh = rng.uniform(min_size, max_size, (n, 2))
  xy = rng.uniform(0, 1, (n, 2)) * (np.array(extent) - wh)
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def _batched_rpn_targets(rng, num_images=3, num_anchors=60):
  """RpnTargets with leading [B] from `rpn_targets`; the last image has no valid gt."""
  anchors = _random_boxes(rng, num_anchors)
  gt = np.stack([_random_boxes(rng, 4) for _ in range(num_images)])
  gt_valid = np.ones((num_images, 4), bool)
  gt_valid[:, 3] = False
  gt_valid[-1] = False
  keys = jax.random.split(jax.random.key(0), num_images)
  fn = jax.jit(jax.vmap(lambda g, v, k: rpn_targets(anchors, g, v, k, batch_size_per_image=24)))
  return fn(jnp.asarray(gt), jnp.asarray(gt_valid), keys)


def _torch_rpn_loss(objectness, deltas, targets):
  """torchvision's RegionProposalNetwork.compute_loss fed the same sampled anchor sets."""
  tv = import_torchvision()
  import torch
  labels = np.asarray(targets.labels)
  sampled = np.asarray(targets.weights) > 0
  pos = [torch.from_numpy((l == 1) & s) for l, s in zip(labels, sampled)]
  neg = [torch.from_numpy((l == 0) & s) for l, s in zip(labels, sampled)]
  rpn = types.SimpleNamespace(fg_bg_sampler=lambda _: (pos, neg))
  obj = torch.tensor(np.asarray(objectness).reshape(-1, 1), requires_grad=True)
  dlt = torch.tensor(np.asarray(deltas).reshape(-1, 4), requires_grad=True)
  losses = tv.models.detection.rpn.RegionProposalNetwork.compute_loss(
      rpn, obj, dlt, [torch.from_numpy(l.astype(np.float32)) for l in labels],
      [torch.from_numpy(np.array(t)) for t in np.asarray(targets.box_targets)])
  sum(losses).backward()
  return ([float(l.detach()) for l in losses], obj.grad.numpy().reshape(objectness.shape),
          dlt.grad.numpy().reshape(deltas.shape))


def test_rpn_losses_equal_torchvision():
  rng = np.random.default_rng(0)
  targets = _batched_rpn_targets(rng)
  labels = np.asarray(targets.labels)
  assert (labels == 1).sum() > 0 and (labels[-1] == 1).sum() == 0
  objectness = rng.normal(0, 2, labels.shape).astype(np.float32)
  deltas = (np.asarray(targets.box_targets)
            + rng.normal(0, 0.2, labels.shape + (4,))).astype(np.float32)
  fn = jax.jit(rpn_losses)
  got = [float(v) for v in fn(objectness, deltas, targets)]
  grads = _rpn_grads(objectness, deltas, targets)
  expected, obj_grad, dlt_grad = _torch_rpn_loss(objectness, deltas, targets)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(grads[0]), obj_grad, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(np.asarray(grads[1]), dlt_grad, rtol=1e-5, atol=1e-8)


def test_rpn_losses_without_positives_or_samples_are_finite():
  rng = np.random.default_rng(1)
  shape = (2, 30)
  objectness = rng.normal(0, 1, shape).astype(np.float32)
  deltas = rng.normal(0, 1, shape + (4,)).astype(np.float32)
  negatives = RpnTargets(jnp.asarray(np.where(rng.uniform(size=shape) < 0.5, 0, -1), jnp.int32),
                         jnp.zeros(shape + (4,)), jnp.zeros(shape))
  negatives = negatives._replace(weights=(negatives.labels == 0).astype(jnp.float32))
  expected, _, _ = _torch_rpn_loss(objectness, deltas, negatives)
  got = rpn_losses(objectness, deltas, negatives)
  np.testing.assert_allclose([float(v) for v in got], expected, rtol=1e-5)
  assert float(got[1]) == 0.0
  nothing = RpnTargets(jnp.full(shape, -1, jnp.int32), jnp.zeros(shape + (4,)), jnp.zeros(shape))
  for targets in (negatives, nothing):
    grads = _rpn_grads(objectness, deltas, targets)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    np.testing.assert_array_equal(np.asarray(grads[1]), 0.0)
  assert [float(v) for v in rpn_losses(objectness, deltas, nothing)] == [0.0, 0.0]


def _random_roi_targets(rng, num_images, rows, num_classes, valid_counts):
  """RoiTargets [B, S] with the given valid row count per image, about a third foreground."""
  valid = np.arange(rows)[None, :] < np.array(valid_counts)[:, None]
  fg = valid & (rng.uniform(size=(num_images, rows)) < 0.35)
  labels = np.where(fg, rng.integers(1, num_classes + 1, (num_images, rows)), 0)
  box_targets = np.where(fg[..., None], rng.normal(0, 0.5, (num_images, rows, 4)), 0)
  return RoiTargets(jnp.zeros((num_images, rows, 4)), jnp.asarray(labels, jnp.int32),
                    jnp.asarray(box_targets, jnp.float32), jnp.zeros((num_images, rows), jnp.int32),
                    jnp.asarray(valid))


def _torch_fast_rcnn_loss(class_logits, box_deltas, targets):
  """torchvision's fastrcnn_loss on the valid rows, with gradients scattered back."""
  tv = import_torchvision()
  import torch
  valid = np.asarray(targets.valid)
  logits = torch.tensor(class_logits, requires_grad=True)
  deltas = torch.tensor(box_deltas, requires_grad=True)
  index = torch.from_numpy(valid.copy())
  num_rows = int(valid.sum())
  losses = tv.models.detection.roi_heads.fastrcnn_loss(
      logits[index], deltas[index].reshape(num_rows, -1),
      [torch.from_numpy(np.asarray(l)[v].astype(np.int64)) for l, v in zip(targets.labels, valid)],
      [torch.from_numpy(np.asarray(t)[v]) for t, v in zip(targets.box_targets, valid)])
  sum(losses).backward()
  return [float(l.detach()) for l in losses], logits.grad.numpy(), deltas.grad.numpy()


def test_fast_rcnn_losses_equal_torchvision():
  rng = np.random.default_rng(2)
  num_classes = 4
  targets = _random_roi_targets(rng, 3, 16, num_classes, valid_counts=(16, 9, 0))
  shape = (3, 16, num_classes + 1)
  class_logits = rng.normal(0, 2, shape).astype(np.float32)
  box_deltas = rng.normal(0, 0.5, shape + (4,)).astype(np.float32)
  got = [float(v) for v in jax.jit(fast_rcnn_losses)(class_logits, box_deltas, targets)]
  grads = _fast_rcnn_grads(class_logits, box_deltas, targets)
  expected, logit_grad, delta_grad = _torch_fast_rcnn_loss(class_logits, box_deltas, targets)
  assert expected[1] > 0
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(grads[0]), logit_grad, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(np.asarray(grads[1]), delta_grad, rtol=1e-5, atol=1e-8)


def test_fast_rcnn_losses_on_sampled_roi_targets():
  """End to end with `roi_targets`: an image without gt has background rows only."""
  rng = np.random.default_rng(3)
  gt = np.stack([_random_boxes(rng, 3) for _ in range(2)])
  gt_valid = np.array([[True, True, False], [False, False, False]])
  classes = rng.integers(0, 3, (2, 3))
  proposals = np.stack([np.concatenate([g + rng.normal(0, 1.5, g.shape), _random_boxes(rng, 20)])
                        for g in gt]).astype(np.float32)
  keys = jax.random.split(jax.random.key(1), 2)
  sample = jax.jit(jax.vmap(
      lambda p, g, c, v, k: roi_targets(p, g, c, v, k, batch_size_per_image=12)))
  targets = sample(
      jnp.asarray(proposals), jnp.asarray(gt), jnp.asarray(classes), jnp.asarray(gt_valid), keys)
  assert np.asarray(targets.labels)[0].max() > 0 and np.asarray(targets.labels)[1].max() == 0
  class_logits = rng.normal(0, 1, (2, 12, 4)).astype(np.float32)
  box_deltas = rng.normal(0, 1, (2, 12, 4, 4)).astype(np.float32)
  expected, _, _ = _torch_fast_rcnn_loss(class_logits, box_deltas, targets)
  got = fast_rcnn_losses(class_logits, box_deltas, targets)
  np.testing.assert_allclose([float(v) for v in got], expected, rtol=1e-5, atol=1e-7)


def test_fast_rcnn_losses_without_valid_rows_or_foreground_are_finite():
  rng = np.random.default_rng(4)
  class_logits = rng.normal(0, 1, (2, 8, 3)).astype(np.float32)
  box_deltas = rng.normal(0, 1, (2, 8, 3, 4)).astype(np.float32)
  empty = _random_roi_targets(rng, 2, 8, 2, valid_counts=(0, 0))
  background = _random_roi_targets(rng, 2, 8, 2, valid_counts=(5, 8))
  background = background._replace(labels=jnp.zeros_like(background.labels))
  assert [float(v) for v in fast_rcnn_losses(class_logits, box_deltas, empty)] == [0.0, 0.0]
  classifier, box = fast_rcnn_losses(class_logits, box_deltas, background)
  expected, _, _ = _torch_fast_rcnn_loss(class_logits, box_deltas, background)
  np.testing.assert_allclose(float(classifier), expected[0], rtol=1e-5)
  assert float(box) == 0.0
  for targets in (empty, background):
    grads = _fast_rcnn_grads(class_logits, box_deltas, targets)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    np.testing.assert_array_equal(np.asarray(grads[1]), 0.0)


def _blob_masks(rng, boxes, height, width):
  """0/1 masks [G, H, W]: a random ellipse inside each integer box, zero on the box border."""
  yy, xx = np.mgrid[:height, :width] + 0.5
  masks = []
  for x1, y1, x2, y2 in boxes:
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    rx = rng.uniform(0.4, 0.5) * (x2 - x1) - 1
    ry = rng.uniform(0.4, 0.5) * (y2 - y1) - 1
    masks.append((((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1).astype(np.float32))
  return np.stack(masks)


def _torch_mask_targets(masks, rois, matched, size):
  """torchvision `_roi_align(aligned=True, sampling_ratio=0)` of each RoI's matched mask."""
  import_torchvision()
  import torch
  tv_roi_align = sys.modules["torchvision.ops.roi_align"]._roi_align.__wrapped__
  indexed = np.concatenate([np.arange(len(rois))[:, None], rois], 1).astype(np.float32)
  out = tv_roi_align(torch.from_numpy(masks[matched][:, None]), torch.from_numpy(indexed), 1.0,
                     size, size, 0, True)
  return out[:, 0].numpy()


@pytest.mark.parametrize("size", [7, 14])
def test_mask_targets_full_image_equal_torchvision_roi_align(size):
  rng = np.random.default_rng(5 + size)
  height, width, num_gt, num_rois = 32, 40, 3, 6
  images_masks, images_rois, images_matched = [], [], []
  for _ in range(2):
    gt = np.round(_random_boxes(rng, num_gt, (width, height), 8, 24))
    images_masks.append(_blob_masks(rng, gt, height, width))
    images_rois.append(_random_boxes(rng, num_rois, (width, height), 2, 30))
    images_matched.append(rng.integers(0, num_gt, num_rois).astype(np.int32))
  masks, rois, matched = map(np.stack, (images_masks, images_rois, images_matched))
  frames = np.tile(np.array([0, 0, width, height], np.float32), (2, num_gt, 1))
  fn = jax.jit(jax.vmap(lambda m, f, r, i, t: mask_targets(m, f, r, i, size, t),
                        in_axes=(0, 0, 0, 0, None)), static_argnums=4)
  soft = np.asarray(fn(masks, frames, rois, matched, None))
  hard = np.asarray(fn(masks, frames, rois, matched, 0.5))
  for b in range(2):
    expected = _torch_mask_targets(masks[b], rois[b], matched[b], size)
    np.testing.assert_allclose(soft[b], expected, atol=1e-5)
    clear = np.abs(expected - 0.5) > 1e-5
    assert clear.mean() > 0.99 and (expected >= 0.5).any()
    np.testing.assert_array_equal(hard[b][clear], (expected >= 0.5)[clear])
  assert set(np.unique(hard)) <= {0.0, 1.0}


def test_mask_targets_cropped_frame_equals_full_image():
  """A mask cropped to its integer box at the box's pixel size, frame = box, is the same mask."""
  rng = np.random.default_rng(6)
  height, width, size = 36, 44, 14
  box_h, box_w = 14, 18
  corners = np.stack([rng.integers(0, width - box_w, 3), rng.integers(0, height - box_h, 3)], 1)
  gt = np.concatenate([corners, corners + [box_w, box_h]], 1).astype(np.float32)
  full = _blob_masks(rng, gt, height, width)
  cropped = np.stack([m[int(y1):int(y2), int(x1):int(x2)] for m, (x1, y1, x2, y2) in zip(full, gt)])
  matched = rng.integers(0, 3, 10).astype(np.int32)
  rois = (gt[matched] + rng.normal(0, 3, (10, 4))).astype(np.float32)
  rois = np.clip(np.concatenate([np.minimum(rois[:, :2], rois[:, 2:] - 2),
                                 np.maximum(rois[:, 2:], rois[:, :2] + 2)], 1), 0,
                 [width, height, width, height]).astype(np.float32)
  frames = np.tile(np.array([0, 0, width, height], np.float32), (3, 1))
  expected = np.asarray(_mask_targets(full, frames, rois, matched, size, None))
  # Bound the adaptive grid as for the full image (RoIs larger than the 14 x 18 crop).
  grid = max(math.ceil(height / size), math.ceil(width / size))
  got = _mask_targets(cropped, gt, rois, matched, size, None, grid)
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)
  assert expected.max() > 0.9
  hard = np.asarray(_mask_targets(cropped, gt, rois, matched, size, 0.5, grid))
  clear = np.abs(expected - 0.5) > 1e-5
  assert clear.mean() > 0.99
  np.testing.assert_array_equal(hard[clear], (expected >= 0.5)[clear])


def test_mask_targets_resampled_frame_maps_roi_into_mask():
  """A size x size mask resampled on a float frame: the RoI equal to the frame gives the mask."""
  rng = np.random.default_rng(7)
  size = 8
  masks = (rng.uniform(size=(2, size, size)) < 0.5).astype(np.float32)
  frames = np.array([[3.3, 5.1, 20.7, 11.9], [0.0, 1.5, 6.5, 30.0]], np.float32)
  got = _mask_targets(masks, frames, frames[[1, 0]], np.array([1, 0], np.int32), size)
  np.testing.assert_allclose(np.asarray(got), masks[[1, 0]], atol=1e-5)


def test_mask_targets_resampled_frame_equals_roi_align_in_mask_coordinates():
  """RoIs inside non-square frames of 10 x 12 masks, against torch on hand-mapped boxes."""
  rng = np.random.default_rng(11)
  size, mask_h, mask_w = 4, 10, 12
  masks = (rng.uniform(size=(3, mask_h, mask_w)) < 0.5).astype(np.float32)
  frames = np.array([[3.3, 5.1, 20.7, 11.9], [0.0, 1.5, 6.5, 30.0], [10, 12, 31, 25]],
                    np.float32)
  matched = rng.integers(0, 3, 8).astype(np.int32)
  frame = frames[matched]
  lo = rng.uniform(0, 0.5, (8, 2))
  hi = rng.uniform(0.6, 1, (8, 2))
  extent = frame[:, 2:] - frame[:, :2]
  rois = np.concatenate([frame[:, :2] + lo * extent, frame[:, :2] + hi * extent],
                        1).astype(np.float32)
  mask_scale = np.array([mask_w, mask_h, mask_w, mask_h]) / np.tile(extent, 2)
  local = ((rois - np.tile(frame[:, :2], 2)) * mask_scale).astype(np.float32)
  expected = _torch_mask_targets(masks, local, matched, size)
  got = _mask_targets(masks, frames, rois, matched, size, None)
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def test_mask_targets_zero_size_frames_and_no_gt_are_zero():
  rng = np.random.default_rng(8)
  masks = np.zeros((2, 16, 16), np.float32)
  masks[1] = 1.0
  frames = np.array([[0, 0, 0, 0], [4, 4, 4, 9]], np.float32)  # padding, zero-width gt
  rois = _random_boxes(rng, 5, (16, 16), 1, 12)
  got = _mask_targets(masks, frames, rois, np.array([0, 1, 1, 0, 1]), 7)
  np.testing.assert_array_equal(np.asarray(got), 0.0)
  assert got.shape == (5, 7, 7) and got.dtype == jnp.float32


def _torch_mask_loss(mask_logits, labels, targets):
  """torch BCE-with-logits of the foreground RoIs' own channels, as in maskrcnn_loss."""
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  logits = torch.tensor(mask_logits, requires_grad=True)
  fg = torch.from_numpy(labels > 0)
  # torchvision's [N, K + 1, M, M] layout of the foreground RoIs.
  chosen = logits[fg].permute(0, 3, 1, 2)
  own = chosen[torch.arange(chosen.shape[0]), torch.from_numpy(labels[labels > 0])]
  loss = F.binary_cross_entropy_with_logits(own, torch.from_numpy(targets[labels > 0]))
  loss.backward()
  return float(loss.detach()), logits.grad.numpy()


def test_mask_loss_equals_torch_formula():
  rng = np.random.default_rng(9)
  shape = (3, 5, 6, 6, 4)
  mask_logits = rng.normal(0, 2, shape).astype(np.float32)
  labels = rng.integers(0, 4, shape[:2]).astype(np.int32)
  labels[2] = 0  # an image without foreground RoIs
  targets = (rng.uniform(size=shape[:4]) < 0.4).astype(np.float32)
  got = float(jax.jit(mask_loss)(mask_logits, labels, targets))
  grad = np.asarray(jax.grad(mask_loss)(mask_logits, labels, targets))
  expected, expected_grad = _torch_mask_loss(mask_logits, labels, targets)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-9)


def test_mask_loss_of_weighted_foreground_slots_is_unbiased():
  """The mask loss on `foreground_slots`' random subsets (weighted n / slots) averages to
  torchvision's loss over all foreground RoIs; with room for all of them it equals it."""
  rng = np.random.default_rng(11)
  shape = (3, 12, 6, 6, 4)
  mask_logits = rng.normal(0, 2, shape).astype(np.float32)
  labels = np.zeros(shape[:2], np.int32)
  labels[0, [0, 2, 3, 5, 7, 8, 10, 11]] = rng.integers(1, 4, 8)  # 8 foreground RoIs
  labels[1, [4, 9]] = (2, 3)  # 2, fewer than the slots
  targets = (rng.uniform(size=shape[:4]) < 0.4).astype(np.float32)
  expected, _ = _torch_mask_loss(mask_logits, labels, targets)

  def slotted(key, slots):
    rows, taken, weights = jax.vmap(lambda f, k: foreground_slots(f, slots, k))(
        jnp.asarray(labels > 0), jax.random.split(key, shape[0]))
    pick = lambda x: jnp.take_along_axis(x, rows.reshape(rows.shape + (1,) * (x.ndim - 2)), 1)
    return mask_loss(pick(mask_logits), jnp.where(taken, pick(labels), 0), pick(targets),
                     weights)

  keys = jax.random.split(jax.random.key(0), 3000)
  losses = np.asarray(jax.jit(jax.vmap(lambda k: slotted(k, 3)))(keys))
  assert losses.std() > 0.01  # the subsets differ...
  np.testing.assert_allclose(losses.mean(), expected, rtol=0.01)  # ...and average to the loss
  np.testing.assert_allclose(float(slotted(keys[0], 8)), expected, rtol=1e-5)


def test_mask_loss_without_foreground_is_zero():
  mask_logits = np.random.default_rng(10).normal(0, 50, (2, 3, 4, 4, 3)).astype(np.float32)
  labels = np.zeros((2, 3), np.int32)
  targets = np.ones((2, 3, 4, 4), np.float32)
  value, grad = jax.value_and_grad(mask_loss)(mask_logits, labels, targets)
  assert float(value) == 0.0
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_bad_inputs_raise():
  rpn = RpnTargets(jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 5, 4)), jnp.zeros((2, 5)))
  with pytest.raises(ValueError, match="objectness"):
    rpn_losses(jnp.zeros(10), jnp.zeros((10, 4)), rpn)
  with pytest.raises(ValueError, match="targets.labels"):
    rpn_losses(jnp.zeros((2, 6)), jnp.zeros((2, 6, 4)), rpn)
  roi = _random_roi_targets(np.random.default_rng(0), 2, 4, 2, (4, 4))
  with pytest.raises(ValueError, match="box_deltas"):
    fast_rcnn_losses(jnp.zeros((2, 4, 3)), jnp.zeros((2, 4, 12)), roi)
  with pytest.raises(ValueError, match="gt_masks"):
    mask_targets(jnp.zeros((0, 8, 8)), jnp.zeros((0, 4)), jnp.zeros((3, 4)), jnp.zeros(3, int), 7)
  with pytest.raises(ValueError, match="matched_idx"):
    mask_targets(jnp.zeros((2, 8, 8)), jnp.zeros((2, 4)), jnp.zeros((3, 4)), jnp.zeros(3), 7)
  with pytest.raises(ValueError, match="labels"):
    mask_loss(jnp.zeros((2, 3, 4, 4, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 3, 4, 4)))
  with pytest.raises(ValueError, match="targets"):
    mask_loss(jnp.zeros((2, 3, 4, 4, 3)), jnp.zeros((2, 3), int), jnp.zeros((2, 3, 5, 5)))
