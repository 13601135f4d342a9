"""COCO AP: segjax.metrics.coco against pycocotools' COCOeval run directly."""
import contextlib
import copy
import io
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segjax.data import coco_masks
from segjax.metrics import coco

# (COCO id, name); "boat" has no ground truth. Training ids are the positions.
CATEGORIES = ((1, "cat"), (3, "dog"), (7, "car"), (9, "boat"))
CATEGORY_IDS = [cid for cid, _ in CATEGORIES]
# image id -> (height, width); image 13 has no annotations.
IMAGES = {10: (120, 130), 11: (40, 50), 12: (64, 48), 13: (30, 30)}
PAD = (128, 136)  # padded mask size of the batches
SLOTS = 16  # detections per image in a batch


def _ellipse(h, w, cy, cx, ry, rx):
  y, x = np.mgrid[:h, :w]
  return (((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1).astype(np.uint8)


def _ground_truth():
  """A COCO instances dict: polygons, compressed and uncompressed RLE, a crowd
  region, small / medium / large objects, non-contiguous category ids."""
  anns = []

  def add(image_id, category_id, segmentation, iscrowd=0):
    h, w = IMAGES[image_id]
    if isinstance(segmentation, list):
      rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, h, w))
    elif isinstance(segmentation["counts"], list):
      rle = coco_mask.frPyObjects(segmentation, h, w)
    else:
      rle = dict(segmentation, counts=segmentation["counts"].encode())
    anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": category_id,
                 "segmentation": segmentation, "area": float(coco_mask.area(rle)),
                 "bbox": coco_mask.toBbox(rle).tolist(), "iscrowd": iscrowd})

  def compressed(mask):
    rle = coco_mask.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}

  def uncompressed(mask):
    return {"size": list(mask.shape), "counts": coco_masks.encode_counts(mask)}

  add(10, 1, [[5.0, 8.0, 110.0, 10.0, 105.0, 112.0, 12.0, 100.0]])  # large
  add(10, 3, compressed(_ellipse(120, 130, 60, 118, 9, 7)))  # small
  add(10, 3, [[60.0, 20.0, 85.0, 20.0, 85.0, 60.0, 60.0, 60.0]])  # medium, inside the cat
  add(10, 7, uncompressed(_ellipse(120, 130, 112, 30, 6, 25)), iscrowd=1)
  add(11, 7, [[2.0, 2.0, 30.0, 3.0, 28.0, 25.0], [33.0, 20.0, 47.0, 20.0, 40.0, 37.0]])
  add(11, 1, compressed(_ellipse(40, 50, 30, 12, 6, 8)))  # small
  add(11, 7, compressed(_ellipse(40, 50, 10, 40, 5, 6)))  # small
  add(12, 3, compressed(_ellipse(64, 48, 32, 24, 25, 18)))  # medium
  add(12, 1, [[3.0, 50.0, 15.0, 50.0, 15.0, 60.0, 3.0, 60.0]])  # small
  images = [{"id": i, "height": h, "width": w, "file_name": f"{i}.jpg"}
            for i, (h, w) in IMAGES.items()]
  return {"images": images, "annotations": anns,
          "categories": [{"id": cid, "name": name} for cid, name in CATEGORIES]}


@pytest.fixture(scope="module")
def gt_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("coco") / "instances.json"
  path.write_text(json.dumps(_ground_truth()))
  return str(path)


def _quiet_coco(path):
  with contextlib.redirect_stdout(io.StringIO()):
    return COCO(path)


def _empty_batch():
  batch = len(IMAGES)
  return {"image_ids": np.array(list(IMAGES)), "boxes": np.zeros((batch, SLOTS, 4), np.float32),
          "scores": np.zeros((batch, SLOTS), np.float32),
          "classes": np.full((batch, SLOTS), -1, np.int32),
          "masks": np.zeros((batch, SLOTS) + PAD, np.float32),
          "valid": np.zeros((batch, SLOTS), bool),
          "image_sizes": np.array(list(IMAGES.values()))}


