"""COCO: segjax's mask formats equal pycocotools', and tiny archives in the exact
cocodataset.org layout are prepared and read back without TensorFlow."""
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from segjax.data import coco_builder, coco_masks
from segjax.data.sources import DatasetNotFoundError, get_dataset


def _random_polygon(rng, kind, h, w):
  """Vertices (n, 2) of one of several hard cases for the rasteriser."""
  n = int(rng.integers(3, 12))
  size = max(h, w)
  if kind == 0:  # anywhere, partly outside the image
    return rng.uniform(-10, size + 10, (n, 2))
  if kind == 1:  # sub-pixel to a few pixels
    return rng.uniform(0, 3, (n, 2)) + rng.uniform(-1, size, 2)
  if kind == 2:  # half-pixel grid: rounding ties after the 5x upsampling
    return np.round(rng.uniform(-2, size + 2, (n, 2)) * 2) / 2
  if kind == 3:  # integer grid with a repeated vertex
    xy = rng.integers(-3, size + 3, (n, 2)).astype(float)
    xy[rng.integers(1, n)] = xy[rng.integers(0, n)]
    return xy
  if kind == 4:  # consecutive vertices closer than one fine-grid step
    xy = rng.uniform(0, size, (n, 2))
    xy[1] = xy[0] + rng.uniform(-0.09, 0.09, 2)
    return xy
  if kind == 5:  # tenths, which are inexact in binary
    return rng.integers(-20, 10 * size + 20, (n, 2)) / 10
  if kind == 6:  # star: strongly concave
    angles = np.sort(rng.uniform(0, 2 * np.pi, n + 6))
    radii = rng.uniform(0.5, size / 2, angles.size) * np.where(np.arange(angles.size) % 2, 1, .3)
    return rng.uniform(0, size, 2) + np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None]
  if kind == 7:  # collinear
    return rng.uniform(0, size, 2) + rng.uniform(-size, size, 2) * rng.uniform(0, 1, (n, 1))
  return rng.uniform(-1000, 1000, (n, 2))  # far outside a small image


@pytest.mark.parametrize("kind", range(9))
def test_polygons_match_pycocotools(kind):
  rng = np.random.default_rng(kind)
  for _ in range(200):
    h, w = (int(v) for v in rng.integers(1, 48, 2))
    polygon = _random_polygon(rng, kind, h, w).reshape(-1).tolist()
    reference = coco_mask.frPyObjects([polygon], h, w)[0]
    mask = coco_masks.polygon_to_mask(polygon, h, w)
    np.testing.assert_array_equal(mask, coco_mask.decode(reference), err_msg=str(polygon))
    assert coco_masks.encode_rle(mask)["counts"] == reference["counts"].decode()
    assert mask.sum() == coco_mask.area(reference)


def test_multi_part_and_degenerate_polygons_match_coco_ann_to_mask():
  rng = np.random.default_rng(10)
  for trial in range(150):
    h, w = (int(v) for v in rng.integers(1, 40, 2))
    parts = [_random_polygon(rng, int(rng.integers(0, 9)), h, w).reshape(-1).tolist()
             for _ in range(int(rng.integers(1, 4)))]
    if trial % 3 == 0:  # one- and two-point parts (pycocotools needs a full first part)
      parts.append(rng.uniform(-2, max(h, w), 2 * int(rng.integers(1, 3))).tolist())
    reference = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(parts, h, w)))
    np.testing.assert_array_equal(coco_masks.annotation_to_mask(parts, h, w), reference)


def test_uncompressed_rle_matches_pycocotools():
  rng = np.random.default_rng(11)
  for _ in range(200):
    h, w = (int(v) for v in rng.integers(1, 40, 2))
    cuts = np.sort(rng.integers(0, h * w + 1, int(rng.integers(0, 12))))  # may repeat: empty runs
    counts = np.diff(np.concatenate([[0], cuts, [h * w]])).tolist()
    rle = {"counts": counts, "size": [h, w]}
    reference = coco_mask.frPyObjects(rle, h, w)
    np.testing.assert_array_equal(coco_masks.annotation_to_mask(rle, h, w),
                                  coco_mask.decode(reference))
    assert coco_masks.rle_area(rle) == coco_mask.area(reference)


