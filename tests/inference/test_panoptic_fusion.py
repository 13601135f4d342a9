"""Panoptic fusion (detectron2's heuristic, UPSNet's parameter-free head) and the COCO
panoptic writer, against plain-python references written here and pq_compute."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image

from segjax.inference import panoptic
from segjax.metrics import pq_compute
from segjax.metrics.panoptic import read_id_png


def reference_heuristic(masks, scores, valid, stuff_labels, num_stuff, overlap_threshold,
                        stuff_area_threshold, score_threshold):
  """detectron2's combine_semantic_and_instance_outputs, one pixel set at a time, with
  segjax's id convention (slot i -> i + 1, stuff label l >= 1 -> D + l)."""
  num = len(scores)
  segment_map = np.zeros(stuff_labels.shape, np.int32)
  kept = np.zeros(num, bool)
  for slot in sorted((i for i in range(num) if valid[i]), key=lambda i: -scores[i]):
    if scores[slot] < score_threshold:
      break
    mask = masks[slot]
    area = int(mask.sum())
    if area == 0:
      continue
    if (mask & (segment_map > 0)).sum() / area > overlap_threshold:
      continue
    segment_map[mask & (segment_map == 0)] = slot + 1
    kept[slot] = True
  kept_stuff = np.zeros(num_stuff, bool)
  for label in np.unique(stuff_labels):
    if label < 1 or label > num_stuff:
      continue
    region = (stuff_labels == label) & (segment_map == 0)
    if region.sum() < stuff_area_threshold:
      continue
    segment_map[region] = num + label
    kept_stuff[label - 1] = True
  return segment_map, kept, kept_stuff


def fuse(masks, scores, valid, stuff_labels, num_stuff, **kwargs):
  out = panoptic.heuristic_fusion(jnp.asarray(masks), jnp.asarray(scores, jnp.float32),
                                  jnp.asarray(valid), jnp.asarray(stuff_labels),
                                  num_stuff=num_stuff, **kwargs)
  return tuple(np.asarray(x) for x in out)


def row_masks(height, width, row_ranges):
  masks = np.zeros((len(row_ranges), height, width), bool)
  for i, (start, stop) in enumerate(row_ranges):
    masks[i, start:stop] = True
  return masks


def test_heuristic_overlap_rule():
  # A takes rows 0-9; B has 120 of its 160 pixels taken (0.75): dropped; C 40 of 160 (0.25):
  # takes rows 10-15 only; D exactly half (40 of 80): kept (the rule drops > 0.5).
  masks = row_masks(20, 20, [(0, 10), (4, 12), (8, 16), (14, 18)])
  segment_map, kept, _ = fuse(masks, [0.9, 0.8, 0.7, 0.6], [True] * 4,
                              np.zeros((20, 20), np.int32), 0)
  expected = np.zeros((20, 20), np.int32)
  expected[0:10], expected[10:16], expected[16:18] = 1, 3, 4
  np.testing.assert_array_equal(segment_map, expected)
  np.testing.assert_array_equal(kept, [True, False, True, True])


def test_heuristic_sorts_by_score_and_skips_empty_masks():
  # Slot order is not score order; the empty mask is skipped without blocking anything.
  masks = row_masks(16, 16, [(0, 8), (0, 0), (4, 12)])
  segment_map, kept, _ = fuse(masks, [0.6, 0.95, 0.9], [True] * 3,
                              np.zeros((16, 16), np.int32), 0)
  expected = np.zeros((16, 16), np.int32)
  expected[4:12], expected[0:4] = 3, 1
  np.testing.assert_array_equal(segment_map, expected)
  np.testing.assert_array_equal(kept, [True, False, True])


def test_heuristic_stops_at_score_threshold_and_ignores_invalid_rows():
  # Slot 1 (0.49) covers free pixels but is below the threshold; slot 2 sits exactly on it
  # and is added; the invalid slot 3 with the best score covers everything and is ignored.
  masks = row_masks(16, 16, [(0, 4), (4, 8), (8, 12), (0, 16)])
  segment_map, kept, _ = fuse(masks, [0.9, 0.49, 0.5, 0.99], [True, True, True, False],
                              np.zeros((16, 16), np.int32), 0)
  expected = np.zeros((16, 16), np.int32)
  expected[0:4], expected[8:12] = 1, 3
  np.testing.assert_array_equal(segment_map, expected)
  np.testing.assert_array_equal(kept, [True, False, True, False])


