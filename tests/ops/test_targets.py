"""Tests of segjax.ops.targets against torchvision's detection training code and formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.ops.targets import (foreground_slots, match, roi_targets, rpn_targets,
                                sample_balanced)
from tests.torch_reference import import_torchvision


def _random_boxes(rng, n, extent=100.0, max_size=50.0):
  xy = rng.uniform(0, extent, (n, 2))
  wh = rng.uniform(2, max_size, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def _torch_matcher(high, low, allow_low):
  tv = import_torchvision()
  return tv.models.detection._utils.Matcher(high, low, allow_low)


@pytest.mark.parametrize("high,low,allow_low", [(0.7, 0.3, True), (0.5, 0.5, False),
                                                (0.5, 0.4, True), (0.6, 0.2, False)])
def test_match_equals_torchvision(high, low, allow_low):
  torch = pytest.importorskip("torch")
  matcher = _torch_matcher(high, low, allow_low)
  rng = np.random.default_rng(0)
  fn = jax.jit(lambda q: match(q, high, low, allow_low))
  for trial in range(12):
    g, n = [(1, 17), (4, 30), (7, 9)][trial % 3]
    iou = rng.uniform(0, 1, (g, n)).astype(np.float32)
    if trial % 2 == 0:  # a coarse grid gives ties and values exactly on the thresholds
      iou = (np.round(iou * 10) / 10).astype(np.float32)
    if trial % 4 == 1:  # mostly low overlaps, so low-quality matches matter
      iou *= 0.4
    expected = matcher(torch.from_numpy(iou.copy())).numpy()
    np.testing.assert_array_equal(np.asarray(fn(iou)), expected)


@pytest.mark.parametrize("allow_low", [True, False])
def test_match_ignores_padded_gt(allow_low):
  torch = pytest.importorskip("torch")
  matcher = _torch_matcher(0.7, 0.3, allow_low)
  rng = np.random.default_rng(1)
  iou = rng.uniform(0, 0.8, (5, 30)).astype(np.float32)
  valid = np.array([True, False, True, True, False])
  padded = iou.copy()
  padded[~valid] = 1.0  # padding with perfect overlaps must still never match
  expected_local = matcher(torch.from_numpy(iou[valid].copy())).numpy()
  expected = np.where(expected_local >= 0, np.flatnonzero(valid)[np.clip(expected_local, 0, None)],
                      expected_local)
  got = np.asarray(jax.jit(lambda q, v: match(q, 0.7, 0.3, allow_low, v))(padded, valid))
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("allow_low", [True, False])
def test_match_without_valid_gt_is_all_negative(allow_low):
  iou = np.full((3, 7), 0.9, np.float32)
  got = match(iou, 0.7, 0.3, allow_low, np.zeros(3, bool))
  np.testing.assert_array_equal(np.asarray(got), -np.ones(7))


def test_match_rejects_bad_input():
  with pytest.raises(ValueError, match="low threshold"):
    match(np.zeros((2, 3)), 0.3, 0.7)
  with pytest.raises(ValueError, match=r"\[G, N\]"):
    match(np.zeros((0, 3)), 0.7, 0.3)
  with pytest.raises(ValueError, match="gt_valid"):
    match(np.zeros((2, 3)), 0.7, 0.3, gt_valid=np.ones(3, bool))


def test_sample_balanced_counts_follow_formula():
  rng = np.random.default_rng(2)
  for n, num_samples, fraction in [(50, 16, 0.5), (50, 64, 0.25), (30, 8, 1.0), (30, 7, 0.0)]:
    labels = rng.choice([-1, 0, 1], size=(20, n), p=rng.dirichlet([1, 1, 1]))
    labels[0] = 1  # all positive
    labels[1] = -1  # all ignored
    keys = jax.random.split(jax.random.key(n + num_samples), 20)
    fn = jax.jit(jax.vmap(lambda l, k: sample_balanced(l, num_samples, fraction, k)))
    pos, neg = map(np.asarray, fn(jnp.asarray(labels), keys))
    for lab, p, q in zip(labels, pos, neg):
      want_pos = min(int((lab == 1).sum()), int(num_samples * fraction))
      want_neg = min(int((lab == 0).sum()), num_samples - want_pos)
      assert p.sum() == want_pos and q.sum() == want_neg
      assert np.all(lab[p] == 1) and np.all(lab[q] == 0)
      assert not np.any(p & q)


def test_sample_balanced_is_uniform():
  labels = jnp.asarray(np.array([1] * 10 + [0] * 20 + [-1] * 10))
  draws = 4000
  keys = jax.random.split(jax.random.key(3), draws)
  pos, neg = jax.jit(jax.vmap(lambda k: sample_balanced(labels, 10, 0.4, k)))(keys)
  pos_freq = np.asarray(pos).mean(0)
  neg_freq = np.asarray(neg).mean(0)
  # 4 of 10 positives and 6 of 20 negatives per draw; binomial std is about 0.008.
  np.testing.assert_allclose(pos_freq[:10], 0.4, atol=0.05)
  np.testing.assert_allclose(neg_freq[10:30], 0.3, atol=0.05)
  assert pos_freq[10:].sum() == 0 and neg_freq[:10].sum() == 0 and neg_freq[30:].sum() == 0


def _scene(rng, num_anchors=120, num_gt=4):
  anchors = _random_boxes(rng, num_anchors, max_size=40.0)
  gt = anchors[rng.choice(num_anchors, num_gt, replace=False)] + rng.normal(0, 2, (num_gt, 4))
  gt[:, 2:] = np.maximum(gt[:, 2:], gt[:, :2] + 1)
  return anchors, gt.astype(np.float32)


def test_rpn_targets_equal_torchvision_when_all_sampled():
  torch = pytest.importorskip("torch")
  tv = import_torchvision()
  det = tv.models.detection
  rpn = det.rpn.RegionProposalNetwork(None, None, 0.7, 0.3, 256, 0.5, {"training": 1, "testing": 1},
                                      {"training": 1, "testing": 1}, 0.7)
  coder = det._utils.BoxCoder((1.0, 1.0, 1.0, 1.0))
  rng = np.random.default_rng(4)
  fn = jax.jit(lambda a, g, v: rpn_targets(a, g, v, jax.random.key(0), batch_size_per_image=120,
                                           positive_fraction=1.0))
  for _ in range(3):
    anchors, gt = _scene(rng)
    labels_t, matched_t = rpn.assign_targets_to_anchors([torch.from_numpy(anchors)],
                                                        [{"boxes": torch.from_numpy(gt)}])
    labels_t = labels_t[0].numpy()
    deltas_t = coder.encode_single(matched_t[0], torch.from_numpy(anchors)).numpy()
    # Padding at the end; batch and fraction large enough that every anchor is sampled.
    gt_pad = np.concatenate([gt, np.zeros((2, 4), np.float32)])
    valid = np.array([True] * len(gt) + [False] * 2)
    out = fn(anchors, gt_pad, valid)
    np.testing.assert_array_equal(np.asarray(out.labels), labels_t)
    np.testing.assert_array_equal(np.asarray(out.weights), labels_t >= 0)
    pos = labels_t == 1
    assert pos.any()
    np.testing.assert_allclose(np.asarray(out.box_targets)[pos], deltas_t[pos], rtol=1e-5,
                               atol=1e-5)
    assert np.all(np.asarray(out.box_targets)[~pos] == 0)


def test_rpn_targets_default_sampling_and_crowd():
  rng = np.random.default_rng(5)
  anchors, gt = _scene(rng, num_anchors=400, num_gt=3)
  crowd_box = np.array([[0, 0, 60, 60]], np.float32)
  gt_all = np.concatenate([gt, crowd_box])
  valid = np.ones(4, bool)
  is_crowd = np.array([False, False, False, True])
  out = jax.jit(lambda r: rpn_targets(anchors, gt_all, valid, r, gt_is_crowd=is_crowd,
                                      batch_size_per_image=64))(jax.random.key(1))
  full = jax.jit(lambda: rpn_targets(anchors, gt, np.ones(3, bool), jax.random.key(1),
                                     batch_size_per_image=len(anchors), positive_fraction=1.0))()
  labels, full_labels = np.asarray(out.labels), np.asarray(full.labels)
  # Crowd boxes never match: positives are those of the non-crowd gt alone.
  assert np.all(full_labels[labels == 1] == 1)
  want_pos = min(int((full_labels == 1).sum()), 32)
  assert (labels == 1).sum() == want_pos and (labels >= 0).sum() == 64
  # Non-positive anchors inside the crowd box are never sampled as negatives.
  inside = ((anchors[:, :2] >= 0) & (anchors[:, 2:] <= 60)).all(1)
  assert inside.any() and not np.any(labels[inside & (full_labels != 1)] == 0)


def test_roi_targets_equal_torchvision_when_all_sampled():
  torch = pytest.importorskip("torch")
  tv = import_torchvision()
  det = tv.models.detection
  heads = det.roi_heads.RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, (10.0, 10.0, 5.0, 5.0),
                                 0.05, 0.5, 100)
  rng = np.random.default_rng(6)
  proposals, gt = _scene(rng, num_anchors=60, num_gt=3)
  classes = np.array([4, 0, 2])
  props_t, matched_t, labels_t, deltas_t = heads.select_training_samples(
      [torch.from_numpy(proposals)],
      [{"boxes": torch.from_numpy(gt), "labels": torch.from_numpy(classes + 1)}])
  props_t, matched_t, labels_t, deltas_t = (
      x[0].numpy() for x in (props_t, matched_t, labels_t, deltas_t))
  gt_pad = np.concatenate([gt, np.zeros((2, 4), np.float32)])
  classes_pad = np.concatenate([classes, [7, 7]])
  valid = np.array([True, True, True, False, False])
  size = 80  # > 60 + 3 candidates, so every candidate is sampled, followed by padding rows
  out = jax.jit(lambda: roi_targets(proposals, gt_pad, classes_pad, valid, jax.random.key(0),
                                    batch_size_per_image=size, positive_fraction=1.0))()
  k = len(props_t)
  assert k == 63 and np.asarray(out.valid).sum() == k and not np.asarray(out.valid)[k:].any()
  np.testing.assert_allclose(np.asarray(out.boxes)[:k], props_t)
  np.testing.assert_array_equal(np.asarray(out.labels)[:k], labels_t)
  fg = labels_t > 0
  np.testing.assert_array_equal(np.asarray(out.matched_idx)[:k][fg], matched_t[fg])
  np.testing.assert_allclose(np.asarray(out.box_targets)[:k][fg], deltas_t[fg], rtol=1e-5,
                             atol=1e-4)
  assert np.all(np.asarray(out.box_targets)[:k][~fg] == 0)
  assert np.all(np.asarray(out.labels)[k:] == 0) and np.all(np.asarray(out.boxes)[k:] == 0)


def test_roi_and_rpn_targets_jit_vmap_batch():
  rng = np.random.default_rng(7)
  anchors, gt = _scene(rng, num_anchors=200, num_gt=4)
  gt_b = np.stack([gt, np.zeros_like(gt)])
  valid_b = np.array([[True] * 4, [False] * 4])  # the maximum number of gts, and none
  classes_b = np.array([[0, 1, 2, 3], [0, 0, 0, 0]])
  proposals_b = np.stack([anchors[:100], anchors[100:]])
  prop_valid_b = np.ones((2, 100), bool)
  prop_valid_b[1, 90:] = False
  keys = jax.random.split(jax.random.key(8), 2)

  def per_image(props, pv, g, c, v, key):
    k1, k2 = jax.random.split(key)
    return (rpn_targets(anchors, g, v, k1, batch_size_per_image=32),
            roi_targets(props, g, c, v, k2, proposal_valid=pv, batch_size_per_image=64))

  rpn_b, roi_b = jax.jit(jax.vmap(per_image))(proposals_b, prop_valid_b, gt_b, classes_b,
                                              valid_b, keys)
  assert rpn_b.labels.shape == (2, 200) and roi_b.boxes.shape == (2, 64, 4)
  single = jax.jit(per_image)
  for i in range(2):
    rpn_i, roi_i = single(proposals_b[i], prop_valid_b[i], gt_b[i], classes_b[i], valid_b[i],
                             keys[i])
    for got, want in zip(list(rpn_b) + list(roi_b), list(rpn_i) + list(roi_i)):
      np.testing.assert_allclose(np.asarray(got[i]), np.asarray(want), rtol=1e-5, atol=1e-5)
  # Image 0: positives exist, 16 at most for RPN, <= 16 foreground RoIs, fully sampled.
  assert 0 < (np.asarray(rpn_b.labels[0]) == 1).sum() <= 16
  assert (np.asarray(rpn_b.labels[0]) >= 0).sum() == 32
  fg0 = np.asarray(roi_b.labels[0]) > 0
  assert 4 <= fg0.sum() <= 16 and np.asarray(roi_b.valid[0]).all()
  matched0 = np.asarray(roi_b.matched_idx[0])[fg0]
  assert np.all(np.asarray(roi_b.labels[0])[fg0] == classes_b[0][matched0] + 1)
  # Image 1: no gt, so all negative; only 90 valid proposals and no appended gt.
  assert np.all(np.asarray(rpn_b.labels[1]) <= 0) and (np.asarray(rpn_b.labels[1]) == 0).sum() == 32
  assert np.all(np.asarray(roi_b.labels[1]) == 0) and np.asarray(roi_b.valid[1]).sum() == 64
  assert np.all(np.asarray(roi_b.box_targets[1]) == 0)
  sampled = np.asarray(roi_b.boxes[1])
  assert all(any(np.allclose(s, p) for p in proposals_b[1][:90]) for s in sampled)


def test_roi_targets_pads_when_few_candidates():
  gt = np.array([[10, 10, 30, 30], [0, 0, 0, 0]], np.float32)
  proposals = np.array([[10, 10, 30, 31], [50, 50, 70, 70], [11, 10, 30, 30]], np.float32)
  out = jax.jit(lambda: roi_targets(proposals, gt, np.array([5, 0]), np.array([True, False]),
                                    jax.random.key(0), batch_size_per_image=8))()
  # Candidates: 3 proposals + 1 valid gt; fg capacity int(8 * 0.25) = 2 of the 3 fg candidates.
  valid = np.asarray(out.valid)
  assert valid.sum() == 3 and not valid[3:].any()
  labels = np.asarray(out.labels)
  assert sorted(labels[:3].tolist()) == [0, 6, 6]
  assert np.allclose(np.asarray(out.boxes)[:3][labels[:3] == 0], [[50, 50, 70, 70]])


def test_targets_reject_bad_shapes():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="gt_boxes"):
    rpn_targets(np.zeros((5, 4)), np.zeros((0, 4)), np.zeros(0, bool), key)
  with pytest.raises(ValueError, match="gt_valid"):
    rpn_targets(np.zeros((5, 4)), np.zeros((2, 4)), np.zeros(3, bool), key)
  with pytest.raises(ValueError, match="gt_classes"):
    roi_targets(np.zeros((5, 4)), np.zeros((2, 4)), np.zeros(3, int), np.ones(2, bool), key)
  with pytest.raises(ValueError, match="positive_fraction"):
    sample_balanced(np.zeros(4, int), 2, 1.5, key)


def test_foreground_slots_take_all_or_an_unbiased_subset():
  """n <= slots: every foreground row, weight 1. n > slots: `slots` foreground rows, each drawn
  with probability slots / n (checked over 4000 draws) and weighted n / slots."""
  foreground = np.zeros(20, bool)
  foreground[[1, 4, 5, 9, 12, 13, 18]] = True  # n = 7
  draw = jax.jit(jax.vmap(lambda k, f: foreground_slots(f, 3, k), in_axes=(0, None)))
  rows, taken, weights = map(np.asarray, draw(jax.random.split(jax.random.key(0), 4000),
                                              foreground))
  assert rows.shape == (4000, 3) and taken.all() and foreground[rows].all()
  np.testing.assert_allclose(weights, 7 / 3, rtol=1e-6)
  assert all(len(set(r)) == 3 for r in rows[:200])  # no row twice
  frequency = np.bincount(rows.ravel(), minlength=20) / 4000
  np.testing.assert_allclose(frequency[foreground], 3 / 7, atol=0.03)
  assert not frequency[~foreground].any()

  few = np.zeros(20, bool)
  few[[2, 17]] = True
  rows, taken, weights = map(np.asarray, draw(jax.random.split(jax.random.key(1), 5), few))
  for r, t, w in zip(rows, taken, weights):
    assert set(r[t]) == {2, 17} and t.sum() == 2 and not few[r[~t]].any()
    np.testing.assert_array_equal(w, np.where(t, 1.0, 0.0))
  rows, taken, weights = foreground_slots(np.zeros(5, bool), 8, jax.random.key(2))
  assert rows.shape == (5,) and not np.asarray(taken).any() and not np.asarray(weights).any()
  with pytest.raises(ValueError, match="slots"):
    foreground_slots(few, 0, jax.random.key(0))
