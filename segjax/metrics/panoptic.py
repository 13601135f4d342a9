"""Panoptic quality (PQ, SQ, RQ) with panopticapi's `pq_compute` definitions.

A ground-truth and a predicted segment match when they have the same category,
the ground truth is not crowd and IoU > 0.5, where the union leaves out the
predicted pixels on VOID (id 0). Unmatched non-crowd ground truth is a false
negative. An unmatched prediction is a false positive unless more than half of
it lies on VOID plus the crowd region of its own class. As in panopticapi, a
class's crowd region is its last crowd segment listed in the image's
segments_info (`crowd_region="last"`, the default); `crowd_region="union"` takes
all of that class's crowd segments instead, which differs from panopticapi only
when an image lists several crowd segments of one class (COCO's converters write
one per class).

Per image, the pixels are cut into raster-order runs of one (gt id, predicted id)
pair (two compares per pixel; panoptic maps are piecewise constant, so runs are
few), the runs' ids become segment rows by binary search, and one weighted
histogram of the runs gives the whole (gt segment x predicted segment)
intersection table; matching is done on that table. Maps with too many runs go
pixel by pixel (a per-thread 16 MiB byte lookup table, then a 2-D histogram).
`image_pq_stats` is the pure per-image step (per-class TP, FP, FN, IoU sum),
`PQAccumulator` sums it over images in memory, and `pq_compute` reads COCO
panoptic JSON + PNG files into the same accumulator, in several threads when
asked.
"""
import concurrent.futures
import dataclasses
import json
import os
import threading
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from segjax import paths

VOID = 0
MATCH_IOU = 0.5
IGNORE_FRACTION = 0.5
CROWD_REGIONS = ("last", "union")
_LUT_SIZE = 1 << 24
# Pixel-by-pixel counting once the runs exceed 1 / _MAX_RUN_FRACTION of the pixels.
_MAX_RUN_FRACTION = 8
_lut_store = threading.local()

Segment = Mapping[str, Any]
Categories = Union[Sequence[Mapping[str, Any]], Mapping[int, Mapping[str, Any]]]


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
  """Segment ids `R + 256 G + 256^2 B` (uint32) of an (..., 3) RGB array."""
  rgb = np.asarray(rgb)
  if rgb.ndim < 1 or rgb.shape[-1] < 3:
    raise ValueError(f"rgb_to_id needs an (..., 3) RGB array, got shape {rgb.shape}.")
  ids = rgb[..., 0].astype(np.uint32)
  ids |= rgb[..., 1].astype(np.uint32) << 8
  ids |= rgb[..., 2].astype(np.uint32) << 16
  return ids


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
  """The (..., 3) uint8 RGB encoding of segment ids in [0, 2^24), inverse of `rgb_to_id`."""
  ids = np.asarray(ids)
  if ids.size and (ids.min() < 0 or ids.max() >= 1 << 24):
    raise ValueError("Segment ids must lie in [0, 2^24) to be stored as RGB.")
  ids = ids.astype(np.uint32)
  return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class PQStats:
  """Per-class counts, indexed like the category list they were computed for.

  Attributes:
    tp: (C,) int64 matched pairs.
    fp: (C,) int64 unmatched, not ignored predictions.
    fn: (C,) int64 unmatched, non-crowd ground truth.
    iou: (C,) float64 sum of the matched pairs' IoU.
  """
  tp: np.ndarray
  fp: np.ndarray
  fn: np.ndarray
  iou: np.ndarray

  @classmethod
  def zeros(cls, num_classes: int) -> "PQStats":
    return cls(np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64),
               np.zeros(num_classes, np.int64), np.zeros(num_classes, np.float64))

  def __add__(self, other: "PQStats") -> "PQStats":
    return PQStats(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn,
                   self.iou + other.iou)


def _where(image_id: Any) -> str:
  return "" if image_id is None else f"In the image with image_id {image_id!r}: "


