"""COCO box and mask AP: model outputs -> COCO results, evaluated by pycocotools.

The model's job ends at detections in the original image's frame: boxes
(x1, y1, x2, y2) in pixels and, for instance segmentation, masks already pasted
from their RoIs into the full image (probabilities or 0/1). `to_coco_results`
turns such static-shape batches into the COCO results format (compressed RLE
by `pycocotools.mask.encode`), and `coco_evaluate` runs pycocotools' COCOeval
unchanged, adding detectron2's per-category AP. `CocoEvaluator` collects
batches over an eval loop.

Training ids map to COCO category ids through a `category_ids` table; for
COCO 2017 instances that is `[cid for cid, _ in coco_builder.THING_CATEGORIES]`
(not imported here, so evaluation does not need TensorFlow).
"""
import collections
import contextlib
import io
import math
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# COCOeval.stats, in order.
SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")

GroundTruth = Union[str, os.PathLike, Dict[str, Any], COCO]


def _host(array, name: str, shape: Tuple[Optional[int], ...]) -> np.ndarray:
  """A numpy copy of `array`, checked against `shape` (None: any size)."""
  array = np.asarray(array)
  if array.ndim != len(shape) or any(s is not None and s != a
                                     for s, a in zip(shape, array.shape)):
    expected = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
    raise ValueError(f"{name} has shape {array.shape}; expected {expected}.")
  return array


def to_coco_results(image_ids, boxes, scores, classes, masks=None, valid=None, *,
                    category_ids: Sequence[int], image_sizes=None,
                    mask_threshold: float = 0.5) -> List[Dict[str, Any]]:
  """Batched detections -> a COCO results list (one dict per valid detection).

  Args:
    image_ids: (B,) COCO image ids.
    boxes: (B, K, 4) x1, y1, x2, y2 in pixels of the original image.
    scores: (B, K) detection scores.
    classes: (B, K) training ids, 0 <= id < len(category_ids) where valid.
    masks: optional (B, K, H, W) probabilities or 0/1 masks already pasted into
      the (padded) image; foreground is `mask >= mask_threshold`.
    valid: optional (B, K) bool; False rows (padding) are dropped. Padded
      images in a batch must have all rows False.
    category_ids: training id -> COCO category id.
    image_sizes: optional (B, 2) true (height, width) of each image, to crop
      masks padded beyond it; ignored without masks.
    mask_threshold: binarisation threshold for `masks`.

  Returns:
    Dicts with image_id, category_id, bbox [x, y, w, h], score and, with masks,
    segmentation {"size": [h, w], "counts": str} (compressed RLE).
  """
  image_ids = _host(image_ids, "image_ids", (None,))
  batch = image_ids.shape[0]
  boxes = _host(boxes, "boxes", (batch, None, 4))
  num = boxes.shape[1]
  scores = _host(scores, "scores", (batch, num))
  classes = _host(classes, "classes", (batch, num))
  valid = (np.ones((batch, num), bool) if valid is None
           else _host(valid, "valid", (batch, num)).astype(bool))
  category_ids = [int(c) for c in category_ids]
  if not (np.issubdtype(image_ids.dtype, np.integer)
          and np.issubdtype(classes.dtype, np.integer)):
    raise ValueError(f"image_ids ({image_ids.dtype}) and classes ({classes.dtype}) must be "
                     "integer arrays.")
  bad = valid & ((classes < 0) | (classes >= len(category_ids)))
  if bad.any():
    raise ValueError(f"classes {np.unique(classes[bad]).tolist()} of valid detections are "
                     f"outside the {len(category_ids)} training ids of category_ids; pass the "
                     "training id -> COCO category id table of this model's classes.")
  if masks is not None:
    if not hasattr(masks, "shape"):
      masks = np.asarray(masks)
    if len(masks.shape) != 4 or tuple(masks.shape[:2]) != (batch, num):
      raise ValueError(f"masks has shape {tuple(masks.shape)}; expected ({batch}, {num}, H, W) "
                       "masks pasted into the image.")
    height, width = masks.shape[2:]
    if image_sizes is None:
      image_sizes = np.tile([height, width], (batch, 1))
    image_sizes = _host(image_sizes, "image_sizes", (batch, 2)).astype(np.int64)
    if (image_sizes < 1).any() or (image_sizes > [height, width]).any():
      raise ValueError(f"image_sizes {image_sizes.tolist()} must lie in 1..({height}, {width}), "
                       "the masks' padded size.")

  results = []
  for b in range(batch):
    keep = np.flatnonzero(valid[b])
    if keep.size == 0:
      continue
    x1, y1, x2, y2 = boxes[b, keep].astype(np.float64).T
    rles = None
    if masks is not None:
      h, w = image_sizes[b]
      binary = np.asarray(masks[b])[keep, :h, :w] >= mask_threshold
      rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
    for i, k in enumerate(keep):
      result = {"image_id": int(image_ids[b]), "category_id": category_ids[int(classes[b, k])],
                "bbox": [float(x1[i]), float(y1[i]), float(x2[i] - x1[i]), float(y2[i] - y1[i])],
                "score": float(scores[b, k])}
      if rles is not None:
        result["segmentation"] = {"size": [int(s) for s in rles[i]["size"]],
                                  "counts": rles[i]["counts"].decode("ascii")}
      results.append(result)
  return results