def test_compressed_rle_round_trips_and_matches_pycocotools():
  rng = np.random.default_rng(12)
  masks = [(rng.random((int(h), int(w))) < rng.random()).astype(np.uint8)
           for h, w in rng.integers(1, 40, (150, 2))]
  big = np.zeros((300, 500), np.uint8)  # long runs: multi-character, negative deltas
  big[20:280, 30:470] = 1
  big[100:110, 200:400] = 0
  masks += [big, np.ones((7, 9), np.uint8), np.zeros((5, 3), np.uint8)]
  for mask in masks:
    reference = coco_mask.encode(np.asfortranarray(mask))
    string = reference["counts"].decode()
    counts = coco_masks.string_to_counts(string)
    assert counts == coco_masks.encode_counts(mask)
    assert coco_masks.counts_to_string(counts) == string
    assert coco_masks.encode_rle(mask) == {"size": list(mask.shape), "counts": string}
    for given in (string, reference["counts"]):
      rle = {"size": list(mask.shape), "counts": given}
      np.testing.assert_array_equal(coco_masks.decode_rle(rle), mask)
      assert coco_masks.rle_area(rle) == coco_mask.area(reference)
  # A mask starting with a foreground pixel has an empty first run of zeros.
  assert coco_masks.encode_counts(np.array([[1, 0], [1, 1]])) == [0, 2, 1, 1]


def test_malformed_masks_raise():
  with pytest.raises(ValueError, match="even number"):
    coco_masks.polygon_to_mask([1, 2, 3, 4, 5], 4, 4)
  with pytest.raises(ValueError, match="sum to 5"):
    coco_masks.decode_counts([2, 3], 2, 2)
  with pytest.raises(ValueError, match="ASCII"):
    coco_masks.string_to_counts("1~")
  with pytest.raises(ValueError, match="truncated"):
    coco_masks.string_to_counts("1P")
  with pytest.raises(ValueError, match=r"size \[3, 2\]"):
    coco_masks.annotation_to_mask({"counts": [6], "size": [3, 2]}, 2, 3)


# ---- Tiny archives in the cocodataset.org layout -------------------------------------------


def _jpeg(rng, h, w):
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, format="JPEG")
  return buffer.getvalue()


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def _image_entry(image_id, h, w):
  name = f"{image_id:012d}.jpg"
  return {"license": 1, "file_name": name, "height": h, "width": w, "id": image_id,
          "coco_url": f"http://images.cocodataset.org/x/{name}", "flickr_url": "",
          "date_captured": "2013-11-14 17:02:52"}


# split -> [(image id, height, width)]
_IMAGES = {"train2017": [(139, 30, 40), (285, 24, 36), (632, 20, 26)],
           "val2017": [(397133, 28, 20)]}


def _instance_annotations(split, rng):
  """Annotations of every segmentation kind COCO uses (category ids are COCO's)."""
  if split == "val2017":
    plant = coco_mask.encode(np.asfortranarray(np.pad(np.ones((10, 6), np.uint8),
                                                      ((5, 13), (4, 10)))))
    crowd = coco_mask.encode(np.asfortranarray((rng.random((28, 20)) < .3).astype(np.uint8)))
    return [
        {"image_id": 397133, "category_id": 64, "iscrowd": 0, "bbox": [4, 5, 6, 10],
         "segmentation": {"size": [28, 20], "counts": plant["counts"].decode()}},
        {"image_id": 397133, "category_id": 52, "iscrowd": 1, "bbox": [0, 0, 20, 28],
         "segmentation": {"size": [28, 20], "counts": crowd["counts"].decode()}},
    ]
  crowd = (rng.random((24, 36)) < .4).astype(np.uint8)
  return [
      {"image_id": 139, "category_id": 18, "iscrowd": 0, "bbox": [3.2, 4.5, 20.1, 15.3],
       "segmentation": [[3.2, 4.5, 23.3, 6.0, 18.7, 19.8, 5.1, 12.4]]},
      {"image_id": 139, "category_id": 1, "iscrowd": 0, "bbox": [-2.0, 20.0, 44.0, 12.0],
       "segmentation": [[25.5, 20.0, 33.0, 21.5, 30.2, 27.9], [-2.0, 25.0, 8.0, 24.0, 4.0, 32.0]]},
      {"image_id": 139, "category_id": 90, "iscrowd": 0, "bbox": [10.0, 10.0, 0.0, 5.0],
       "segmentation": [[10.0, 10.0, 10.0, 12.0, 10.0, 15.0]]},  # zero-width box: kept
      {"image_id": 285, "category_id": 1, "iscrowd": 1, "bbox": [0, 0, 36, 24],
       "segmentation": {"size": [24, 36], "counts": coco_masks.encode_counts(crowd)}},
  ]  # image 632 has no annotations