def _random_detections(gt_path, seed=0):
  """Batched detections: shifted / grown copies of the ground truth (some with a
  wrong class), false positives, soft masks, padded rows with garbage."""
  rng = np.random.default_rng(seed)
  gt = _quiet_coco(gt_path)
  out = _empty_batch()
  for b, image_id in enumerate(IMAGES):
    h, w = IMAGES[image_id]
    slot = 0
    for ann in gt.loadAnns(gt.getAnnIds(imgIds=image_id)):
      if ann["iscrowd"] or slot == SLOTS - 2:
        continue
      mask = np.roll(gt.annToMask(ann), rng.integers(-3, 4, 2), axis=(0, 1))
      if rng.random() < 0.5:
        mask = np.maximum(mask, np.roll(mask, 2, axis=1))
      label = CATEGORY_IDS.index(ann["category_id"])
      if rng.random() < 0.2:
        label = int(rng.integers(0, len(CATEGORY_IDS)))
      x, y, bw, bh = ann["bbox"]
      out["boxes"][b, slot] = np.array([x, y, x + bw, y + bh]) + rng.uniform(-3, 3, 4)
      out["masks"][b, slot, :h, :w] = mask * 0.7 + rng.uniform(0, 0.45, (h, w))
      out["classes"][b, slot] = label
      out["scores"][b, slot] = rng.uniform(0.3, 0.9)
      out["valid"][b, slot] = True
      slot += 1
    # False positives; in the first image over 10 cats, so maxDets 10 and 100 differ.
    for fp in range(13 if b == 0 else 2):
      cy, cx = rng.uniform(0, h), rng.uniform(0, w)
      ry, rx = rng.uniform(2, h / 3), rng.uniform(2, w / 3)
      out["boxes"][b, slot] = [cx - rx, cy - ry, cx + rx, cy + ry]
      out["masks"][b, slot, :h, :w] = _ellipse(h, w, cy, cx, ry, rx)
      out["classes"][b, slot] = 0 if fp > 1 else rng.integers(0, len(CATEGORY_IDS))
      out["scores"][b, slot] = rng.uniform(0.0, 0.8) if fp < 2 else rng.uniform(0.9, 1.0)
      out["valid"][b, slot] = True
      slot += 1
    # Padding beyond the image must be cropped away by image_sizes.
    out["masks"][b, :, h:, :] = 1.0
    out["masks"][b, :, :, w:] = 1.0
  return out


def _summary(stats):
  return [float(s) if s >= 0 else math.nan for s in stats]


def _assert_same(got, expected):
  """Equal summaries and per-class APs, nan included."""
  keys = sorted(expected["per_class"])
  assert sorted(got["per_class"]) == keys
  np.testing.assert_array_equal([got[k] for k in coco.SUMMARY_KEYS],
                                [expected[k] for k in coco.SUMMARY_KEYS])
  np.testing.assert_array_equal([got["per_class"][k] for k in keys],
                                [expected["per_class"][k] for k in keys])


def _reference(gt_path, results, iou_type, category_ids=None):
  """pycocotools run directly: COCOeval.stats (-1 -> nan). For segm the results
  carry no bbox, as in COCO's segm results format."""
  gt = _quiet_coco(gt_path)
  results = copy.deepcopy(results)
  if iou_type == "segm":
    for r in results:
      del r["bbox"]
  with contextlib.redirect_stdout(io.StringIO()):
    evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
    if category_ids is not None:
      evaluator.params.catIds = category_ids
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return _summary(evaluator.stats)


def test_evaluate_equals_cocoeval_directly(gt_path):
  dets = _random_detections(gt_path)
  results = coco.to_coco_results(**dets, category_ids=CATEGORY_IDS)
  ours = coco.coco_evaluate(gt_path, results)
  assert set(ours) == {"bbox", "segm"}
  for iou_type in ("bbox", "segm"):
    expected = _reference(gt_path, results, iou_type)
    got = [ours[iou_type][key] for key in coco.SUMMARY_KEYS]
    np.testing.assert_allclose(got, expected, rtol=1e-12, err_msg=iou_type)
    assert 0.05 < ours[iou_type]["AP"] < 0.95  # a non-trivial case
    assert ours[iou_type]["AR10"] < ours[iou_type]["AR100"]
    # Per-class AP equals COCOeval's AP restricted to that one category.
    for cid, name in CATEGORIES:
      single = _reference(gt_path, results, iou_type, category_ids=[cid])[0]
      np.testing.assert_allclose(ours[iou_type]["per_class"][name], single, rtol=1e-12,
                                 err_msg=f"{iou_type} {name}")
    assert math.isnan(ours[iou_type]["per_class"]["boat"])
  assert ours["bbox"]["AP"] != ours["segm"]["AP"]
  # The same ground truth given as a dict or a COCO object.
  with open(gt_path) as f:
    as_dict = coco.coco_evaluate(json.load(f), results, ("segm",))
  as_coco = coco.coco_evaluate(_quiet_coco(gt_path), results, ("segm",))
  _assert_same(as_dict["segm"], ours["segm"])
  _assert_same(as_coco["segm"], ours["segm"])