def _quiet(verbose: bool):
  """Captures pycocotools' printing unless verbose."""
  return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


def load_coco(gt: GroundTruth, verbose: bool = False) -> COCO:
  """A COCO ground-truth object from a JSON path, a loaded JSON dict or a COCO."""
  if isinstance(gt, COCO):
    return gt
  with _quiet(verbose):
    if isinstance(gt, (str, os.PathLike)):
      return COCO(os.fspath(gt))
    if isinstance(gt, dict):
      coco = COCO()
      coco.dataset = gt
      coco.createIndex()
      return coco
  raise TypeError(f"Ground truth must be a COCO JSON path, its loaded dict or a "
                  f"pycocotools COCO object; got {type(gt).__name__}.")


def _detections(coco_gt: COCO, results: List[Dict[str, Any]], iou_type: str) -> COCO:
  """The detections as pycocotools' COCO object for one iou_type.

  For 'segm' the bbox key is dropped, so loadRes takes each detection's area
  from its mask, as in COCO's segm results format and detectron2. With no
  results (loadRes fails on an empty list) it is an empty COCO over the same
  images, which COCOeval scores as no detections.
  """
  if not results:
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]),
                       "categories": list(coco_gt.dataset["categories"]), "annotations": []}
    coco_dt.createIndex()
    return coco_dt
  if iou_type == "segm":
    results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
  else:
    results = [dict(r) for r in results]  # loadRes adds keys to each dict
  return coco_gt.loadRes(results)


def _check_results(coco_gt: COCO, results: List[Dict[str, Any]], iou_types) -> None:
  for iou_type in iou_types:
    key = "bbox" if iou_type == "bbox" else "segmentation"
    if any(key not in r for r in results):
      raise ValueError(f"iou_type {iou_type!r} needs a {key!r} in every result; some lack it "
                       "(pass masks to to_coco_results for 'segm', or evaluate 'bbox' only).")
  image_ids = {r["image_id"] for r in results} - set(coco_gt.getImgIds())
  if image_ids:
    raise ValueError(f"Results have image ids {sorted(image_ids)[:10]} that are not in the "
                     "ground truth's images.")
  category_ids = {r["category_id"] for r in results} - set(coco_gt.getCatIds())
  if category_ids:
    raise ValueError(f"Results have category ids {sorted(category_ids)[:10]} that are not in "
                     "the ground truth's categories; map training ids to COCO category ids "
                     "with category_ids.")


def _per_class_ap(coco_eval: COCOeval, coco_gt: COCO) -> Dict[str, float]:
  """detectron2's per-category AP: mean precision over IoU thresholds and recall
  thresholds at area 'all' and the largest maxDets, skipping -1 (no gt)."""
  precision = coco_eval.eval["precision"]  # (iou, recall, category, area, maxDets)
  per_class = {}
  for index, category_id in enumerate(coco_eval.params.catIds):
    values = precision[:, :, index, 0, -1]
    values = values[values > -1]
    name = coco_gt.cats[category_id]["name"]
    per_class[name] = float(np.mean(values)) if values.size else math.nan
  return per_class