def test_heuristic_stuff_area_limit():
  # Stuff 1 (left half) keeps exactly the limit of 30 free pixels, stuff 2 (right half)
  # one fewer; label 0 ("things") never becomes stuff.
  height, width, limit = 20, 20, 30
  labels = np.zeros((height, width), np.int32)
  labels[:, :10], labels[:, 10:] = 1, 2
  labels[19, :] = 0
  masks = np.zeros((2, height, width), bool)
  masks[0, :, :10] = True
  masks[0].reshape(-1)[np.flatnonzero(labels.reshape(-1) == 1)[:limit]] = False
  masks[1, :, 10:] = True
  masks[1].reshape(-1)[np.flatnonzero(labels.reshape(-1) == 2)[:limit - 1]] = False
  masks[:, 19, :] = False
  segment_map, kept, kept_stuff = fuse(masks, [0.9, 0.8], [True, True], labels, 2,
                                       stuff_area_threshold=limit)
  np.testing.assert_array_equal(kept_stuff, [True, False])
  np.testing.assert_array_equal(kept, [True, True])
  assert (segment_map == 2 + 1).sum() == limit
  assert not (segment_map == 2 + 2).any()
  np.testing.assert_array_equal(segment_map[19], 0)
  np.testing.assert_array_equal(segment_map[masks[0]], 1)


