"""Panoptic quality against a segment-by-segment reference of REFERENCE.md's PQ rules."""
import json
import math
import os
import shutil
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks"))
import pq_reference  # noqa: E402
from segjax.metrics import panoptic  # noqa: E402

CATEGORIES = pq_reference.make_categories(num_things=5, num_stuff=4)
THING_A, THING_B, STUFF = CATEGORIES[0]["id"], CATEGORIES[1]["id"], CATEGORIES[5]["id"]


def assert_results_close(actual, expected):
  for group in ("All", "Things", "Stuff"):
    assert actual[group]["n"] == expected[group]["n"], group
    for key in ("pq", "sq", "rq"):
      np.testing.assert_allclose(actual[group][key], expected[group][key], rtol=1e-12,
                                 err_msg=f"{group} {key}")
  assert sorted(actual["per_class"]) == sorted(expected["per_class"])
  for category_id, scores in expected["per_class"].items():
    for key in ("pq", "sq", "rq"):
      np.testing.assert_allclose(actual["per_class"][category_id][key], scores[key],
                                 rtol=1e-12, err_msg=f"class {category_id} {key}")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("panoptic"))
  gt_json, pred_json = pq_reference.write_dataset(root, 24, 40, 56, CATEGORIES, seed=3)
  return root, gt_json, pred_json


def write_single(root, gt_ids, gt_segments, pred_ids, pred_segments, categories=CATEGORIES):
  """One-image gt.json/gt/ and pred.json/pred/ under root; returns the JSON paths."""
  paths = []
  for kind, ids, segments in (("gt", gt_ids, gt_segments), ("pred", pred_ids, pred_segments)):
    os.makedirs(os.path.join(root, kind), exist_ok=True)
    pq_reference.write_png(os.path.join(root, kind, "a.png"), np.asarray(ids))
    paths.append(os.path.join(root, f"{kind}.json"))
    with open(paths[-1], "w") as f:
      json.dump({"annotations": [{"image_id": 5, "file_name": "a.png",
                                  "segments_info": segments}],
                 "categories": categories}, f)
  return paths


def test_matches_reference_on_random_files(dataset):
  root, gt_json, pred_json = dataset
  expected = pq_reference.reference_pq_compute(gt_json, pred_json, os.path.join(root, "gt"),
                                               os.path.join(root, "pred"))
  result = panoptic.pq_compute(gt_json, pred_json, num_workers=1)
  assert_results_close(result, expected)
  assert result["All"]["n"] == len(CATEGORIES) and 0.1 < result["All"]["pq"] < 0.9


def test_data_exercise_every_rule(dataset):
  """The random data has TP, FP, FN, near-threshold pairs and VOID- and crowd-ignored preds."""
  root, gt_json, pred_json = dataset
  with open(gt_json) as f:
    gt_anns = {a["image_id"]: a for a in json.load(f)["annotations"]}
  with open(pred_json) as f:
    pred_anns = json.load(f)["annotations"]
  totals = np.zeros(3, int)
  void_ignored = crowd_ignored = near_threshold = 0
  for pred_ann in pred_anns:
    gt_ann = gt_anns[pred_ann["image_id"]]
    gt = pq_reference.read_panoptic_png(os.path.join(root, "gt", gt_ann["file_name"]))
    pred = pq_reference.read_panoptic_png(os.path.join(root, "pred", pred_ann["file_name"]))
    counts = pq_reference.reference_image_counts(gt, gt_ann["segments_info"], pred,
                                                 pred_ann["segments_info"])
    totals += np.array([v[:3] for v in counts.values()]).sum(axis=0)
    for p in pred_ann["segments_info"]:
      mask = pred == p["id"]
      void = np.sum(mask & (gt == 0))
      crowd = sum(np.sum(mask & (gt == g["id"])) for g in gt_ann["segments_info"]
                  if g["iscrowd"] and g["category_id"] == p["category_id"])
      void_ignored += void / mask.sum() > 0.5
      crowd_ignored += void / mask.sum() <= 0.5 < (void + crowd) / mask.sum()
      for g in gt_ann["segments_info"]:
        inter = np.sum(mask & (gt == g["id"]))
        union = mask.sum() + np.sum(gt == g["id"]) - inter - void
        near_threshold += (g["category_id"] == p["category_id"] and not g["iscrowd"]
                           and 0.4 < inter / union < 0.6)
  assert np.all(totals >= 20), totals
  assert void_ignored >= 5 and crowd_ignored >= 5 and near_threshold >= 5


def test_two_workers_equal_one(dataset):
  _, gt_json, pred_json = dataset
  assert (panoptic.pq_compute(gt_json, pred_json, num_workers=2)
          == panoptic.pq_compute(gt_json, pred_json, num_workers=1))