def coco_evaluate(gt: GroundTruth, results: List[Dict[str, Any]],
                  iou_types: Sequence[str] = IOU_TYPES, *,
                  verbose: bool = False) -> Dict[str, Dict[str, Any]]:
  """COCO AP of `results` (the COCO results format) against ground truth `gt`.

  Runs pycocotools' COCOeval with its default parameters over every ground
  truth image and category.

  Args:
    gt: COCO instances JSON path, its loaded dict, or a pycocotools COCO.
    results: detections, e.g. from `to_coco_results`.
    iou_types: any of "bbox" and "segm".
    verbose: let pycocotools print its progress and summary (else captured).

  Returns:
    {iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10",
    "AR100", "ARs", "ARm", "ARl": fractions in [0, 1] (COCOeval.stats; its -1
    for "no ground truth in this area range" becomes nan), "per_class":
    {category name: AP fraction, nan without ground truth}}}. With no results
    every defined number is 0 and a warning says so.
  """
  iou_types = tuple(iou_types)
  unknown = [t for t in iou_types if t not in IOU_TYPES]
  if unknown or not iou_types:
    raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}; got {iou_types}.")
  coco_gt = load_coco(gt, verbose)
  names = [c["name"] for c in coco_gt.cats.values()]
  if len(set(names)) != len(names):
    raise ValueError("The ground truth's category names are not unique, so per-class AP "
                     "cannot be keyed by name; rename the duplicates.")
  results = list(results)
  _check_results(coco_gt, results, iou_types)
  if not results:
    warnings.warn("coco_evaluate got no detections: AP and AR are 0 for every category with "
                  "ground truth.", stacklevel=2)
  metrics = {}
  for iou_type in iou_types:
    with _quiet(verbose):
      coco_eval = COCOeval(coco_gt, _detections(coco_gt, results, iou_type), iou_type)
      coco_eval.evaluate()
      coco_eval.accumulate()
      coco_eval.summarize()
    summary = {key: float(value) if value >= 0 else math.nan
               for key, value in zip(SUMMARY_KEYS, coco_eval.stats)}
    summary["per_class"] = _per_class_ap(coco_eval, coco_gt)
    metrics[iou_type] = summary
  return metrics


def _percent(value: float) -> str:
  return "  nan" if math.isnan(value) else f"{100 * value:5.2f}"


def format_coco_table(metrics: Dict[str, Dict[str, Any]], columns: int = 3) -> str:
  """`coco_evaluate`'s output as text in percent: the 12 summary numbers and a
  per-category AP table `columns` categories wide, per iou_type."""
  lines = []
  for iou_type, summary in metrics.items():
    lines.append(f"{iou_type}: " + "  ".join(f"{key} {_percent(summary[key])}"
                                             for key in SUMMARY_KEYS))
    items = list(summary["per_class"].items())
    if not items:
      continue
    width = max(len("category"), *(len(name) for name, _ in items))
    cells = [f" {name:<{width}} | {_percent(ap)} " for name, ap in items]
    header = f" {'category':<{width}} |    AP "
    lines.append("|" + "|".join([header] * min(columns, len(cells))) + "|")
    lines.append("|" + "|".join([f"{'-' * (width + 2)}|-------"] * min(columns, len(cells)))
                 + "|")
    for start in range(0, len(cells), columns):
      lines.append("|" + "|".join(cells[start:start + columns]) + "|")
  return "\n".join(lines)