def _instances_json(split, rng):
  annotations = _instance_annotations(split, rng)
  for index, annotation in enumerate(annotations):
    annotation["id"] = 900100 + index
    annotation["area"] = 1.0  # COCO's own float; the reader recomputes masks
  return {"info": {"year": 2017}, "licenses": [],
          "images": [_image_entry(*image) for image in _IMAGES[split]],
          "annotations": annotations,
          "categories": [{"supercategory": "x", "id": cid, "name": name}
                         for cid, name in coco_builder.THING_CATEGORIES]}


def _write_images(manual, rng, skip=""):
  for split, images in _IMAGES.items():
    with zipfile.ZipFile(manual / f"{split}.zip", "w") as zf:
      for image_id, h, w in images:
        if f"{image_id:012d}.jpg" != skip:
          zf.writestr(f"{split}/{image_id:012d}.jpg", _jpeg(rng, h, w))


def _write_instances(manual, rng):
  """annotations_trainval2017.zip; returns the JSON of each split."""
  jsons = {split: _instances_json(split, rng) for split in _IMAGES}
  with zipfile.ZipFile(manual / "annotations_trainval2017.zip", "w") as zf:
    for split, data in jsons.items():
      zf.writestr(f"annotations/instances_{split}.json", json.dumps(data))
  return jsons


def _name(record):
  value = record["file_name"]
  return value.decode() if isinstance(value, bytes) else str(value)


def test_missing_archives_are_named(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "train2017.zip").write_bytes(b"")
  for name, needed in (("coco_instances", "annotations_trainval2017.zip"),
                       ("coco_panoptic", "panoptic_annotations_trainval2017.zip")):
    with pytest.raises(DatasetNotFoundError) as err:
      get_dataset(name, str(tmp_path / "data"), str(manual))
    message = str(err.value)
    assert "val2017.zip" in message and needed in message and str(manual) in message
    assert str(manual / "train2017.zip") + ":" not in message