def random_heuristic_inputs(rng, num=8, height=24, width=32, num_stuff=3):
  levels = np.array([0.0, 0.2, 0.5, 0.7, 0.9], np.float32)
  masks = np.zeros((num, height, width), np.float32)
  for i in range(num):
    if rng.random() < 0.15:
      continue  # An empty mask.
    y0, x0 = rng.integers(0, height - 2), rng.integers(0, width - 2)
    y1, x1 = rng.integers(y0 + 1, height + 1), rng.integers(x0 + 1, width + 1)
    masks[i, y0:y1, x0:x1] = levels[rng.integers(1, len(levels), (y1 - y0, x1 - x0))]
  scores = rng.uniform(0.3, 1.0, num).astype(np.float32)
  scores[rng.integers(num)] = 0.5
  valid = rng.random(num) < 0.8
  coarse = rng.integers(0, num_stuff + 2, (4, 4))  # num_stuff + 1: a label that is no stuff.
  labels = np.kron(coarse, np.ones((height // 4, width // 4), np.int64)).astype(np.int32)
  return masks, scores, valid, labels


@pytest.mark.parametrize("seed", range(6))
def test_heuristic_matches_reference_on_random_inputs(seed):
  rng = np.random.default_rng(seed)
  masks, scores, valid, labels = random_heuristic_inputs(rng)
  settings = dict(overlap_threshold=0.5, stuff_area_threshold=40,
                  instance_score_threshold=0.5)
  expected = reference_heuristic(masks >= 0.5, scores, valid, labels, 3,
                                 settings["overlap_threshold"],
                                 settings["stuff_area_threshold"],
                                 settings["instance_score_threshold"])
  actual = fuse(masks, scores, valid, labels, 3, **settings)
  for a, e in zip(actual, expected):
    np.testing.assert_array_equal(a, e)
  # Bool masks give the same result as probabilities.
  for a, e in zip(fuse(masks >= 0.5, scores, valid, labels, 3, **settings), expected):
    np.testing.assert_array_equal(a, e)


def test_heuristic_jit_and_vmap():
  rng = np.random.default_rng(11)
  batch = [random_heuristic_inputs(rng) for _ in range(3)]
  stacked = [jnp.asarray(np.stack(x)) for x in zip(*batch)]
  fn = jax.jit(jax.vmap(lambda m, s, v, l: panoptic.heuristic_fusion(
      m, s, v, l, num_stuff=3, stuff_area_threshold=40)))
  out = fn(*stacked)
  for b, inputs in enumerate(batch):
    expected = reference_heuristic(inputs[0] >= 0.5, *inputs[1:], 3, 0.5, 40, 0.5)
    for a, e in zip(out, expected):
      np.testing.assert_array_equal(np.asarray(a[b]), e)


def test_heuristic_rejects_bad_shapes():
  with pytest.raises(ValueError, match="stuff_labels"):
    panoptic.heuristic_fusion(jnp.zeros((2, 8, 8)), jnp.zeros(2), jnp.ones(2, bool),
                              jnp.zeros((8, 9), jnp.int32), num_stuff=1)


def reference_upsnet(semantic, mask_logits, boxes, classes, valid, thing_channels,
                     stuff_channels, unknown):
  """UPSNet's panoptic logits pixel by pixel, with -inf outside boxes (numpy, float64)."""
  height, width, _ = semantic.shape
  num = len(classes)
  logits = np.full((height, width, len(stuff_channels) + num + int(unknown)), -np.inf)
  logits[..., :len(stuff_channels)] = semantic[..., stuff_channels]
  cropped = np.zeros((num, height, width))
  for i in range(num):
    x0, y0 = int(np.floor(boxes[i, 0])), int(np.floor(boxes[i, 1]))
    x1, y1 = int(np.round(boxes[i, 2])), int(np.round(boxes[i, 3]))
    x0, y0 = max(x0, 0), max(y0, 0)
    if not valid[i] or x1 <= x0 or y1 <= y0:
      continue
    channel = thing_channels[classes[i]]
    logits[y0:y1, x0:x1, len(stuff_channels) + i] = (mask_logits[i, y0:y1, x0:x1]
                                                     + semantic[y0:y1, x0:x1, channel])
    cropped[i, y0:y1, x0:x1] = semantic[y0:y1, x0:x1, channel]
  if unknown:
    explained = cropped[valid].max(axis=0) if valid.any() else np.zeros((height, width))
    logits[..., -1] = semantic[..., thing_channels].max(axis=-1) - explained
  best = logits.max(axis=-1, keepdims=True)
  probabilities = np.exp(logits - best)
  probabilities /= probabilities.sum(axis=-1, keepdims=True)
  winner = logits.argmax(axis=-1)
  num_stuff = len(stuff_channels)
  segment_map = np.where(winner < num_stuff, num + 1 + winner,
                         np.where(winner < num_stuff + num, winner - num_stuff + 1, 0))
  return segment_map, probabilities


def random_upsnet_inputs(rng, num=5, height=20, width=28, channels=7):
  semantic = rng.normal(0, 2, (height, width, channels)).astype(np.float32)
  mask_logits = rng.normal(0, 3, (num, height, width)).astype(np.float32)
  x0 = rng.uniform(-2, width - 4, num)
  y0 = rng.uniform(-2, height - 4, num)
  boxes = np.stack([x0, y0, x0 + rng.uniform(2, 12, num), y0 + rng.uniform(2, 12, num)],
                   -1).astype(np.float32)
  classes = rng.integers(0, 3, num)
  valid = rng.random(num) < 0.8
  return semantic, mask_logits, boxes, classes, valid


THINGS, STUFF = (4, 1, 6), (0, 2, 3)


@pytest.mark.parametrize("seed,unknown", [(0, False), (1, True), (2, False), (3, True)])
def test_parameter_free_matches_reference(seed, unknown):
  rng = np.random.default_rng(seed)
  inputs = random_upsnet_inputs(rng)
  expected_map, expected_prob = reference_upsnet(*inputs, list(THINGS), list(STUFF), unknown)
  segment_map, probabilities = panoptic.parameter_free_fusion(
      *inputs, thing_channels=THINGS, stuff_channels=STUFF, unknown=unknown)
  np.testing.assert_array_equal(np.asarray(segment_map), expected_map)
  np.testing.assert_allclose(np.asarray(probabilities), expected_prob, atol=1e-6)


@pytest.mark.parametrize("valid", [[True], [False, False]])
def test_parameter_free_unknown_with_one_or_no_valid_instance(valid):
  # One instance: inside its box the max over instances is its (often negative) cropped
  # logit, not 0. None valid: the max is UPSNet's 0.
  rng = np.random.default_rng(21)
  semantic, mask_logits, boxes, classes, _ = random_upsnet_inputs(rng, num=len(valid))
  boxes[0] = [3.2, 2.7, 19.5, 15.1]
  valid = np.array(valid)
  expected_map, expected_prob = reference_upsnet(semantic, mask_logits, boxes, classes, valid,
                                                 list(THINGS), list(STUFF), True)
  segment_map, probabilities = panoptic.parameter_free_fusion(
      semantic, mask_logits, boxes, classes, valid, thing_channels=THINGS,
      stuff_channels=STUFF, unknown=True)
  np.testing.assert_array_equal(np.asarray(segment_map), expected_map)
  np.testing.assert_allclose(np.asarray(probabilities), expected_prob, atol=1e-6)
  assert (expected_map == 0).any()


def test_parameter_free_every_pixel_one_segment():
  rng = np.random.default_rng(5)
  semantic, mask_logits, boxes, classes, valid = random_upsnet_inputs(rng, num=6)
  segment_map, probabilities = panoptic.parameter_free_fusion(
      semantic, mask_logits, boxes, classes, valid, thing_channels=THINGS,
      stuff_channels=STUFF)
  segment_map, probabilities = np.asarray(segment_map), np.asarray(probabilities)
  num, num_stuff = len(classes), len(STUFF)
  np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
  # Each pixel's id is its most probable channel's, never void (there are stuff channels).
  winner = probabilities.argmax(-1)
  ids = np.where(winner < num_stuff, num + 1 + winner, winner - num_stuff + 1)
  np.testing.assert_array_equal(segment_map, ids)
  assert segment_map.min() >= 1 and segment_map.max() <= num + num_stuff
  rows, cols = np.mgrid[:segment_map.shape[0], :segment_map.shape[1]]
  for i in range(num):
    pixels = segment_map == i + 1
    if not valid[i]:
      assert not pixels.any() and not probabilities[..., num_stuff + i].any()
      continue
    x0, y0 = np.floor(boxes[i, :2])
    x1, y1 = np.round(boxes[i, 2:])
    assert ((cols[pixels] >= x0) & (cols[pixels] < x1) & (rows[pixels] >= y0)
            & (rows[pixels] < y1)).all()


def hand_built_upsnet():
  """16x16, stuff channels (0, 1), thing channels (2, 3), slots: 2 instances + 1 invalid."""
  semantic = np.zeros((16, 16, 4), np.float32)
  semantic[:8, :, 0] = 2.0  # Stuff 0 on top,
  semantic[8:, :, 1] = 2.0  # stuff 1 below.
  semantic[..., 3] = 1.0
  semantic[12:, :4, 2] = 10.0  # A thing no detection explains.
  mask_logits = np.zeros((3, 16, 16), np.float32)
  mask_logits[0, 2:5, 2:6] = 5.0
  mask_logits[0, 5, 2:6] = -5.0
  mask_logits[1] = 3.0  # Also outside its box, where it must not count.
  mask_logits[2] = 100.0
  # Slot 1's box: columns floor(9.6) = 9 .. round(13.5) = 14 (half to even) exclusive,
  # rows 9 .. round(14.5) = 14 exclusive.
  boxes = np.array([[2, 2, 6, 6], [9.6, 9.4, 13.5, 14.5], [0, 0, 16, 16]], np.float32)
  classes = np.array([0, 1, 1])
  valid = np.array([True, True, False])
  expected = np.zeros((16, 16), np.int32)
  expected[:8], expected[8:] = 3 + 1 + 0, 3 + 1 + 1
  expected[2:5, 2:6] = 1  # 5 + 0 beats stuff 0's 2; row 5 (-5) goes to stuff.
  expected[9:14, 9:14] = 2  # 3 + 1 beats stuff 1's 2.
  return (semantic, mask_logits, boxes, classes, valid), expected


def test_parameter_free_hand_built_example():
  inputs, expected = hand_built_upsnet()
  segment_map, probabilities = panoptic.parameter_free_fusion(
      *inputs, thing_channels=(2, 3), stuff_channels=(0, 1))
  np.testing.assert_array_equal(np.asarray(segment_map), expected)
  assert probabilities.shape == (16, 16, 2 + 3)
  # Inside slot 1's box: softmax over stuff (2, 2 at rows >= 8 / 2, 0 above) and 3 + 1.
  np.testing.assert_allclose(np.asarray(probabilities)[10, 10],
                             np.exp([0, 2, -np.inf, 4, -np.inf])
                             / np.exp([0, 2, 4]).sum(), rtol=1e-6)
  # With unknown: only the unexplained thing region (logit 10 - 0) becomes void; elsewhere
  # unknown is at most 1 - 0 and loses.
  segment_map, probabilities = panoptic.parameter_free_fusion(
      *inputs, thing_channels=(2, 3), stuff_channels=(0, 1), unknown=True)
  expected_unknown = expected.copy()
  expected_unknown[12:, :4] = 0
  np.testing.assert_array_equal(np.asarray(segment_map), expected_unknown)
  assert probabilities.shape == (16, 16, 2 + 3 + 1)


def test_parameter_free_void_only_where_no_channel_applies():
  inputs, _ = hand_built_upsnet()
  segment_map, probabilities = panoptic.parameter_free_fusion(
      *inputs, thing_channels=(2, 3), stuff_channels=())
  expected = np.zeros((16, 16), np.int32)
  expected[2:6, 2:6] = 1
  expected[9:14, 9:14] = 2
  np.testing.assert_array_equal(np.asarray(segment_map), expected)
  np.testing.assert_array_equal(np.asarray(probabilities).sum(-1), expected > 0)


def test_parameter_free_jit_and_vmap():
  rng = np.random.default_rng(8)
  batch = [random_upsnet_inputs(rng) for _ in range(2)]
  stacked = [jnp.asarray(np.stack(x)) for x in zip(*batch)]
  fn = jax.jit(jax.vmap(lambda *a: panoptic.parameter_free_fusion(
      *a, thing_channels=THINGS, stuff_channels=STUFF, unknown=True)))
  maps, probabilities = fn(*stacked)
  for b, inputs in enumerate(batch):
    expected_map, expected_prob = reference_upsnet(*inputs, list(THINGS), list(STUFF), True)
    np.testing.assert_array_equal(np.asarray(maps[b]), expected_map)
    np.testing.assert_allclose(np.asarray(probabilities[b]), expected_prob, atol=1e-6)


def test_parameter_free_rejects_bad_channels():
  inputs, _ = hand_built_upsnet()
  with pytest.raises(ValueError, match="share channels"):
    panoptic.parameter_free_fusion(*inputs, thing_channels=(1, 3), stuff_channels=(0, 1))
  with pytest.raises(ValueError, match="stuff_channels"):
    panoptic.parameter_free_fusion(*inputs, thing_channels=(2, 3), stuff_channels=(0, 4))


# Writer + PQ: a ground truth written here by hand (PIL, id = R + 256 G + 256^2 B).
THING_IDS, STUFF_IDS = (1, 2), (10, 11)
CATEGORIES = [{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b", "isthing": 1},
              {"id": 10, "name": "s", "isthing": 0}, {"id": 11, "name": "t", "isthing": 0}]


def ground_truth():
  """32x48 map: stuff 10 on top, 11 below, one thing of class 1 and two of class 2."""
  gt_ids = np.zeros((32, 48), np.int64)
  gt_ids[:16], gt_ids[16:] = 5, 70000
  instances = [((4, 12, 4, 16), 0, 300), ((18, 28, 20, 30), 1, 7),
               ((18, 28, 32, 44), 1, 131072 + 9)]
  masks = np.zeros((len(instances), 32, 48), bool)
  for i, ((y0, y1, x0, x1), _, segment_id) in enumerate(instances):
    masks[i, y0:y1, x0:x1] = True
    gt_ids[masks[i]] = segment_id
  segments = [{"id": 5, "category_id": 10, "iscrowd": 0},
              {"id": 70000, "category_id": 11, "iscrowd": 0}]
  segments += [{"id": sid, "category_id": THING_IDS[c], "iscrowd": 0}
               for _, c, sid in instances]
  for segment in segments:
    segment["area"] = int((gt_ids == segment["id"]).sum())
  classes = np.array([c for _, c, _ in instances])
  return gt_ids, segments, masks, classes


def write_gt(root, gt_ids, segments):
  os.makedirs(os.path.join(root, "gt"))
  rgb = np.stack([gt_ids % 256, gt_ids // 256 % 256, gt_ids // 65536], -1).astype(np.uint8)
  Image.fromarray(rgb).save(os.path.join(root, "gt", "img.png"))
  path = os.path.join(root, "gt.json")
  with open(path, "w") as f:
    json.dump({"annotations": [{"image_id": 3, "file_name": "img.png",
                                "segments_info": segments}], "categories": CATEGORIES}, f)
  return path


def write_prediction(root, name, segment_map, classes, scores):
  png, segments_info = panoptic.to_coco_panoptic(segment_map, classes,
                                                 thing_category_ids=THING_IDS,
                                                 stuff_category_ids=STUFF_IDS, scores=scores)
  annotation = panoptic.write_coco_panoptic(os.path.join(root, name), "img.png", png,
                                            segments_info, image_id=3)
  path = os.path.join(root, f"{name}.json")
  with open(path, "w") as f:
    json.dump({"annotations": [annotation]}, f)
  return path, segments_info


def test_writer_and_pq(tmp_path):
  root = str(tmp_path)
  gt_ids, gt_segments, gt_masks, gt_classes = ground_truth()
  gt_json = write_gt(root, gt_ids, gt_segments)
  # Predict by fusing the ground truth's own instances (plus a padding slot) and stuff.
  num = len(gt_classes) + 1
  masks = np.concatenate([gt_masks, np.ones((1, 32, 48), bool)]).astype(np.float32)
  scores = np.array([0.9, 0.8, 0.7, 0.95], np.float32)
  valid = np.array([True, True, True, False])
  classes = np.append(gt_classes, 0)
  stuff_labels = np.where(gt_ids == 5, 1, np.where(gt_ids == 70000, 2, 0))
  segment_map, _, kept_stuff = fuse(masks, scores, valid, stuff_labels, 2,
                                    stuff_area_threshold=16)
  assert kept_stuff.all()
  pred_json, segments_info = write_prediction(root, "pred", segment_map, classes, scores)

  assert [s["id"] for s in segments_info] == [1, 2, 3, num + 1, num + 2]
  np.testing.assert_array_equal(read_id_png(os.path.join(root, "pred", "img.png")),
                                segment_map)
  for segment in segments_info:
    mask = np.asfortranarray((segment_map == segment["id"]).astype(np.uint8))
    rle = mask_util.encode(mask)
    assert segment["area"] == int(mask_util.area(rle))
    np.testing.assert_array_equal(segment["bbox"], mask_util.toBbox(rle))
    assert segment["iscrowd"] == 0
    assert segment["isthing"] == (segment["id"] <= num)
    if segment["isthing"]:
      assert segment["category_id"] == THING_IDS[gt_classes[segment["id"] - 1]]
      assert segment["score"] == pytest.approx(scores[segment["id"] - 1])
    else:
      assert segment["category_id"] == STUFF_IDS[segment["id"] - num - 1]
      assert "score" not in segment

  result = pq_compute(gt_json, pred_json, num_workers=1)
  assert result["All"]["pq"] == 1.0 and result["All"]["n"] == 4

  # Dropping the second class-2 instance: one FN in class 2, PQ 1 / (1 + 0.5) there.
  segment_map = np.where(segment_map == 3, 0, segment_map)
  pred_json, segments_info = write_prediction(root, "pred_missing", segment_map, classes,
                                              scores)
  assert 3 not in [s["id"] for s in segments_info]
  result = pq_compute(gt_json, pred_json, num_workers=1)
  assert result["per_class"][2]["pq"] == pytest.approx(2 / 3)
  assert result["All"]["pq"] == pytest.approx((3 + 2 / 3) / 4)


def test_writer_rejects_bad_input(tmp_path):
  with pytest.raises(ValueError, match=r"\[0, D \+ S\]"):
    panoptic.to_coco_panoptic(np.full((4, 4), 9), np.zeros(2, int), thing_category_ids=(1,),
                              stuff_category_ids=(10, 11))
  with pytest.raises(ValueError, match="thing class"):
    panoptic.to_coco_panoptic(np.ones((4, 4), int), np.array([3]), thing_category_ids=(1,),
                              stuff_category_ids=())
  with pytest.raises(ValueError, match=".png"):
    panoptic.write_coco_panoptic(str(tmp_path), "img.jpg", np.zeros((4, 4, 3), np.uint8), [],
                                 image_id=1)