class CocoEvaluator:
  """Collects detections batch by batch over an eval loop, then runs COCO AP.

  Detections are converted to COCO results (host numpy, RLE) in `add`, so only
  the compact results are kept. Each image's detections must come in one
  `add`; an image id seen twice with valid detections raises, which catches
  padded batch entries that were not marked invalid.
  """

  def __init__(self, gt: GroundTruth, category_ids: Sequence[int], *,
               iou_types: Optional[Sequence[str]] = None, mask_threshold: float = 0.5,
               verbose: bool = False):
    """Loads the ground truth once.

    Args:
      gt: COCO instances JSON path, its loaded dict, or a pycocotools COCO.
      category_ids: training id -> COCO category id; all must be gt categories.
      iou_types: what `evaluate` scores; None: "bbox", plus "segm" when masks
        were added.
      mask_threshold: binarisation threshold for masks.
      verbose: let pycocotools print.
    """
    self._gt = load_coco(gt, verbose)
    self._category_ids = [int(c) for c in category_ids]
    missing = sorted(set(self._category_ids) - set(self._gt.getCatIds()))
    if missing:
      raise ValueError(f"category_ids {missing[:10]} are not categories of the ground truth; "
                       "category_ids must map training ids to its COCO category ids.")
    self._iou_types = None if iou_types is None else tuple(iou_types)
    self._mask_threshold = mask_threshold
    self._verbose = verbose
    self.reset()

  def reset(self) -> None:
    """Forgets all added detections."""
    self._results: List[Dict[str, Any]] = []
    self._seen = set()
    self._with_masks: Optional[bool] = None

  @property
  def results(self) -> List[Dict[str, Any]]:
    """The COCO results collected so far."""
    return self._results

  def add(self, image_ids, boxes, scores, classes, masks=None, valid=None,
          image_sizes=None) -> None:
    """Adds one batch; arguments as in `to_coco_results`."""
    with_masks = masks is not None
    if self._with_masks is not None and with_masks != self._with_masks:
      raise ValueError("Some batches were added with masks and some without; pass masks for "
                       "every batch or for none.")
    batch = to_coco_results(image_ids, boxes, scores, classes, masks, valid,
                            category_ids=self._category_ids, image_sizes=image_sizes,
                            mask_threshold=self._mask_threshold)
    rows = np.asarray(image_ids).reshape(-1).tolist()
    detected = (np.full(len(rows), np.shape(scores)[1] > 0) if valid is None
                else np.asarray(valid).astype(bool).any(axis=1))
    counts = collections.Counter(int(i) for i, d in zip(rows, detected) if d)
    repeated = sorted({i for i, n in counts.items() if n > 1} | (counts.keys() & self._seen))
    if repeated:
      raise ValueError(f"Image ids {repeated[:10]} got detections twice; each image must be "
                       "added once, and padded batch entries need valid=False.")
    self._with_masks = with_masks
    self._seen |= counts.keys()
    self._results.extend(batch)

  def evaluate(self) -> Dict[str, Dict[str, Any]]:
    """`coco_evaluate` over everything added."""
    iou_types = self._iou_types
    if iou_types is None:
      iou_types = IOU_TYPES if self._with_masks else ("bbox",)
    return coco_evaluate(self._gt, self._results, iou_types, verbose=self._verbose)


def _copy_annotation(annotation: Dict[str, Any]) -> Dict[str, Any]:
  """A copy of an annotation sharing no mutable value with it."""
  result = dict(annotation, bbox=list(annotation["bbox"]))
  if "segmentation" in annotation:
    result["segmentation"] = dict(annotation["segmentation"])
  return result