def test_instances_are_prepared_and_match_pycocotools(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  rng = np.random.default_rng(0)
  _write_images(manual, rng)
  jsons = _write_instances(manual, rng)
  dataset = get_dataset("coco_instances", str(tmp_path / "data"), str(manual))
  assert dataset.num_classes == 80 and dataset.ignore_index == 255
  assert dataset.class_names[0] == "person" and dataset.class_names[79] == "toothbrush"
  thing_ids = sorted(c["id"] for c in jsons["train2017"]["categories"])
  for split, source_split in (("train2017", "train"), ("val2017", "validation")):
    json_path = tmp_path / f"instances_{split}.json"
    json_path.write_text(json.dumps(jsons[split]))
    coco = COCO(str(json_path))
    source = dataset.source(source_split)
    assert sorted(_name(r) for r in source) == [f"{i:012d}" for i, _, _ in _IMAGES[split]]
    for record in source:
      image_id = int(record["image_id"])
      assert _name(record) == f"{image_id:012d}"
      info = coco.imgs[image_id]
      assert record["image"].shape == (info["height"], info["width"], 3)
      annotations = coco.imgToAnns[image_id]
      objects = record["objects"]
      assert len(objects["class"]) == len(annotations)
      for i, annotation in enumerate(annotations):
        assert objects["class"][i] == thing_ids.index(annotation["category_id"])
        assert bool(objects["is_crowd"][i]) == bool(annotation["iscrowd"])
        x, y, w, h = annotation["bbox"]
        np.testing.assert_allclose(objects["box"][i], [x, y, x + w, y + h], rtol=1e-6)
        mask = objects["mask"][i][..., 0]
        np.testing.assert_array_equal(mask, coco.annToMask(annotation))
        assert mask.sum() == coco_mask.area(coco.annToRLE(annotation))
  train = dataset.source("train")
  empty = [r for r in train if int(r["image_id"]) == 632]
  assert len(empty) == 1 and len(empty[0]["objects"]["class"]) == 0
  crowd = [r for r in train if int(r["image_id"]) == 285][0]["objects"]
  assert list(crowd["class"]) == [0] and bool(crowd["is_crowd"][0])


def test_instances_with_other_categories_are_refused(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  rng = np.random.default_rng(1)
  _write_images(manual, rng)
  jsons = {split: _instances_json(split, rng) for split in _IMAGES}
  for data in jsons.values():
    data["categories"][71]["name"] = "toaster oven"
  with zipfile.ZipFile(manual / "annotations_trainval2017.zip", "w") as zf:
    for split, data in jsons.items():
      zf.writestr(f"annotations/instances_{split}.json", json.dumps(data))
  with pytest.raises(ValueError, match="toaster oven"):
    get_dataset("coco_instances", str(tmp_path / "data"), str(manual)).source("train")


def _panoptic_ids(rng, h, w, segments):
  """A panoptic id map: a VOID band then one band of columns per segment, with a
  VOID rectangle that leaves every segment some pixels."""
  edges = np.sort(rng.choice(np.arange(1, w), len(segments), replace=False))
  ids = np.asarray([0] + list(segments))[np.searchsorted(edges, np.arange(w), side="right")]
  ids = np.repeat(ids[None], h, 0)
  y, x = int(rng.integers(0, h - 2)), int(rng.integers(0, w - 2))
  ids[y:y + int(rng.integers(1, h - y)), x:x + int(rng.integers(1, w - x))] = 0
  return ids


# split -> image id -> [(segment id, COCO category id, iscrowd)]; ids use all three bytes.
_PANOPTIC_SEGMENTS = {
    "train2017": {139: [(3226956, 199, 0), (6979964, 1, 0), (1381134, 18, 1), (7283353, 187, 0)],
                  285: [(5069416, 92, 0), (2, 1, 0)],
                  632: [(8281694, 200, 0)]},
    "val2017": {397133: [(4342341, 64, 0), (9868950, 52, 1), (65793, 149, 0)]},
}


def _write_panoptic(manual, rng, drop_pixels_of=None, skip_png=None):
  """panoptic_annotations_trainval2017.zip with its nested PNG zips; returns
  {image id: (id map, segments_info)}."""
  truth = {}
  with zipfile.ZipFile(manual / "panoptic_annotations_trainval2017.zip", "w") as outer:
    for split, images in _IMAGES.items():
      annotations, nested = [], io.BytesIO()
      with zipfile.ZipFile(nested, "w") as pngs:
        for image_id, h, w in images:
          listed = _PANOPTIC_SEGMENTS[split][image_id]
          ids = _panoptic_ids(rng, h, w, [s for s, _, _ in listed])
          if drop_pixels_of is not None:
            ids[ids == drop_pixels_of] = 0
          infos = []
          for segment_id, category_id, crowd in listed:
            ys, xs = np.nonzero(ids == segment_id)
            bbox = ([int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                     int(ys.max() - ys.min() + 1)] if xs.size else [0, 0, 0, 0])
            infos.append({"id": segment_id, "category_id": category_id, "iscrowd": crowd,
                          "bbox": bbox, "area": int(xs.size)})
          truth[image_id] = (ids, infos)
          rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
          if image_id != skip_png:
            pngs.writestr(f"panoptic_{split}/{image_id:012d}.png", _png(rgb))
          annotations.append({"segments_info": infos, "file_name": f"{image_id:012d}.png",
                              "image_id": image_id})
      outer.writestr(f"annotations/panoptic_{split}.zip", nested.getvalue())
      outer.writestr(f"annotations/panoptic_{split}.json", json.dumps({
          "info": {}, "licenses": [], "images": [_image_entry(*i) for i in images],
          "annotations": annotations,
          "categories": [{"supercategory": "x", "isthing": int(thing), "id": cid, "name": name}
                         for cid, name, thing in coco_builder.CATEGORIES]}))
  return truth


def test_panoptic_is_prepared_with_labels_segments_and_objects(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  rng = np.random.default_rng(2)
  _write_images(manual, rng)
  truth = _write_panoptic(manual, rng)
  dataset = get_dataset("coco_panoptic", str(tmp_path / "data"), str(manual))
  assert dataset.num_classes == 133 and dataset.class_names[-1] == "rug-merged"
  assert dataset.class_names[80] == "banner" and len(dataset.palette) == 133
  category_ids = [c[0] for c in coco_builder.CATEGORIES]
  assert category_ids[79] == 90 and category_ids[80] == 92 and category_ids[-1] == 200
  thing = {cid for cid, _, is_thing in coco_builder.CATEGORIES if is_thing}
  seen = []
  for split in ("train", "validation"):
    for record in dataset.source(split):
      image_id = int(record["image_id"])
      seen.append(image_id)
      ids, infos = truth[image_id]
      rgb = record["panoptic"].astype(np.int64)
      np.testing.assert_array_equal(rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2], ids)
      assert record["image"].shape == ids.shape + (3,)
      expected = np.full(ids.shape, 255)
      for info in infos:
        expected[ids == info["id"]] = category_ids.index(info["category_id"])
      np.testing.assert_array_equal(record["label"][..., 0], expected)
      segments = record["segments"]
      assert [int(s) for s in segments["id"]] == [i["id"] for i in infos]
      assert [int(c) for c in segments["class"]] == [
          category_ids.index(i["category_id"]) for i in infos]
      assert [bool(t) for t in segments["is_thing"]] == [i["category_id"] in thing for i in infos]
      assert [bool(c) for c in segments["is_crowd"]] == [bool(i["iscrowd"]) for i in infos]
      assert [int(a) for a in segments["area"]] == [i["area"] for i in infos]
      things = [i for i in infos if i["category_id"] in thing]
      objects = record["objects"]
      assert len(objects["class"]) == len(things)
      for k, info in enumerate(things):
        assert objects["class"][k] == category_ids.index(info["category_id"]) < 80
        assert bool(objects["is_crowd"][k]) == bool(info["iscrowd"])
        np.testing.assert_array_equal(objects["mask"][k][..., 0], ids == info["id"])
        x, y, w, h = info["bbox"]
        np.testing.assert_array_equal(objects["box"][k], [x, y, x + w, y + h])
  assert sorted(seen) == sorted(truth)


@pytest.mark.parametrize("problem, message", [
    ("segment", "segment 2 of image 285 is listed in the JSON but has no pixel"),
    ("png", "panoptic_train2017/000000000632.png"),
    ("image", "train2017.zip has no member train2017/000000000285.jpg"),
])
def test_panoptic_inconsistencies_are_named(tmp_path, problem, message):
  manual = tmp_path / "manual"
  manual.mkdir()
  rng = np.random.default_rng(3)
  _write_images(manual, rng, skip="000000000285.jpg" if problem == "image" else "")
  _write_panoptic(manual, rng, drop_pixels_of=2 if problem == "segment" else None,
                  skip_png=632 if problem == "png" else None)
  with pytest.raises(ValueError, match=message):
    get_dataset("coco_panoptic", str(tmp_path / "data"), str(manual)).source("train")
