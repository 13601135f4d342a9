"""GroundTruthBuilder: COCO ground truth from eval records, scored by pycocotools."""
import math

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from segjax.data import coco_masks
from segjax.metrics import coco

NAMES = ("cat", "dog", "car")
THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCOeval's IoU thresholds


def _rect(shape, y1, x1, y2, x2):
  mask = np.zeros(shape, np.uint8)
  mask[y1:y2, x1:x2] = 1
  return mask


def _ellipse(shape, cy, cx, ry, rx):
  y, x = np.mgrid[:shape[0], :shape[1]]
  return (((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1).astype(np.uint8)


def _tight_box(mask):
  ys, xs = np.nonzero(mask)
  return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def _records(pad=(112, 104)):
  """Eval records of three images padded to `pad`: (image_id, height, width, boxes,
  classes, masks, is_crowd, valid), with a crowd row, invalid rows with garbage and
  small / medium / large objects."""
  records = []
  specs = {4: ((60, 70), [(_ellipse, (20, 20, 8, 10), 0, False),
                          (_rect, (30, 35, 58, 69), 2, False),
                          (_rect, (0, 40, 20, 60), 1, True)]),
           5: ((110, 100), [(_ellipse, (55, 50, 30, 25), 1, False),
                            (_rect, (2, 2, 108, 98), 2, False),
                            (_rect, (2, 2, 6, 9), 0, False)]),
           6: ((40, 80), [])}
  for image_id, ((h, w), objects) in specs.items():
    slots = 5  # every image padded to the same rows, as in a batch
    boxes = np.zeros((slots, 4), np.float32)
    classes = np.full(slots, 99, np.int32)  # garbage in invalid rows
    masks = np.zeros((slots,) + pad, np.uint8)
    masks[:, h:, :] = 1  # padding beyond the image must be cropped away
    masks[:, :, w:] = 1
    is_crowd = np.zeros(slots, bool)
    valid = np.zeros(slots, bool)
    for slot, (shape_fn, args, label, crowd) in enumerate(objects):
      masks[slot, :h, :w] = shape_fn((h, w), *args)
      boxes[slot] = _tight_box(masks[slot, :h, :w])
      classes[slot], is_crowd[slot], valid[slot] = label, crowd, True
    records.append((image_id, h, w, boxes, classes, masks, is_crowd, valid))
  return records


def _builder(records, with_masks=True):
  builder = coco.GroundTruthBuilder(NAMES)
  for image_id, h, w, boxes, classes, masks, is_crowd, valid in records:
    builder.add(image_id, h, w, boxes, classes, masks if with_masks else None, is_crowd, valid)
  return builder


def _perfect_batch(records, with_masks=True):
  """Detections equal to the non-crowd ground truth, score 1, as one padded batch."""
  batch = {"image_ids": np.array([r[0] for r in records]),
           "boxes": np.stack([r[3] for r in records]),
           "scores": np.ones((len(records), records[0][3].shape[0]), np.float32),
           "classes": np.stack([r[4] for r in records]),
           "valid": np.stack([r[7] & ~r[6] for r in records])}
  if with_masks:
    batch["masks"] = np.stack([r[5] for r in records]).astype(np.float32)
    batch["image_sizes"] = np.array([[r[1], r[2]] for r in records])
  return batch


def test_perfect_predictions_score_one():
  records = _records()
  builder = _builder(records)
  assert builder.category_ids == [1, 2, 3]
  gt = builder.to_dict()
  results = coco.to_coco_results(**_perfect_batch(records), category_ids=builder.category_ids)
  assert len(results) == 5
  areas = [a["area"] for a in gt["annotations"] if not a["iscrowd"]]
  assert any(a < 32 ** 2 for a in areas) and any(a > 96 ** 2 for a in areas)  # s and l
  assert any(32 ** 2 < a < 96 ** 2 for a in areas)  # and m
  metrics = coco.coco_evaluate(gt, results)
  for iou_type in ("bbox", "segm"):
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
      assert metrics[iou_type][key] == pytest.approx(1.0), (iou_type, key)
    assert metrics[iou_type]["per_class"] == pytest.approx(dict.fromkeys(NAMES, 1.0))
  # The same through CocoEvaluator, in two batches.
  evaluator = coco.CocoEvaluator(builder.to_dict(), builder.category_ids)
  batch = _perfect_batch(records)
  for part in (slice(0, 1), slice(1, 3)):
    evaluator.add(**{k: v[part] for k, v in batch.items()})
  got = evaluator.evaluate()
  assert got["segm"]["AP"] == pytest.approx(1.0) and got["bbox"]["AP"] == pytest.approx(1.0)


def test_boxes_only_ground_truth():
  records = _records()
  builder = _builder(records, with_masks=False)
  gt = builder.to_dict()
  for ann in gt["annotations"]:
    assert "segmentation" not in ann
    assert ann["area"] == pytest.approx(ann["bbox"][2] * ann["bbox"][3])
  results = coco.to_coco_results(**_perfect_batch(records, with_masks=False),
                                 category_ids=builder.category_ids)
  bbox = coco.coco_evaluate(gt, results, ("bbox",))["bbox"]
  assert bbox["AP"] == pytest.approx(1.0) and bbox["AR100"] == pytest.approx(1.0)


def _single(gt_masks, crowd, det_masks, det_scores, shape=(48, 48)):
  """AP of detections (masks, scores; class 0) against ground truth masks in one image."""
  builder = coco.GroundTruthBuilder(["thing"])
  gt_masks = np.array(gt_masks, np.uint8).reshape((-1,) + shape)
  builder.add(1, *shape, np.array([_tight_box(m) for m in gt_masks], np.float32).reshape(-1, 4),
              np.zeros(len(gt_masks), np.int32), gt_masks, np.array(crowd, bool))
  det_masks = np.array(det_masks, np.uint8)
  results = coco.to_coco_results(
      np.array([1]), np.array([[_tight_box(m) for m in det_masks]], np.float32),
      np.array([det_scores], np.float32), np.zeros((1, len(det_masks)), np.int32),
      det_masks[None], category_ids=builder.category_ids)
  metrics = coco.coco_evaluate(builder.to_dict(), results)
  return metrics["bbox"]["AP"], metrics["segm"]["AP"]


def test_shifted_mask_lowers_segm_ap():
  gt = _rect((48, 48), 10, 10, 30, 30)
  shifted = np.roll(gt, 3, axis=1)
  iou = (gt & shifted).sum() / (gt | shifted).sum()  # 340 / 460
  expected = float(np.mean(iou >= THRESHOLDS))  # one gt, one detection
  assert 0 < expected < 1
  bbox_ap, segm_ap = _single([gt], [False], [shifted], [0.9])
  assert segm_ap == pytest.approx(expected)
  box_iou = 20 * 17 / (20 * 23)  # the tight boxes shift with the mask
  assert bbox_ap == pytest.approx(float(np.mean(box_iou >= THRESHOLDS)))
  assert _single([gt], [False], [gt], [0.9]) == pytest.approx((1.0, 1.0))


def test_crowd_is_matched_but_not_counted():
  shape = (48, 48)
  a, c = _rect(shape, 5, 5, 15, 15), _rect(shape, 20, 10, 35, 35)
  # A detection on the crowd region (higher score) is neither TP nor FP.
  assert _single([a, c], [False, True], [a, c], [0.5, 0.9]) == pytest.approx((1.0, 1.0))
  # A crowd region without a detection is not a miss.
  assert _single([a, c], [False, True], [a], [0.5]) == pytest.approx((1.0, 1.0))
  # Controls: as a normal object it is a miss (recall 0.5: 51 of COCO's 101 recall
  # points at precision 1), and without it the detection there is a FP ranked first
  # (precision 1/2 at every recall).
  assert _single([a, c], [False, False], [a], [0.5]) == pytest.approx((51 / 101, 51 / 101))
  assert _single([a], [False], [a, c], [0.5, 0.9]) == pytest.approx((0.5, 0.5))


def test_dict_equals_hand_written():
  builder = coco.GroundTruthBuilder(["cat", "dog", "car"])
  masks = np.zeros((4, 6, 7), np.uint8)
  masks[:, 4:, :] = 1  # padding beyond the 4 x 5 image
  masks[:, :, 5:] = 1
  masks[0, 0:2, 1:4] = 1  # 6 pixels
  masks[2, 2:4, 0:5] = 1
  masks[2, 3, 4] = 0  # 9 pixels
  boxes = np.array([[1, 0, 4, 2], [9, 9, 9, 9], [0, 2, 5, 4], [0, 0, 2, 2]], np.float32)
  builder.add(7, 4, 5, boxes, np.array([1, 99, 0, 2]), masks,
              is_crowd=np.array([False, False, True, False]),
              valid=np.array([True, False, True, True]))  # row 3's mask is empty: skipped
  builder.add(np.int64(3), 4, 4, np.zeros((0, 4)), np.zeros(0, np.int32),
              np.zeros((0, 4, 4), bool))
  builder.add(9, 2, 3, np.array([[0.5, 0.0, 2.5, 1.0]]), np.array([2]),
              np.array([[[0, 1, 1], [0, 0, 0]]], bool))
  gt = builder.to_dict()
  segmentations = [ann.pop("segmentation") for ann in gt["annotations"]]
  assert gt == {
      "info": {"description": "segjax GroundTruthBuilder"},
      "images": [{"id": 7, "height": 4, "width": 5}, {"id": 3, "height": 4, "width": 4},
                 {"id": 9, "height": 2, "width": 3}],
      "annotations": [
          {"id": 1, "image_id": 7, "category_id": 2, "bbox": [1.0, 0.0, 3.0, 2.0],
           "area": 6.0, "iscrowd": 0},
          {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0.0, 2.0, 5.0, 2.0],
           "area": 9.0, "iscrowd": 1},
          {"id": 3, "image_id": 9, "category_id": 3, "bbox": [0.5, 0.0, 2.0, 1.0],
           "area": 2.0, "iscrowd": 0}],
      "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"},
                     {"id": 3, "name": "car"}]}
  expected = [masks[0, :4, :5], masks[2, :4, :5], np.array([[0, 1, 1], [0, 0, 0]], np.uint8)]
  for seg, mask in zip(segmentations, expected):
    assert seg["size"] == list(mask.shape) and isinstance(seg["counts"], str)
    decoded = coco_mask.decode({"size": seg["size"], "counts": seg["counts"].encode()})
    np.testing.assert_array_equal(decoded, mask)
    assert seg == coco_masks.encode_rle(mask)
  # Plain Python numbers, so the dict dumps to JSON.
  ann = builder.to_dict()["annotations"][0]
  assert type(ann["id"]) is type(ann["category_id"]) is type(ann["iscrowd"]) is int
  assert type(ann["area"]) is float and all(type(v) is float for v in ann["bbox"])
  # pycocotools writes into the annotations it scores; the builder's own stay clean.
  with pytest.warns(UserWarning, match="no detections"):
    coco.coco_evaluate(builder.to_dict(), [])
  assert all("ignore" not in a for a in builder.to_dict()["annotations"])