def test_to_coco_results_fields():
  boxes = np.array([[[1, 2, 11, 22], [0, 0, 5, 5], [3.5, 4.5, 4.0, 9.0]],
                    [[10, 20, 30, 60], [7, 7, 8, 8], [0, 0, 1, 1]]], np.float32)
  scores = np.array([[0.9, 0.5, 0.25], [0.75, 0.1, 0.2]], np.float32)
  classes = np.array([[2, -1, 0], [1, 99, 2]])
  valid = np.array([[True, False, True], [True, False, True]])
  results = coco.to_coco_results(jnp.array([5, 8]), jnp.asarray(boxes), scores, classes,
                                 valid=valid, category_ids=[90, 2, 17])
  assert results == [
      {"image_id": 5, "category_id": 17, "bbox": [1.0, 2.0, 10.0, 20.0],
       "score": pytest.approx(0.9)},
      {"image_id": 5, "category_id": 90, "bbox": [3.5, 4.5, 0.5, 4.5],
       "score": pytest.approx(0.25)},
      {"image_id": 8, "category_id": 2, "bbox": [10.0, 20.0, 20.0, 40.0],
       "score": pytest.approx(0.75)},
      {"image_id": 8, "category_id": 17, "bbox": [0.0, 0.0, 1.0, 1.0],
       "score": pytest.approx(0.2)}]
  for r in results:  # plain Python numbers, so the list dumps to JSON
    assert type(r["image_id"]) is type(r["category_id"]) is int and type(r["score"]) is float
    assert all(type(v) is float for v in r["bbox"])
  # valid=None keeps every row.
  assert len(coco.to_coco_results([5, 8], boxes, scores, np.zeros((2, 3), int),
                                  category_ids=[1])) == 6


def test_masks_round_trip_through_rle():
  rng = np.random.default_rng(3)
  masks = rng.uniform(0, 1, (2, 3, 20, 24)).astype(np.float32)
  masks[0, 0, 0, 0] = 0.5  # the threshold itself is foreground
  masks[1, 2] = 0.0  # an empty mask
  masks[1, 1] = 1.0  # a full one
  sizes = np.array([[20, 24], [13, 17]])
  valid = np.array([[True, False, True], [True, True, True]])
  results = coco.to_coco_results(
      np.array([1, 2]), np.zeros((2, 3, 4)), np.ones((2, 3)), np.zeros((2, 3), np.int32),
      jnp.asarray(masks), valid, category_ids=[4], image_sizes=sizes)
  rows = [(b, k) for b in range(2) for k in range(3) if valid[b, k]]
  assert len(results) == len(rows)
  for (b, k), result in zip(rows, results):
    h, w = sizes[b]
    expected = (masks[b, k, :h, :w] >= 0.5).astype(np.uint8)
    seg = result["segmentation"]
    assert isinstance(seg["counts"], str) and seg["size"] == [h, w]
    decoded = coco_mask.decode({"size": seg["size"], "counts": seg["counts"].encode()})
    np.testing.assert_array_equal(decoded, expected)
    assert seg["counts"] == coco_masks.encode_rle(expected)["counts"]
  # Binary masks and a different threshold.
  binary = (masks > 0.8).astype(np.uint8)
  high = coco.to_coco_results(np.array([1, 2]), np.zeros((2, 3, 4)), np.ones((2, 3)),
                              np.zeros((2, 3), np.int32), binary, category_ids=[4])
  soft = coco.to_coco_results(np.array([1, 2]), np.zeros((2, 3, 4)), np.ones((2, 3)),
                              np.zeros((2, 3), np.int32), masks, category_ids=[4],
                              mask_threshold=0.8000001)
  assert [r["segmentation"] for r in high] == [r["segmentation"] for r in soft]


