"""A straightforward panoptic quality reference and a synthetic COCO panoptic data writer.

Shared by tests/metrics/test_panoptic_quality.py and benchmarks/pq_compute.py. The
reference follows the PQ rules of shared/REFERENCE.md literally, one boolean
mask per segment and one loop per segment pair, with its own PNG reader; it
shares no code with segjax.metrics.panoptic.
"""
import json
import os
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image


def read_panoptic_png(path: str) -> np.ndarray:
  """Segment ids R + 256 G + 256^2 B of an RGB PNG, as int64."""
  rgb = np.array(Image.open(path).convert("RGB"), dtype=np.int64)
  return rgb[:, :, 0] + 256 * rgb[:, :, 1] + 256 * 256 * rgb[:, :, 2]


def reference_image_counts(gt_ids: np.ndarray, gt_segments: Sequence[Dict[str, Any]],
                           pred_ids: np.ndarray, pred_segments: Sequence[Dict[str, Any]],
                           crowd_region: str = "last") -> Dict[int, List[float]]:
  """{category_id: [tp, fp, fn, iou_sum]} of one image, segment by segment. A class's
  crowd region is its last crowd segment listed (panopticapi's `crowd_labels_dict`) or,
  with crowd_region="union", all of its crowd segments."""
  counts: Dict[int, List[float]] = {}

  def entry(category_id):
    return counts.setdefault(category_id, [0, 0, 0, 0.0])

  void = gt_ids == 0
  gt_masks = {s["id"]: gt_ids == s["id"] for s in gt_segments}
  pred_masks = {s["id"]: pred_ids == s["id"] for s in pred_segments}
  gt_matched, pred_matched = set(), set()
  for gt in gt_segments:
    if gt.get("iscrowd", 0) == 1:
      continue
    gt_mask = gt_masks[gt["id"]]
    for pred in pred_segments:
      if pred["category_id"] != gt["category_id"]:
        continue
      pred_mask = pred_masks[pred["id"]]
      intersection = int(np.sum(gt_mask & pred_mask))
      union = (int(pred_mask.sum()) + int(gt_mask.sum()) - intersection
               - int(np.sum(pred_mask & void)))
      if union > 0 and intersection / union > 0.5:
        entry(gt["category_id"])[0] += 1
        entry(gt["category_id"])[3] += intersection / union
        gt_matched.add(gt["id"])
        pred_matched.add(pred["id"])
  for gt in gt_segments:
    if gt["id"] not in gt_matched and gt.get("iscrowd", 0) != 1:
      entry(gt["category_id"])[2] += 1
  for pred in pred_segments:
    if pred["id"] in pred_matched:
      continue
    crowd = np.zeros_like(void)
    for gt in gt_segments:
      if gt.get("iscrowd", 0) == 1 and gt["category_id"] == pred["category_id"]:
        if crowd_region == "last":  # panopticapi: the last crowd segment of the class
          crowd = gt_masks[gt["id"]].copy()
        else:
          crowd |= gt_masks[gt["id"]]
    pred_mask = pred_masks[pred["id"]]
    if np.sum(pred_mask & (void | crowd)) / np.sum(pred_mask) > 0.5:
      continue
    entry(pred["category_id"])[1] += 1
  return counts


def reference_average(counts: Dict[int, List[float]],
                      categories: Sequence[Dict[str, Any]]) -> Dict[Any, Any]:
  """panopticapi's result dict from summed per-class counts."""
  per_class, groups = {}, {"All": [], "Things": [], "Stuff": []}
  for category in categories:
    tp, fp, fn, iou = counts.get(category["id"], [0, 0, 0, 0.0])
    if tp + fp + fn == 0:
      per_class[category["id"]] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
      continue
    scores = {"pq": iou / (tp + fp / 2 + fn / 2), "sq": iou / tp if tp else 0.0,
              "rq": tp / (tp + fp / 2 + fn / 2)}
    per_class[category["id"]] = scores
    groups["All"].append(scores)
    groups["Things" if category["isthing"] else "Stuff"].append(scores)
  result: Dict[Any, Any] = {}
  for name, members in groups.items():
    result[name] = {key: (sum(m[key] for m in members) / len(members) if members
                          else float("nan")) for key in ("pq", "sq", "rq")}
    result[name]["n"] = len(members)
  result["per_class"] = per_class
  return result