def test_in_memory_accumulator_and_per_image_stats_match_files(dataset):
  root, gt_json, pred_json = dataset
  with open(gt_json) as f:
    gt_anns = json.load(f)["annotations"]
  with open(pred_json) as f:
    pred_anns = {a["image_id"]: a for a in json.load(f)["annotations"]}
  accumulator = panoptic.PQAccumulator(CATEGORIES)
  merged = panoptic.PQAccumulator({c["id"]: c for c in CATEGORIES})
  for gt_ann in gt_anns:
    pred_ann = pred_anns[gt_ann["image_id"]]
    gt = pq_reference.read_panoptic_png(os.path.join(root, "gt", gt_ann["file_name"]))
    pred = pq_reference.read_panoptic_png(os.path.join(root, "pred", pred_ann["file_name"]))
    segments = [{k: s[k] for k in ("id", "category_id", "iscrowd")}
                for s in gt_ann["segments_info"]]
    accumulator.add(gt.astype(np.int32), segments, pred, pred_ann["segments_info"])
    merged.add_stats(panoptic.image_pq_stats(gt, segments, pred, pred_ann["segments_info"],
                                             merged.category_ids))
  expected = panoptic.pq_compute(gt_json, pred_json, num_workers=1)
  assert_results_close(accumulator.result(), expected)
  assert_results_close(merged.result(), expected)


def test_large_ids_and_many_segments(tmp_path):
  """Ids past 2^24 and > 255 segments (the binary-search lookup) give the same counts."""
  rng = np.random.default_rng(4)
  category_ids = [c["id"] for c in CATEGORIES]
  for _ in range(3):
    gt, gt_segments, pred, pred_segments = pq_reference.random_panoptic_pair(
        rng, 30, 40, CATEGORIES)
    expected = panoptic.image_pq_stats(gt, gt_segments, pred, pred_segments, category_ids)
    for offset, dtype in ((1 << 24, np.int64), (1 << 62, np.uint64)):
      big = panoptic.image_pq_stats(
          np.where(gt > 0, gt + offset, 0).astype(dtype),
          [dict(s, id=s["id"] + offset) for s in gt_segments],
          np.where(pred > 0, pred + offset, 0).astype(dtype),
          [dict(s, id=s["id"] + offset) for s in pred_segments], category_ids)
      for a, b in zip((big.tp, big.fp, big.fn, big.iou), (expected.tp, expected.fp, expected.fn,
                                                          expected.iou)):
        np.testing.assert_array_equal(a, b)
  # 300 one-pixel-wide stripes; the prediction shifts every third stripe by one column.
  gt = np.tile(np.arange(1, 301), (4, 1))
  pred = gt.copy()
  pred[:2, 3::3] = pred[:2, 2:-1:3]
  segments = [{"id": i, "category_id": category_ids[i % 9], "iscrowd": int(i % 7 == 0)}
              for i in range(1, 301)]
  stats = panoptic.image_pq_stats(gt, segments, pred, segments, category_ids)
  counts = pq_reference.reference_image_counts(gt, segments, pred, segments)
  for index, category_id in enumerate(category_ids):
    np.testing.assert_allclose([stats.tp[index], stats.fp[index], stats.fn[index],
                                stats.iou[index]], counts.get(category_id, [0, 0, 0, 0.0]))
  with pytest.raises(ValueError, match=r"segment ids \[300\] are in the ground-truth id map"):
    panoptic.image_pq_stats(gt, segments[:-1], pred, segments, category_ids)


def test_lookup_forgets_the_previous_image_and_rejects_negative_ids():
  category_ids = [c["id"] for c in CATEGORIES]
  ids = np.array([[5, 6]])
  segments = [{"id": 5, "category_id": THING_A}, {"id": 6, "category_id": THING_A}]
  panoptic.image_pq_stats(ids, segments, ids, segments, category_ids)
  with pytest.raises(ValueError, match=r"segment ids \[6\] are in the predicted id map"):
    panoptic.image_pq_stats(ids, segments, ids, segments[:1], category_ids)
  with pytest.raises(ValueError, match=r"segment ids \[-3\] are in the ground-truth id map"):
    panoptic.image_pq_stats(np.array([[5, -3]], np.int32), segments[:1], ids, segments,
                            category_ids)


def test_perfect_prediction_scores_one(dataset):
  root, gt_json, _ = dataset
  result = panoptic.pq_compute(gt_json, gt_json, num_workers=1, crowd_region="union")
  for group in ("All", "Things", "Stuff"):
    assert result[group]["pq"] == result[group]["sq"] == result[group]["rq"] == 1.0
  assert result["All"]["n"] == len(CATEGORIES)
  # panopticapi's rule: where a class has two crowd segments, the copy of the first one
  # lies on no crowd region of its class (only the last one is) and counts as a FP.
  last = panoptic.pq_compute(gt_json, gt_json, num_workers=1)
  gt_folder = os.path.join(root, "gt")
  assert_results_close(last, pq_reference.reference_pq_compute(gt_json, gt_json, gt_folder,
                                                               gt_folder))
  assert last["Things"]["rq"] < 1.0 and last["Things"]["sq"] == 1.0