class GroundTruthBuilder:
  """Builds a COCO instances ground truth in memory from a dataset's eval records.

  Any dataset with per-instance boxes, classes and (optionally) masks can then
  be scored by `CocoEvaluator` / `coco_evaluate` without a COCO JSON: pass
  `to_dict()` as the ground truth and `category_ids` as the training id ->
  category id table. Category ids are training id + 1, named by `class_names`.

  Each valid row becomes one annotation: bbox [x, y, w, h] from the given box,
  segmentation the compressed RLE of its mask, area its mask's pixel count (the
  box's area without masks), iscrowd from `is_crowd`. COCO's own JSON gives
  polygon annotations the polygon's area, slightly different from the pixel
  count of its rasterised mask, so objects near 32^2 or 96^2 can fall into
  another of APs / APm / APl than with the official ground truth; AP, AP50 and
  AP75 are unaffected.
  """

  def __init__(self, class_names: Sequence[str]):
    """Starts an empty ground truth over `class_names` (training id order)."""
    names = [str(n) for n in class_names]
    if not names:
      raise ValueError("class_names is empty; pass the dataset's instance class names in "
                       "training id order.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
      raise ValueError(f"class_names repeats {repeated}; per-class AP is keyed by name, so "
                       "names must be unique.")
    self._categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    self._images: List[Dict[str, Any]] = []
    self._annotations: List[Dict[str, Any]] = []
    self._image_ids = set()
    self._with_masks: Optional[bool] = None

  @property
  def category_ids(self) -> List[int]:
    """Training id -> category id, i.e. [1, ..., K], for `CocoEvaluator`."""
    return [c["id"] for c in self._categories]

  def add(self, image_id: int, height: int, width: int, boxes, classes, masks=None,
          is_crowd=None, valid=None) -> None:
    """Adds one image and an annotation per valid row with a non-empty mask.

    Args:
      image_id: the image's id, as the detections' image ids; unique.
      height: the image's true height in pixels.
      width: the image's true width in pixels.
      boxes: (N, 4) x1, y1, x2, y2 in pixels (x2, y2 exclusive edges).
      classes: (N,) training ids, 0 <= id < len(class_names) where valid.
      masks: optional (N, H, W) masks, nonzero = foreground, with H >= height
        and W >= width (padding beyond the image is cropped away). Either every
        image has masks or none.
      is_crowd: optional (N,) bool; crowd regions are matched but not counted.
      valid: optional (N,) bool; False rows (padding) are skipped.
    """
    image_id = int(image_id)
    height, width = int(height), int(width)
    if image_id in self._image_ids:
      raise ValueError(f"Image id {image_id} was added twice; each image must be added once "
                       "with all its instances.")
    if height < 1 or width < 1:
      raise ValueError(f"Image {image_id} has size {height}x{width}; height and width must be "
                       "positive.")
    boxes = _host(boxes, "boxes", (None, 4)).astype(np.float64)
    num = boxes.shape[0]
    classes = _host(classes, "classes", (num,))
    if not np.issubdtype(classes.dtype, np.integer):
      raise ValueError(f"classes must be an integer array; got {classes.dtype}.")
    is_crowd = (np.zeros(num, bool) if is_crowd is None
                else _host(is_crowd, "is_crowd", (num,)).astype(bool))
    valid = np.ones(num, bool) if valid is None else _host(valid, "valid", (num,)).astype(bool)
    if not np.isfinite(boxes[valid]).all():
      raise ValueError(f"Image {image_id}: valid rows have non-finite boxes.")
    bad = valid & ((classes < 0) | (classes >= len(self._categories)))
    if bad.any():
      raise ValueError(f"Image {image_id}: classes {np.unique(classes[bad]).tolist()} of valid "
                       f"rows are outside the {len(self._categories)} training ids of "
                       "class_names.")
    with_masks = masks is not None
    if self._with_masks is not None and with_masks != self._with_masks:
      raise ValueError("Some images were added with masks and some without; pass masks for "
                       "every image or for none.")
    keep = np.flatnonzero(valid)
    if with_masks:
      masks = np.asarray(masks)
      if masks.ndim != 3 or masks.shape[0] != num:
        raise ValueError(f"masks has shape {masks.shape}; expected ({num}, H, W).")
      if masks.shape[1] < height or masks.shape[2] < width:
        raise ValueError(f"masks of shape {masks.shape} are smaller than image {image_id}'s "
                         f"{height}x{width}; pass masks covering the whole image.")
      binary = masks[keep, :height, :width] != 0
      rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
      areas = mask_utils.area(rles)
    self._with_masks = with_masks
    self._image_ids.add(image_id)
    self._images.append({"id": image_id, "height": height, "width": width})
    for i, k in enumerate(keep):
      x1, y1, x2, y2 = (float(v) for v in boxes[k])
      annotation = {"id": len(self._annotations) + 1, "image_id": image_id,
                    "category_id": int(classes[k]) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "iscrowd": int(is_crowd[k])}
      if with_masks:
        if areas[i] == 0:
          continue
        annotation["area"] = float(areas[i])
        annotation["segmentation"] = {"size": [height, width],
                                      "counts": rles[i]["counts"].decode("ascii")}
      else:
        annotation["area"] = (x2 - x1) * (y2 - y1)
      self._annotations.append(annotation)

  def to_dict(self) -> Dict[str, Any]:
    """The COCO instances dict (info, images, annotations, categories).

    Fresh copies each call: pycocotools writes into the annotations it scores.
    """
    if not self._images:
      raise ValueError("No images were added; add every eval image before evaluating.")
    return {"info": {"description": "segjax GroundTruthBuilder"},
            "images": [dict(image) for image in self._images],
            "annotations": [_copy_annotation(a) for a in self._annotations],
            "categories": [dict(c) for c in self._categories]}