def test_builder_rejects_bad_input():
  with pytest.raises(ValueError, match="class_names is empty"):
    coco.GroundTruthBuilder([])
  with pytest.raises(ValueError, match="repeats \\['a'\\]"):
    coco.GroundTruthBuilder(["a", "b", "a"])
  builder = coco.GroundTruthBuilder(NAMES)
  with pytest.raises(ValueError, match="No images"):
    builder.to_dict()
  boxes, masks = np.zeros((3, 4)), np.ones((3, 8, 8), np.uint8)
  with pytest.raises(ValueError, match="classes \\[-1, 3\\]"):
    builder.add(1, 8, 8, boxes, np.array([-1, 3, 2]), masks)
  with pytest.raises(ValueError, match="integer"):
    builder.add(1, 8, 8, boxes, np.zeros(3), masks)
  with pytest.raises(ValueError, match="boxes has shape"):
    builder.add(1, 8, 8, np.zeros((3, 5)), np.zeros(3, int), masks)
  with pytest.raises(ValueError, match="valid has shape"):
    builder.add(1, 8, 8, boxes, np.zeros(3, int), masks, valid=np.ones(2, bool))
  with pytest.raises(ValueError, match="masks has shape"):
    builder.add(1, 8, 8, boxes, np.zeros(3, int), masks[:2])
  with pytest.raises(ValueError, match="smaller than image 1's 9x8"):
    builder.add(1, 9, 8, boxes, np.zeros(3, int), masks)
  with pytest.raises(ValueError, match="positive"):
    builder.add(1, 0, 8, boxes, np.zeros(3, int), masks)
  with pytest.raises(ValueError, match="non-finite"):
    builder.add(1, 8, 8, np.full((3, 4), np.nan), np.zeros(3, int), masks)
  # None of the failed calls added anything.
  with pytest.raises(ValueError, match="No images"):
    builder.to_dict()
  # Invalid rows may hold any class.
  builder.add(1, 8, 8, boxes + [0, 0, 2, 2], np.array([0, 7, 2]), masks,
              valid=np.array([True, False, True]))
  assert [a["category_id"] for a in builder.to_dict()["annotations"]] == [1, 3]
  with pytest.raises(ValueError, match="Image id 1 was added twice"):
    builder.add(1, 8, 8, boxes, np.zeros(3, int), masks)
  with pytest.raises(ValueError, match="with masks and some without"):
    builder.add(2, 8, 8, boxes, np.zeros(3, int))
  assert math.isclose(builder.to_dict()["annotations"][0]["area"], 64.0)