def test_hand_computed_rules(tmp_path):
  """Each rule on a 4 x 10 image whose PQ terms are worked out by hand."""
  gt = np.zeros((4, 10), np.int64)
  gt[0, 0:4] = 11            # thing A, 4 px
  gt[1, 0:4] = 12            # thing A, 4 px
  gt[2, 0:3] = 21            # crowd of thing A
  gt[2, 3:6] = 22            # crowd of thing A, a second segment
  gt[3, 0:8] = 31            # stuff, 8 px
  gt_segments = [{"id": 11, "category_id": THING_A, "iscrowd": 0, "area": 4},
                 {"id": 12, "category_id": THING_A, "iscrowd": 0, "area": 4},
                 {"id": 21, "category_id": THING_A, "iscrowd": 1, "area": 3},
                 {"id": 22, "category_id": THING_A, "iscrowd": 1, "area": 3},
                 {"id": 31, "category_id": STUFF, "iscrowd": 0, "area": 8}]
  pred = np.zeros((4, 10), np.int64)
  pred[0, 0:2] = 101          # 2 of segment 11's 4 px: IoU = 2/4 = 0.5 exactly -> no match.
  pred[1, 0:4] = 102          # all of segment 12 ...
  pred[0:2, 8:10] = 102       # ... plus 4 VOID px: IoU = 4 / (8 + 4 - 4 - 4) = 1.
  pred[2, 1:5] = 103          # 2 px on each crowd segment of A and ...
  pred[3, 7] = 103            # ... 1 on stuff: 4/5 on A's crowd union -> ignored (2/5 on 22).
  pred[3, 0:6] = 104          # stuff, 6 of 8 px: IoU 0.75.
  pred[3, 6] = 105            # thing B, half on stuff and ...
  pred[2, 6] = 105            # ... half on VOID: exactly 0.5 is not > 0.5 -> FP.
  pred_segments = [{"id": 101, "category_id": THING_A}, {"id": 102, "category_id": THING_A},
                   {"id": 103, "category_id": THING_A}, {"id": 104, "category_id": STUFF},
                   {"id": 105, "category_id": THING_B}]
  result = panoptic.pq_compute(*write_single(str(tmp_path), gt, gt_segments, pred,
                                             pred_segments), num_workers=1,
                               crowd_region="union")
  # A: TP 12<->102 (IoU 1), FN 11, FP 101; 103 ignored. B: FP 105. Stuff: TP IoU 0.75.
  expected = {THING_A: (1.0 / 2, 1.0, 1 / 2), THING_B: (0.0, 0.0, 0.0), STUFF: (0.75, 0.75, 1.0)}
  for category_id, (pq, sq, rq) in expected.items():
    np.testing.assert_allclose([result["per_class"][category_id][k] for k in ("pq", "sq", "rq")],
                               [pq, sq, rq], rtol=1e-12)
  assert result["Things"]["n"] == 2 and result["Stuff"]["n"] == 1
  np.testing.assert_allclose(result["All"]["pq"], (0.5 + 0 + 0.75) / 3, rtol=1e-12)
  # panopticapi's rule (the default): A's crowd region is 22 alone, the last listed; 2/5 of
  # 103 on it is not > 0.5, so 103 is a FP too: A's RQ = 1 / (1 + 0.5 * (1 + 2)).
  result = panoptic.pq_compute(*write_single(str(tmp_path), gt, gt_segments, pred,
                                             pred_segments), num_workers=1)
  np.testing.assert_allclose(result["per_class"][THING_A]["rq"], 1 / 2.5, rtol=1e-12)
  # Without a crowd region of its own class, 103 (4 of 5 px on another class's crowd) is a FP.
  pred_segments[2]["category_id"] = THING_B
  result = panoptic.pq_compute(*write_single(str(tmp_path), gt, gt_segments, pred,
                                             pred_segments), num_workers=1)
  np.testing.assert_allclose(result["per_class"][THING_B]["rq"], 0.0)
  np.testing.assert_allclose(result["per_class"][THING_A]["rq"], 1 / (1 + 0.5 + 0.5))


def test_gt_area_field_is_used_for_the_union(tmp_path):
  """As in panopticapi, a ground-truth 'area' from the JSON replaces its pixel count."""
  gt = np.zeros((2, 4), np.int64)
  gt[0] = 7
  pred = np.where(gt == 7, 9, 0)
  pred_segments = [{"id": 9, "category_id": THING_A}]
  for area, iou in ((4, 1.0), (6, 4 / 6)):
    result = panoptic.pq_compute(*write_single(
        str(tmp_path), gt, [{"id": 7, "category_id": THING_A, "area": area}], pred,
        pred_segments), num_workers=1)
    np.testing.assert_allclose(result["per_class"][THING_A]["sq"], iou, rtol=1e-12)