def test_to_coco_results_rejects_bad_input():
  ids, boxes, scores = np.array([1]), np.zeros((1, 2, 4)), np.ones((1, 2))
  with pytest.raises(ValueError, match="outside the 2 training ids"):
    coco.to_coco_results(ids, boxes, scores, np.array([[0, 2]]), category_ids=[1, 2])
  with pytest.raises(ValueError, match="scores has shape"):
    coco.to_coco_results(ids, boxes, np.ones((1, 3)), np.zeros((1, 2), int), category_ids=[1])
  with pytest.raises(ValueError, match="masks has shape"):
    coco.to_coco_results(ids, boxes, scores, np.zeros((1, 2), int), np.zeros((1, 2, 5)),
                         category_ids=[1])
  with pytest.raises(ValueError, match="image_sizes"):
    coco.to_coco_results(ids, boxes, scores, np.zeros((1, 2), int), np.zeros((1, 2, 5, 6)),
                         category_ids=[1], image_sizes=np.array([[6, 6]]))
  with pytest.raises(ValueError, match="integer"):
    coco.to_coco_results(ids, boxes, scores, np.zeros((1, 2)), category_ids=[1])


def _perfect_detections(gt_path):
  gt = _quiet_coco(gt_path)
  out = _empty_batch()
  for b, image_id in enumerate(IMAGES):
    anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=image_id)) if not a["iscrowd"]]
    for slot, ann in enumerate(anns):
      x, y, w, h = ann["bbox"]
      out["boxes"][b, slot] = [x, y, x + w, y + h]
      mask = gt.annToMask(ann)
      out["masks"][b, slot, :mask.shape[0], :mask.shape[1]] = mask
      out["classes"][b, slot] = CATEGORY_IDS.index(ann["category_id"])
      out["scores"][b, slot] = 0.5 + 0.05 * slot
      out["valid"][b, slot] = True
  return out


def test_perfect_detections_give_ap_one(gt_path):
  results = coco.to_coco_results(**_perfect_detections(gt_path), category_ids=CATEGORY_IDS)
  metrics = coco.coco_evaluate(gt_path, results)
  for iou_type in ("bbox", "segm"):
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
      assert metrics[iou_type][key] == pytest.approx(1.0), (iou_type, key)
    per_class = metrics[iou_type]["per_class"]
    assert [per_class[n] for n in ("cat", "dog", "car")] == pytest.approx([1.0] * 3)
    assert math.isnan(per_class["boat"])


def _gt_area_ranges():
  """Which of COCOeval's small / medium / large ranges hold non-crowd ground truth."""
  areas = [a["area"] for a in _ground_truth()["annotations"] if not a["iscrowd"]]
  return {"s": any(a <= 32 ** 2 for a in areas),
          "m": any(32 ** 2 <= a <= 96 ** 2 for a in areas), "l": any(a >= 96 ** 2 for a in areas)}


def test_empty_results_warn_and_score_zero(gt_path):
  with pytest.warns(UserWarning, match="no detections"):
    metrics = coco.coco_evaluate(gt_path, [])
  ranges = _gt_area_ranges()
  assert all(ranges.values())
  for iou_type in ("bbox", "segm"):
    for key in coco.SUMMARY_KEYS:
      assert metrics[iou_type][key] == 0.0, (iou_type, key)
    per_class = metrics[iou_type]["per_class"]
    assert [per_class[n] for n in ("cat", "dog", "car")] == [0.0] * 3
    assert math.isnan(per_class["boat"])
  # An area range without ground truth is nan, as COCOeval's -1.
  gt = _ground_truth()
  gt["annotations"] = [a for a in gt["annotations"] if a["area"] < 32 ** 2]
  with pytest.warns(UserWarning):
    small_only = coco.coco_evaluate(gt, [], ("bbox",))["bbox"]
  assert small_only["APs"] == 0.0 and math.isnan(small_only["APm"])
  assert math.isnan(small_only["APl"]) and math.isnan(small_only["per_class"]["boat"])