def reference_pq_compute(gt_json_file: str, pred_json_file: str, gt_folder: str,
                         pred_folder: str, crowd_region: str = "last") -> Dict[Any, Any]:
  """PQ of COCO panoptic JSON + PNG files, image by image and segment by segment."""
  with open(gt_json_file) as f:
    gt_json = json.load(f)
  with open(pred_json_file) as f:
    pred_json = json.load(f)
  predictions = {ann["image_id"]: ann for ann in pred_json["annotations"]}
  totals: Dict[int, List[float]] = {}
  for gt_ann in gt_json["annotations"]:
    pred_ann = predictions[gt_ann["image_id"]]
    counts = reference_image_counts(
        read_panoptic_png(os.path.join(gt_folder, gt_ann["file_name"])), gt_ann["segments_info"],
        read_panoptic_png(os.path.join(pred_folder, pred_ann["file_name"])),
        pred_ann["segments_info"], crowd_region)
    for category_id, values in counts.items():
      total = totals.setdefault(category_id, [0, 0, 0, 0.0])
      for k in range(4):
        total[k] += values[k]
  return reference_average(totals, gt_json["categories"])


def make_categories(num_things: int, num_stuff: int) -> List[Dict[str, Any]]:
  """COCO-style categories with non-contiguous ids, things first."""
  return [{"id": 3 * i + 1, "name": f"{'thing' if i < num_things else 'stuff'}{i}",
           "isthing": int(i < num_things)} for i in range(num_things + num_stuff)]


def _paste(canvas: np.ndarray, mask: np.ndarray, top: int, left: int, value: int) -> None:
  """canvas[top:, left:][mask] = value, with the parts outside the canvas dropped."""
  h, w = canvas.shape
  mh, mw = mask.shape
  y0, x0 = max(top, 0), max(left, 0)
  y1, x1 = min(top + mh, h), min(left + mw, w)
  if y1 > y0 and x1 > x0:
    window = canvas[y0:y1, x0:x1]
    window[mask[y0 - top:y1 - top, x0 - left:x1 - left]] = value