def test_group_without_classes_is_nan_and_table_formats(tmp_path):
  things_only = [c for c in CATEGORIES if c["isthing"]]
  gt = np.array([[0, 7, 7, 8]])
  segments = [{"id": 7, "category_id": THING_A}, {"id": 8, "category_id": THING_B}]
  pred = np.where(gt == 8, 0, gt)
  result = panoptic.pq_compute(*write_single(str(tmp_path), gt, segments, pred, segments[:1],
                                             things_only), num_workers=1)
  assert result["Stuff"]["n"] == 0 and math.isnan(result["Stuff"]["pq"])
  assert result["Things"] == {"pq": 0.5, "sq": 0.5, "rq": 0.5, "n": 2}
  table = panoptic.format_pq_table(result, things_only)
  assert "Things        |  50.00  50.00  50.00 |    2" in table
  assert f"{things_only[0]['name']:14s}| 100.00 100.00 100.00 |" in table


def test_rgb_id_round_trip():
  ids = np.random.default_rng(0).integers(0, 1 << 24, (5, 7))
  rgb = panoptic.id_to_rgb(ids)
  np.testing.assert_array_equal(rgb[..., 0] + 256 * rgb[..., 1].astype(np.int64)
                                + 65536 * rgb[..., 2].astype(np.int64), ids)
  np.testing.assert_array_equal(panoptic.rgb_to_id(rgb), ids)


def test_read_id_png_formats(tmp_path):
  """RGB, RGBA (alpha ignored) and palette PNGs decode to the ids of their RGB colours."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1)
  ids = rng.integers(0, 1 << 24, (6, 9))
  rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
  alpha = rng.integers(0, 256, (6, 9, 1), dtype=np.uint8)
  images = {"rgb": Image.fromarray(rgb), "rgba": Image.fromarray(np.concatenate([rgb, alpha], -1)),
            "palette": Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16)}
  for name, image in images.items():
    path = str(tmp_path / f"{name}.png")
    image.save(path)
    np.testing.assert_array_equal(panoptic.read_id_png(path),
                                  pq_reference.read_panoptic_png(path), err_msg=name)
  np.testing.assert_array_equal(panoptic.read_id_png(str(tmp_path / "rgb.png")), ids)


@pytest.mark.parametrize("case, message", [
    ("unknown_category", r"segment with id 102 has unknown category_id 999"),
    ("json_not_in_png", r"predicted segment ids \[103\] are listed in segments_info but absent"),
    ("png_not_in_json", r"segment ids \[102\] are in the predicted id map \(PNG\) but not in"),
    ("gt_png_not_in_json", r"segment ids \[12\] are in the ground-truth id map"),
    ("missing_prediction", r"No prediction for the image with image_id 5"),
    ("duplicate_segment", r"lists segment ids \[101\] more than once"),
])
def test_errors_name_the_problem(tmp_path, case, message):
  gt = np.array([[11, 11, 12, 0]])
  gt_segments = [{"id": 11, "category_id": THING_A}, {"id": 12, "category_id": STUFF}]
  pred = np.array([[101, 101, 102, 0]])
  pred_segments = [{"id": 101, "category_id": THING_A}, {"id": 102, "category_id": STUFF}]
  if case == "unknown_category":
    pred_segments[1]["category_id"] = 999
  elif case == "json_not_in_png":
    pred_segments.append({"id": 103, "category_id": STUFF})
  elif case == "png_not_in_json":
    pred_segments.pop()
  elif case == "gt_png_not_in_json":
    gt_segments.pop()
  elif case == "duplicate_segment":
    pred_segments.append({"id": 101, "category_id": THING_B})
  gt_json, pred_json = write_single(str(tmp_path), gt, gt_segments, pred, pred_segments)
  if case == "missing_prediction":
    with open(pred_json, "w") as f:
      json.dump({"annotations": []}, f)
  with pytest.raises(ValueError, match=message):
    panoptic.pq_compute(gt_json, pred_json, num_workers=1)


def test_missing_png_folder_is_reported(tmp_path):
  gt = np.array([[1, 0]])
  gt_json, pred_json = write_single(str(tmp_path), gt, [{"id": 1, "category_id": THING_A}], gt,
                                    [{"id": 1, "category_id": THING_A}])
  shutil.rmtree(os.path.join(str(tmp_path), "pred"))
  with pytest.raises(FileNotFoundError, match="prediction PNG folder"):
    panoptic.pq_compute(gt_json, pred_json, num_workers=1)