def _segment_table(segments: Sequence[Segment], category_index: Mapping[int, int], kind: str,
                   image_id: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Sorted segment ids with VOID first, and their class index, crowd flag and area field.

  Area is NaN where a segment gives none. Row 0 (VOID) has class -1.
  """
  rows = []
  for segment in segments:
    try:
      segment_id, category_id = int(segment["id"]), int(segment["category_id"])
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{_where(image_id)}{kind} segment {segment!r} needs integer 'id' and "
                       f"'category_id' fields.") from e
    if segment_id <= VOID:
      raise ValueError(f"{_where(image_id)}{kind} segment id {segment_id} is invalid: id 0 is "
                       f"VOID and ids must be positive.")
    if category_id not in category_index:
      raise ValueError(f"{_where(image_id)}{kind} segment with id {segment_id} has unknown "
                       f"category_id {category_id}; known category ids: "
                       f"{sorted(category_index)}.")
    area = segment.get("area")
    if area is not None and area < 0:
      raise ValueError(f"{_where(image_id)}{kind} segment with id {segment_id} has negative "
                       f"area {area}.")
    rows.append((segment_id, category_index[category_id], bool(segment.get("iscrowd", 0)),
                 np.nan if area is None else float(area)))
  rows.sort(key=lambda row: row[0])
  ids = np.array([VOID] + [r[0] for r in rows], np.int64)
  duplicates = np.unique(ids[1:-1][ids[1:-1] == ids[2:]])
  if len(duplicates):
    raise ValueError(f"{_where(image_id)}{kind} segments_info lists segment ids "
                     f"{list(map(int, duplicates))} more than once; ids must be unique.")
  classes = np.array([-1] + [r[1] for r in rows], np.int64)
  crowd = np.array([False] + [r[2] for r in rows], bool)
  area = np.array([np.nan] + [r[3] for r in rows], np.float64)
  return ids, classes, crowd, area


def _lookup_rows(id_map: np.ndarray, table_ids: np.ndarray) -> np.ndarray:
  """1 + the row of the sorted `table_ids` holding each pixel's id; 0 where no row does.

  Ids below 2^24 (all that an RGB PNG holds) are looked up in a per-thread byte table
  kept between calls: one gather per pixel. Other maps use a binary search.
  """
  unsigned = np.issubdtype(id_map.dtype, np.unsignedinteger)
  if (len(table_ids) < 256 and table_ids[-1] < _LUT_SIZE and id_map.size
      and (unsigned or id_map.min() >= 0)
      and ((unsigned and id_map.dtype.itemsize <= 2) or id_map.max() < _LUT_SIZE)):
    lut = getattr(_lut_store, "lut", None)
    if lut is None:
      lut = _lut_store.lut = np.zeros(_LUT_SIZE, np.uint8)
    lut[table_ids] = np.arange(1, len(table_ids) + 1)
    try:
      return lut.take(id_map)
    finally:
      lut[table_ids] = 0
  return _search_rows(id_map, table_ids)


def _search_rows(ids: np.ndarray, table_ids: np.ndarray) -> np.ndarray:
  """`_lookup_rows` by binary search: for few ids or ids past the byte table."""
  if table_ids[-1] <= np.iinfo(ids.dtype).max:
    table_ids = table_ids.astype(ids.dtype)  # Same dtypes: searchsorted copies nothing.
  else:
    ids = ids.astype(np.int64)
  position = np.minimum(np.searchsorted(table_ids, ids), len(table_ids) - 1)
  return np.where(table_ids[position] == ids, position + 1, 0)


def _pair_counts(g_rows: np.ndarray, p_rows: np.ndarray, num_g: int,
                 num_p: int) -> np.ndarray:
  """(num_g, num_p) int64 counts of the (g_rows, p_rows) value pairs over all pixels."""
  if g_rows.dtype == p_rows.dtype == np.uint8 and g_rows.size < 1 << 24:
    # OpenCV's 2-D histogram of byte images, ~6x faster than bincount; its float32 counts
    # are exact below 2^24.
    counts = cv2.calcHist([g_rows, p_rows], [0, 1], None, [num_g, num_p],
                          [0, num_g, 0, num_p])
    return counts.astype(np.int64)
  combined = g_rows.astype(np.intp).ravel()
  combined *= num_p
  combined += p_rows.ravel()
  return np.bincount(combined, minlength=num_g * num_p).reshape(num_g, num_p)


def _joint_counts(gt_ids: np.ndarray, pred_ids: np.ndarray, g_ids: np.ndarray,
                  p_ids: np.ndarray) -> np.ndarray:
  """(len(g_ids) + 1, len(p_ids) + 1) int64 pixel counts per (gt row + 1, predicted row + 1).

  Row/column 0 counts ids missing from the tables. Panoptic maps are piecewise constant, so
  the pixels are first cut into raster-order runs of one (gt id, predicted id) pair: two
  compares per pixel, then the lookups and the histogram run over the few runs only. Maps
  with too many runs for that to pay go pixel by pixel.
  """
  num_g, num_p = len(g_ids) + 1, len(p_ids) + 1
  g, p = gt_ids.ravel(), pred_ids.ravel()
  change = g[1:] != g[:-1]
  change |= p[1:] != p[:-1]
  ends = np.flatnonzero(change)
  if len(ends) > g.size // _MAX_RUN_FRACTION:
    return _pair_counts(_lookup_rows(gt_ids, g_ids), _lookup_rows(pred_ids, p_ids), num_g,
                        num_p)
  starts = np.empty(len(ends) + 1, np.intp)
  starts[0] = 0
  np.add(ends, 1, out=starts[1:])
  lengths = np.diff(starts, append=g.size)
  code = _search_rows(g[starts], g_ids)
  code *= num_p
  code += _search_rows(p[starts], p_ids)
  # Float64 sums of integer run lengths are exact below 2^53 pixels.
  counts = np.bincount(code, weights=lengths, minlength=num_g * num_p)
  return counts.astype(np.int64).reshape(num_g, num_p)


def image_pq_stats(gt_ids: np.ndarray, gt_segments: Sequence[Segment], pred_ids: np.ndarray,
                   pred_segments: Sequence[Segment], category_ids: Sequence[int],
                   image_id: Any = None, crowd_region: str = "last") -> PQStats:
  """Per-class TP, FP, FN and IoU sum of one image.

  Args:
    gt_ids: (H, W) integer ground-truth segment ids, 0 = VOID.
    gt_segments: dicts with 'id', 'category_id', optional 'iscrowd' (default 0) and
      optional 'area' (used as the segment's area when given, as panopticapi does with
      the JSON area; otherwise its pixel count).
    pred_ids: (H, W) integer predicted segment ids, 0 = VOID.
    pred_segments: dicts with 'id' and 'category_id'; area is always the pixel count.
    category_ids: the known category ids; the result is indexed in this order.
    image_id: only used to name the image in error messages.
    crowd_region: which crowd segments of a class excuse its unmatched predictions:
      "last" (the last listed, panopticapi's rule) or "union" (all of them).

  Returns:
    PQStats over `category_ids`.
  """
  gt_ids, pred_ids = np.asarray(gt_ids), np.asarray(pred_ids)
  if gt_ids.ndim != 2 or gt_ids.shape != pred_ids.shape:
    raise ValueError(f"{_where(image_id)}ground-truth and predicted id maps must be 2-D of "
                     f"the same shape, got {gt_ids.shape} and {pred_ids.shape}.")
  for kind, id_map in (("ground-truth", gt_ids), ("predicted", pred_ids)):
    if not np.issubdtype(id_map.dtype, np.integer):
      raise ValueError(f"{_where(image_id)}the {kind} id map must be an integer array, got "
                       f"{id_map.dtype}.")
  if crowd_region not in CROWD_REGIONS:
    raise ValueError(f"crowd_region must be one of {CROWD_REGIONS}, got {crowd_region!r}.")
  category_index = {int(c): i for i, c in enumerate(category_ids)}
  num_classes = len(category_index)
  g_ids, g_class, g_crowd, g_area_field = _segment_table(gt_segments, category_index,
                                                         "ground-truth", image_id)
  p_ids, p_class, _, _ = _segment_table(pred_segments, category_index, "predicted", image_id)
  # counts[i, j]: pixels in gt row i - 1 and predicted row j - 1; row/column 0 counts ids
  # that are in no segments_info, which must be none.
  counts = _joint_counts(gt_ids, pred_ids, g_ids, p_ids)
  for kind, id_map, table_ids, unknown_count in (
      ("ground-truth", gt_ids, g_ids, counts[0].sum()),
      ("predicted", pred_ids, p_ids, counts[:, 0].sum())):
    if unknown_count:
      unknown = np.unique(id_map)
      unknown = unknown[_search_rows(unknown, table_ids) == 0]
      raise ValueError(f"{_where(image_id)}segment ids {list(map(int, unknown[:10]))} are in "
                       f"the {kind} id map (PNG) but not in its segments_info; list every "
                       f"non-VOID id of the map.")
  # table[i, j]: pixels in gt row i and predicted row j; row/column 0 is VOID.
  table = counts[1:, 1:]
  p_area = table.sum(axis=0)
  missing = p_ids[1:][p_area[1:] == 0]
  if len(missing):
    raise ValueError(f"{_where(image_id)}predicted segment ids {list(map(int, missing[:10]))} "
                     f"are listed in segments_info but absent from the predicted id map (PNG); "
                     f"list only segments that have pixels.")
  g_area = np.where(np.isnan(g_area_field), table.sum(axis=1), g_area_field)

  # From here on, segments only: VOID row and column dropped.
  inter, void = table[1:, 1:], table[0, 1:]
  g_class, g_crowd, g_area = g_class[1:], g_crowd[1:], g_area[1:]
  p_class, p_area = p_class[1:], p_area[1:]
  same_class = g_class[:, None] == p_class[None, :]
  union = p_area[None, :] + g_area[:, None] - inter - void[None, :]
  candidate = same_class & ~g_crowd[:, None] & (inter > 0)
  iou = np.divide(inter, union, out=np.zeros(inter.shape), where=candidate)
  matched = candidate & (iou > MATCH_IOU)

  pair_class = np.broadcast_to(g_class[:, None], matched.shape)[matched]
  tp = np.bincount(pair_class, minlength=num_classes)
  iou_sum = np.bincount(pair_class, weights=iou[matched], minlength=num_classes)
  fn_rows = ~matched.any(axis=1) & ~g_crowd
  fn = np.bincount(g_class[fn_rows], minlength=num_classes)
  region = g_crowd
  if crowd_region == "last":  # panopticapi: one crowd segment per class, the last listed
    last = {}
    for segment in gt_segments:
      if segment.get("iscrowd", 0):
        last[segment["category_id"]] = int(segment["id"])
    region = np.isin(g_ids[1:], np.array(list(last.values()), g_ids.dtype)) & g_crowd
  on_crowd = (inter * (same_class & region[:, None])).sum(axis=0)
  ignored = (void + on_crowd) / p_area > IGNORE_FRACTION
  fp_cols = ~matched.any(axis=0) & ~ignored
  fp = np.bincount(p_class[fp_cols], minlength=num_classes)
  return PQStats(tp.astype(np.int64), fp.astype(np.int64), fn.astype(np.int64),
                 iou_sum.astype(np.float64))


def _category_list(categories: Categories) -> List[Dict[str, Any]]:
  """COCO category dicts from a list of dicts or a mapping id -> dict."""
  if isinstance(categories, Mapping):
    categories = [dict(value, id=key) for key, value in categories.items()]
  result = []
  for category in categories:
    if "id" not in category or "isthing" not in category:
      raise ValueError(f"Category {category!r} needs 'id' and 'isthing' fields (COCO panoptic "
                       f"categories).")
    result.append(dict(category, id=int(category["id"])))
  ids = [c["id"] for c in result]
  if len(set(ids)) != len(ids):
    raise ValueError(f"Category ids must be unique, got {ids}.")
  if not result:
    raise ValueError("PQ needs at least one category.")
  return result


class PQAccumulator:
  """Sums per-image panoptic statistics and reports PQ like panopticapi.

  Usage in an evaluation loop:
    acc = PQAccumulator(categories)
    for ...: acc.add(gt_ids, gt_segments, pred_ids, pred_segments)
    result = acc.result()
  Statistics computed elsewhere (e.g. in worker processes with `image_pq_stats`
  over `acc.category_ids`) are folded in with `add_stats`.
  """

  def __init__(self, categories: Categories, crowd_region: str = "last"):
    """Categories: COCO dicts with 'id' and 'isthing' (list, or mapping id -> dict);
    crowd_region: see `image_pq_stats`."""
    self.crowd_region = crowd_region
    self.categories = _category_list(categories)
    self.category_ids = tuple(c["id"] for c in self.categories)
    self.stats = PQStats.zeros(len(self.category_ids))

  def add(self, gt_ids: np.ndarray, gt_segments: Sequence[Segment], pred_ids: np.ndarray,
          pred_segments: Sequence[Segment], image_id: Any = None) -> None:
    """Adds one image; see `image_pq_stats` for the arguments."""
    self.add_stats(image_pq_stats(gt_ids, gt_segments, pred_ids, pred_segments,
                                  self.category_ids, image_id, self.crowd_region))

  def add_stats(self, stats: PQStats) -> None:
    """Adds statistics computed over `self.category_ids`."""
    if stats.tp.shape != (len(self.category_ids),):
      raise ValueError(f"PQStats over {stats.tp.shape[0]} classes do not fit this accumulator's "
                       f"{len(self.category_ids)}; compute them over acc.category_ids.")
    self.stats = self.stats + stats

  def result(self) -> Dict[Any, Any]:
    """{'All'|'Things'|'Stuff': {'pq','sq','rq','n'}, 'per_class': {id: {'pq','sq','rq'}}}.

    Classes with no TP, FP or FN get zeros in 'per_class' and are left out of the
    means; a group with no such class has n = 0 and NaN means.
    """
    tp, fp, fn, iou = (np.asarray(x, np.float64) for x in dataclasses.astuple(self.stats))
    present = (tp + fp + fn) > 0
    denominator = np.where(present, tp + 0.5 * fp + 0.5 * fn, 1.0)
    pq = np.where(present, iou / denominator, 0.0)
    sq = np.where(tp > 0, iou / np.maximum(tp, 1.0), 0.0)
    rq = np.where(present, tp / denominator, 0.0)
    isthing = np.array([bool(c["isthing"]) for c in self.categories])
    result = {}
    for name, group in (("All", np.ones_like(isthing)), ("Things", isthing),
                        ("Stuff", ~isthing)):
      keep = group & present
      n = int(keep.sum())
      means = [float(v[keep].mean()) if n else float("nan") for v in (pq, sq, rq)]
      result[name] = {"pq": means[0], "sq": means[1], "rq": means[2], "n": n}
    result["per_class"] = {cid: {"pq": float(pq[i]), "sq": float(sq[i]), "rq": float(rq[i])}
                           for i, cid in enumerate(self.category_ids)}
    return result


def read_id_png(path: str) -> np.ndarray:
  """(H, W) uint32 segment ids of a panoptic PNG (RGB encoded; a 1-channel PNG holds ids),
  local or gs://."""
  if paths.is_url(path):
    try:
      data = np.frombuffer(paths.read_bytes(path), np.uint8)
    except paths.storage_errors():
      data = np.zeros(0, np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
  else:
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
  if image is None:
    raise FileNotFoundError(f"Cannot read the panoptic PNG {path}: missing or not an image.")
  if image.ndim == 2:
    return image.astype(np.uint32)
  if image.shape[2] < 3:
    raise ValueError(f"Panoptic PNG {path} has {image.shape[2]} channels; expected RGB.")
  if image.dtype != np.uint8:
    return rgb_to_id(image[..., 2::-1])  # OpenCV decodes to BGR(A).
  # RGBA bytes read as little-endian uint32 are R + 256 G + 256^2 B + 256^3 A.
  code = cv2.COLOR_BGR2RGBA if image.shape[2] == 3 else cv2.COLOR_BGRA2RGBA
  ids = cv2.cvtColor(image, code).view(np.dtype("<u4"))[..., 0]
  ids &= 0xFFFFFF
  return ids


def _evaluate_pairs(pairs: Sequence[Tuple[Segment, Segment]], gt_folder: str, pred_folder: str,
                    category_ids: Sequence[int], crowd_region: str) -> List[PQStats]:
  """Per-image statistics of (gt annotation, prediction annotation) pairs read from disk."""
  stats = []
  for gt_ann, pred_ann in pairs:
    gt_ids = read_id_png(os.path.join(gt_folder, gt_ann["file_name"]))
    pred_ids = read_id_png(os.path.join(pred_folder, pred_ann["file_name"]))
    stats.append(image_pq_stats(gt_ids, gt_ann["segments_info"], pred_ids,
                                pred_ann["segments_info"], category_ids, gt_ann["image_id"],
                                crowd_region))
  return stats


def _load_json(path: str, kind: str) -> Dict[str, Any]:
  data = json.loads(paths.path(path).read_text())
  if not isinstance(data, dict) or "annotations" not in data:
    raise ValueError(f"{kind} JSON {path} has no 'annotations' list; expected the COCO panoptic "
                     f"format.")
  for ann in data["annotations"]:
    for key in ("image_id", "file_name", "segments_info"):
      if key not in ann:
        raise ValueError(f"An annotation in {kind} JSON {path} has no '{key}' field: "
                         f"{ {k: v for k, v in ann.items() if k != 'segments_info'} }.")
  return data


def _matched_annotations(gt_json: Dict[str, Any], pred_json: Dict[str, Any],
                         pred_json_file: str) -> List[Tuple[Segment, Segment]]:
  """(gt, prediction) annotation pairs matched on image_id, in ground-truth order."""
  predictions = {}
  for ann in pred_json["annotations"]:
    if ann["image_id"] in predictions:
      raise ValueError(f"{pred_json_file} has several annotations for image_id "
                       f"{ann['image_id']!r}; give one per image.")
    predictions[ann["image_id"]] = ann
  pairs, seen = [], set()
  for gt_ann in gt_json["annotations"]:
    image_id = gt_ann["image_id"]
    if image_id in seen:
      raise ValueError(f"The ground-truth JSON has several annotations for image_id "
                       f"{image_id!r}.")
    seen.add(image_id)
    if image_id not in predictions:
      raise ValueError(f"No prediction for the image with image_id {image_id!r} "
                       f"({gt_ann['file_name']}) in {pred_json_file}; every ground-truth image "
                       f"needs one.")
    pairs.append((gt_ann, predictions[image_id]))
  return pairs


def _chunks(items: Sequence[Any], num_chunks: int) -> List[Sequence[Any]]:
  bounds = np.linspace(0, len(items), num_chunks + 1).round().astype(int)
  return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def pq_compute(gt_json_file: str, pred_json_file: str, gt_folder: Optional[str] = None,
               pred_folder: Optional[str] = None,
               num_workers: Optional[int] = None,
               crowd_region: str = "last") -> Dict[Any, Any]:
  """Panoptic quality of COCO panoptic predictions, as panopticapi's `pq_compute`.

  Args:
    gt_json_file: ground-truth JSON ('annotations' with image_id, file_name,
      segments_info; 'categories' with id and isthing).
    pred_json_file: prediction JSON, one annotation per ground-truth image_id.
    gt_folder: folder of the ground-truth PNGs; default the JSON path without extension.
    pred_folder: folder of the predicted PNGs; default the JSON path without extension.
    num_workers: threads reading and scoring images; None = os.cpu_count(), 1 = the calling
      thread alone. Threads, not processes: PNG decoding (OpenCV) and the pixel passes
      (numpy) release the GIL, so threads scale with the cores and start at once, while a
      process would first import numpy, OpenCV and, through segjax.metrics, JAX.
    crowd_region: "last" (panopticapi's rule: a class's crowd region is its last crowd
      segment listed) or "union" (all its crowd segments); see `image_pq_stats`.

  Returns:
    {'All'|'Things'|'Stuff': {'pq','sq','rq','n'}, 'per_class': {category_id: {'pq','sq','rq'}}}
    with values in [0, 1]. Nothing is printed; see `format_pq_table`.
  """
  gt_folder = os.path.splitext(gt_json_file)[0] if gt_folder is None else gt_folder
  pred_folder = os.path.splitext(pred_json_file)[0] if pred_folder is None else pred_folder
  for folder, kind in ((gt_folder, "ground-truth"), (pred_folder, "prediction")):
    if not paths.path(folder).is_dir():
      raise FileNotFoundError(f"The {kind} PNG folder {folder} does not exist; pass "
                              f"{'gt' if kind == 'ground-truth' else 'pred'}_folder.")
  gt_json = _load_json(gt_json_file, "Ground-truth")
  pred_json = _load_json(pred_json_file, "Prediction")
  if "categories" not in gt_json:
    raise ValueError(f"Ground-truth JSON {gt_json_file} has no 'categories'.")
  accumulator = PQAccumulator(gt_json["categories"], crowd_region)
  pairs = _matched_annotations(gt_json, pred_json, pred_json_file)
  if num_workers is not None and num_workers < 1:
    raise ValueError(f"num_workers must be >= 1 or None, got {num_workers}.")
  workers = min(num_workers or os.cpu_count() or 1, len(pairs))
  if workers <= 1:
    per_image = _evaluate_pairs(pairs, gt_folder, pred_folder, accumulator.category_ids,
                                crowd_region)
  else:
    # A few chunks per thread balance the load; per-image results keep the sum order fixed so
    # that any number of workers gives bit-identical results.
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      chunks = pool.map(lambda chunk: _evaluate_pairs(chunk, gt_folder, pred_folder,
                                                      accumulator.category_ids, crowd_region),
                        _chunks(pairs, 4 * workers))
      per_image = [s for chunk in chunks for s in chunk]
  for stats in per_image:
    accumulator.add_stats(stats)
  return accumulator.result()


def format_pq_table(result: Mapping[Any, Any],
                    categories: Optional[Categories] = None) -> str:
  """PQ/SQ/RQ in percent for All/Things/Stuff; per class too when categories are given.

  Categories: COCO dicts (list or mapping id -> dict) whose 'name' labels the rows.
  """
  lines = [f"{'':14s}| {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} | {'N':>4s}", "-" * 42]
  for name in ("All", "Things", "Stuff"):
    row = result[name]
    lines.append(f"{name:14s}| {100 * row['pq']:6.2f} {100 * row['sq']:6.2f} "
                 f"{100 * row['rq']:6.2f} | {row['n']:4d}")
  if categories is not None:
    lines.append("-" * 42)
    for category in _category_list(categories):
      row = result["per_class"][category["id"]]
      label = str(category.get("name", category["id"]))[:14]
      lines.append(f"{label:14s}| {100 * row['pq']:6.2f} {100 * row['sq']:6.2f} "
                   f"{100 * row['rq']:6.2f} |")
  return "\n".join(lines)


__all__ = ["PQAccumulator", "PQStats", "format_pq_table", "id_to_rgb", "image_pq_stats",
           "pq_compute", "read_id_png", "rgb_to_id"]