def test_evaluate_rejects_mismatched_results(gt_path):
  good = {"image_id": 10, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}
  with pytest.raises(ValueError, match="image ids \\[99\\]"):
    coco.coco_evaluate(gt_path, [dict(good, image_id=99)], ("bbox",))
  with pytest.raises(ValueError, match="category ids \\[0\\]"):
    coco.coco_evaluate(gt_path, [dict(good, category_id=0)], ("bbox",))
  with pytest.raises(ValueError, match="'segmentation'"):
    coco.coco_evaluate(gt_path, [good], ("segm",))
  with pytest.raises(ValueError, match="iou_types"):
    coco.coco_evaluate(gt_path, [good], ("keypoints",))


def test_evaluator_accumulates_batches(gt_path):
  dets = _random_detections(gt_path, seed=1)
  evaluator = coco.CocoEvaluator(gt_path, CATEGORY_IDS)
  for part in (slice(0, 2), slice(2, 4)):
    evaluator.add(**{k: v[part] for k, v in dets.items()})
  whole = coco.to_coco_results(**dets, category_ids=CATEGORY_IDS)
  assert evaluator.results == whole
  got, expected = evaluator.evaluate(), coco.coco_evaluate(gt_path, whole)
  assert set(got) == {"bbox", "segm"}
  for iou_type in got:
    _assert_same(got[iou_type], expected[iou_type])
  with pytest.raises(ValueError, match="Image ids \\[10\\] got detections twice"):
    evaluator.add(**{k: v[:1] for k, v in dets.items()})
  with pytest.raises(ValueError, match="with masks and some without"):
    evaluator.add(**{k: v[:1] for k, v in dets.items() if k not in ("masks", "image_sizes")})


def test_evaluator_padding_and_bbox_only(gt_path):
  dets = _random_detections(gt_path, seed=2)
  boxes_only = {k: v for k, v in dets.items() if k not in ("masks", "image_sizes")}
  evaluator = coco.CocoEvaluator(gt_path, CATEGORY_IDS)
  evaluator.add(**boxes_only)
  # A padded batch repeating image 10 with no valid rows is accepted.
  evaluator.add(**{k: v[:1] if k != "valid" else np.zeros_like(v[:1])
                   for k, v in boxes_only.items()})
  got = evaluator.evaluate()
  assert set(got) == {"bbox"}
  assert got["bbox"]["AP"] == pytest.approx(
      _reference(gt_path, coco.to_coco_results(**boxes_only, category_ids=CATEGORY_IDS),
                 "bbox")[0], rel=1e-12)
  evaluator.reset()
  with pytest.warns(UserWarning, match="no detections"):
    assert evaluator.evaluate()["bbox"]["AP"] == 0.0
  with pytest.raises(ValueError, match="category_ids \\[2\\]"):
    coco.CocoEvaluator(gt_path, [1, 2])


def test_format_coco_table(gt_path):
  results = coco.to_coco_results(**_random_detections(gt_path), category_ids=CATEGORY_IDS)
  metrics = coco.coco_evaluate(gt_path, results)
  text = coco.format_coco_table(metrics, columns=2)
  lines = text.splitlines()
  assert len(lines) == 2 * (1 + 2 + 2)
  assert lines[0].startswith("bbox: ") and lines[5].startswith("segm: ")
  assert f"AP {100 * metrics['bbox']['AP']:5.2f}" in lines[0]
  assert f"ARl {100 * metrics['segm']['ARl']:5.2f}" in lines[5]
  cat_ap = metrics["segm"]["per_class"]["cat"]
  assert f" cat      | {100 * cat_ap:5.2f} " in lines[8]
  assert lines[9].endswith(" boat     |   nan |")


def test_segm_area_comes_from_the_mask(gt_path):
  """A false positive with a tiny mask in a huge box counts as small for segm
  (loadRes takes the mask's area, not the box's) and is ignored at large."""
  dets = _perfect_detections(gt_path)
  slot = int(dets["valid"][0].sum())
  dets["boxes"][0, slot] = [0, 0, 130, 120]
  dets["masks"][0, slot, 100:110, 0:10] = 1.0
  dets["classes"][0, slot], dets["scores"][0, slot], dets["valid"][0, slot] = 1, 0.99, True
  segm = coco.coco_evaluate(gt_path, coco.to_coco_results(**dets, category_ids=CATEGORY_IDS),
                            ("segm",))["segm"]
  assert segm["APs"] < 1.0 and segm["APl"] == pytest.approx(1.0)