def _shape(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """A random filled rectangle or ellipse mask of size (h, w)."""
  if rng.random() < 0.5:
    return np.ones((h, w), bool)
  y, x = np.ogrid[:h, :w]
  return ((y + 0.5 - h / 2) / (h / 2)) ** 2 + ((x + 0.5 - w / 2) / (w / 2)) ** 2 <= 1


def random_panoptic_pair(rng: np.random.Generator, height: int, width: int,
                         categories: Sequence[Dict[str, Any]], num_things: int = 8
                         ) -> Tuple[np.ndarray, List[Dict[str, Any]], np.ndarray,
                                    List[Dict[str, Any]]]:
  """One ground truth and a perturbed prediction: (gt_ids, gt_segments, pred_ids, pred_segments).

  The ground truth has stuff regions, thing instances (some crowd, sometimes two
  crowd segments of one class) and VOID. The prediction shifts each ground-truth
  segment by a random amount (IoU from 1 down to well under 0.5), sometimes
  changes its class or drops it, and adds spurious segments, some of them on VOID
  or on crowd regions of their class.
  """
  used_ids = set()
  things = [c["id"] for c in categories if c["isthing"]]
  stuff = [c["id"] for c in categories if not c["isthing"]]

  def new_id():
    while True:
      segment_id = int(rng.integers(1, 1 << 24))
      if segment_id not in used_ids:
        used_ids.add(segment_id)
        return segment_id

  gt = np.zeros((height, width), np.int64)
  drawn = []  # (id, category_id, iscrowd, top, left, mask)
  for category_id in rng.choice(stuff, size=min(len(stuff), 3), replace=False):
    h, w = int(rng.integers(height // 3, height + 1)), int(rng.integers(width // 3, width + 1))
    drawn.append((new_id(), int(category_id), 0, int(rng.integers(-h // 4, height - h // 2)),
                  int(rng.integers(-w // 4, width - w // 2)), np.ones((h, w), bool)))
  crowd_class = int(rng.choice(things))
  for k in range(num_things):
    h = int(rng.integers(max(2, height // 12), max(3, height // 3)))
    w = int(rng.integers(max(2, width // 12), max(3, width // 3)))
    iscrowd = int(k < 2 or rng.random() < 0.1)
    category_id = crowd_class if k < 2 else int(rng.choice(things))
    drawn.append((new_id(), category_id, iscrowd, int(rng.integers(0, height - h + 1)),
                  int(rng.integers(0, width - w + 1)), _shape(rng, h, w)))
  for segment_id, _, _, top, left, mask in drawn:
    _paste(gt, mask, top, left, segment_id)
  for _ in range(2):  # VOID holes.
    h, w = int(rng.integers(1, height // 4 + 2)), int(rng.integers(1, width // 4 + 2))
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    gt[top:top + h, left:left + w] = 0
  gt_present = set(np.unique(gt).tolist())
  gt_segments = [{"id": s, "category_id": c, "iscrowd": crowd}
                 for s, c, crowd, _, _, _ in drawn if s in gt_present]

  pred = np.zeros((height, width), np.int64)
  proposals = []  # (category_id, top, left, mask)
  for segment_id, category_id, _, _, _, _ in drawn:
    if segment_id not in gt_present or rng.random() < 0.15:
      continue
    if rng.random() < 0.1:
      category_id = int(rng.choice(things if category_id in things else stuff))
    rows, cols = np.nonzero(gt == segment_id)
    top, left = rows.min(), cols.min()
    mask = gt[top:rows.max() + 1, left:cols.max() + 1] == segment_id
    h, w = mask.shape
    shift = rng.uniform(0, 0.3) * rng.choice([-1, 1], size=2)
    proposals.append((category_id, top + int(round(shift[0] * h)),
                      left + int(round(shift[1] * w)), mask))
  holes = np.argwhere(gt == 0)
  crowd_pixels = np.argwhere(np.isin(gt, [s["id"] for s in gt_segments if s["iscrowd"]]))
  for k in range(4):  # Spurious segments; the first ones sit on VOID or on crowd.
    h = int(rng.integers(1, max(2, height // 6)))
    w = int(rng.integers(1, max(2, width // 6)))
    if k == 0 and len(holes):
      (top, left), category_id = holes[rng.integers(len(holes))], int(rng.choice(things))
    elif k == 1 and len(crowd_pixels):
      (top, left), category_id = crowd_pixels[rng.integers(len(crowd_pixels))], crowd_class
    else:
      top, left = int(rng.integers(0, height)), int(rng.integers(0, width))
      category_id = int(rng.choice(things + stuff))
    proposals.append((category_id, int(top) - h // 2, int(left) - w // 2, _shape(rng, h, w)))
  pred_ids = []
  for index in rng.permutation(len(proposals)):
    category_id, top, left, mask = proposals[index]
    pred_ids.append((new_id(), category_id))
    _paste(pred, mask, top, left, pred_ids[-1][0])
  pred_present = set(np.unique(pred).tolist())
  pred_segments = [{"id": s, "category_id": c, "iscrowd": 0}
                   for s, c in pred_ids if s in pred_present]
  return gt, gt_segments, pred, pred_segments


def write_png(path: str, ids: np.ndarray) -> None:
  """Writes ids as an RGB PNG with R + 256 G + 256^2 B = id."""
  rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
  Image.fromarray(rgb).save(path)


def write_dataset(root: str, num_images: int, height: int, width: int,
                  categories: Sequence[Dict[str, Any]], num_things: int = 8,
                  seed: int = 0) -> Tuple[str, str]:
  """Writes gt.json + gt/*.png and pred.json + pred/*.png under root; returns the JSON paths."""
  rng = np.random.default_rng(seed)
  files = {"gt": [], "pred": []}
  for kind in files:
    os.makedirs(os.path.join(root, kind), exist_ok=True)
  for index in range(num_images):
    gt, gt_segments, pred, pred_segments = random_panoptic_pair(rng, height, width, categories,
                                                                num_things)
    image_id = 1000 + 7 * index
    for kind, ids, segments in (("gt", gt, gt_segments), ("pred", pred, pred_segments)):
      name = f"{image_id:012d}.png"
      write_png(os.path.join(root, kind, name), ids)
      if kind == "gt":
        for segment in segments:
          segment["area"] = int(np.sum(ids == segment["id"]))
      files[kind].append({"image_id": image_id, "file_name": name, "segments_info": segments})
  paths = []
  for kind, annotations in files.items():
    if kind == "pred":
      annotations = annotations[::-1]  # Matching must go by image_id, not by order.
    paths.append(os.path.join(root, f"{kind}.json"))
    with open(paths[-1], "w") as f:
      json.dump({"annotations": annotations, "categories": list(categories)}, f)
  return paths[0], paths[1]
