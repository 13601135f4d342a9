"""Cityscapes: missing archives give a clear message; tiny archives in the
official layout are prepared and read back with the official trainIds,
instances and panoptic segments."""
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from segjax.data import transforms
from segjax.data.sources import DatasetNotFoundError, get_dataset

H, W = 32, 64
IMAGES_ZIP, LABELS_ZIP = "leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip"
# The official Cityscapes labelId -> trainId table; every other id in 0..33 -> 255.
OFFICIAL_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                     24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
THING_NAMES = {24: "person", 25: "rider", 26: "car", 27: "truck", 28: "bus", 29: "caravan",
               30: "trailer", 31: "train", 32: "motorcycle", 33: "bicycle"}


def _rect(y0, y1, x0, x1):
  mask = np.zeros((H, W), bool)
  mask[y0:y1, x0:x1] = True
  return mask


def _disk(cy, cx, r):
  yy, xx = np.mgrid[:H, :W]
  return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _triangle(y0, x0, size):
  yy, xx = np.mgrid[:H, :W]
  return (yy >= y0) & (xx >= x0) & ((yy - y0) + (xx - x0) < size)


# (split folder, city, stem) -> painted regions (instanceIds value, mask), in paint order.
# Values >= 1000 are instances (labelId * 1000 + k); a value < 1000 is a group region.
SCENES = {
    ("train", "aachen", "aachen_000000_000019"): [
        (26000, _disk(10, 12, 6)), (26001, _rect(18, 30, 20, 34)), (24000, _triangle(2, 40, 9)),
        (26, _rect(22, 31, 44, 60)), (29000, _rect(0, 6, 54, 62))],
    ("train", "bochum", "bochum_000000_000313"): [
        (25000, _rect(1, 9, 1, 7)), (27000, _disk(20, 12, 5)), (28000, _rect(2, 14, 20, 31)),
        (31000, _triangle(16, 22, 12)), (32000, _rect(4, 8, 36, 44)),
        (33000, _disk(24, 46, 4)), (30, _rect(10, 20, 50, 60)), (24, _rect(26, 31, 54, 63))],
    ("val", "frankfurt", "frankfurt_000000_000294"): [
        (24000, _rect(3, 15, 5, 9)), (24001, _triangle(5, 12, 8)), (33, _disk(22, 30, 6)),
        (26000, _rect(14, 26, 44, 60))],
    ("test", "berlin", "berlin_000000_000019"): [],
}
# Objects each record must hold: instanceIds value -> (trainId, is_crowd). Caravan and
# trailer (ignored in evaluation) are left out.
EXPECTED_OBJECTS = {
    "aachen_000000_000019": {26000: (13, False), 26001: (13, False), 24000: (11, False),
                             26: (13, True)},
    "bochum_000000_000313": {25000: (12, False), 27000: (14, False), 28000: (15, False),
                             31000: (16, False), 32000: (17, False), 33000: (18, False),
                             24: (11, True)},
    "frankfurt_000000_000294": {24000: (11, False), 24001: (11, False), 33: (18, True),
                                26000: (13, False)},
}


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def _scene(offset, regions):
  """labelIds stripes over the non-thing ids 0..23 (0 and 1 included), then regions."""
  label_ids = np.broadcast_to(((np.arange(W) + offset) % 24).astype(np.uint8), (H, W)).copy()
  instance_ids = label_ids.astype(np.uint16)
  for value, mask in regions:
    label_ids[mask] = value // 1000 if value >= 1000 else value
    instance_ids[mask] = value
  return label_ids, instance_ids


def _polygons(regions):
  objects = []
  for value, mask in regions:
    ys, xs = np.nonzero(mask)
    name = THING_NAMES[value // 1000 if value >= 1000 else value]
    objects.append({"label": name + ("group" if value < 1000 else ""),
                    "polygon": [[int(xs.min()), int(ys.min())], [int(xs.max()), int(ys.min())],
                                [int(xs.max()), int(ys.max())], [int(xs.min()), int(ys.max())]]})
  return json.dumps({"imgHeight": H, "imgWidth": W, "objects": objects})


def _tiny_archives(manual, rng, scenes=SCENES):
  """Both zips in the official layout; returns stem -> (image, labelIds, instanceIds)."""
  colors = rng.integers(0, 256, (256, 3), dtype=np.uint8)
  truth = {}
  with zipfile.ZipFile(manual / IMAGES_ZIP, "w") as images, \
      zipfile.ZipFile(manual / LABELS_ZIP, "w") as labels:
    for zf in (images, labels):
      zf.writestr("README", "The Cityscapes Dataset.\n")
      zf.writestr("license.txt", "Cityscapes license.\n")
    for offset, ((folder, city, stem), regions) in enumerate(scenes.items()):
      image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
      label_ids, instance_ids = _scene(5 * offset, regions)
      truth[stem] = (image, label_ids, instance_ids)
      images.writestr(f"leftImg8bit/{folder}/{city}/{stem}_leftImg8bit.png", _png(image))
      gt = f"gtFine/{folder}/{city}/{stem}_gtFine_"
      labels.writestr(gt + "labelIds.png", _png(label_ids))
      labels.writestr(gt + "instanceIds.png", _png(instance_ids))
      labels.writestr(gt + "color.png", _png(colors[label_ids]))
      labels.writestr(gt + "polygons.json", _polygons(regions))
  return truth


def _stem(record):
  name = record["file_name"]
  return name.decode() if isinstance(name, bytes) else str(name)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("cityscapes")
  manual = root / "manual"
  manual.mkdir()
  truth = _tiny_archives(manual, np.random.default_rng(0))
  dataset = get_dataset("cityscapes", str(root / "data"), str(manual))
  return dataset, truth


def test_missing_archives_are_named(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  with pytest.raises(DatasetNotFoundError) as err:
    get_dataset("cityscapes", str(tmp_path / "data"), str(manual))
  message = str(err.value)
  assert IMAGES_ZIP in message and LABELS_ZIP in message and str(manual) in message
  (manual / IMAGES_ZIP).write_bytes(b"")
  with pytest.raises(DatasetNotFoundError) as err:
    get_dataset("cityscapes", str(tmp_path / "data"), str(manual))
  assert LABELS_ZIP in str(err.value) and IMAGES_ZIP not in str(err.value)


def test_splits_images_and_train_ids(prepared):
  dataset, truth = prepared
  assert dataset.num_classes == 19 and dataset.ignore_index == 255
  assert dataset.class_names[0] == "road" and dataset.class_names[18] == "bicycle"
  np.testing.assert_array_equal(dataset.palette[[0, 11, 13]],
                                [[128, 64, 128], [220, 20, 60], [0, 0, 142]])
  train, val = dataset.source("train"), dataset.source("validation")
  assert sorted(_stem(r) for r in train) == ["aachen_000000_000019", "bochum_000000_000313"]
  assert [_stem(r) for r in val] == ["frankfurt_000000_000294"]
  with pytest.raises(ValueError, match="no split 'test'"):
    dataset.source("test")
  lut = np.array([OFFICIAL_TRAIN_ID.get(i, 255) for i in range(256)], np.uint8)
  seen = set()
  for record in list(train) + list(val):
    image, label_ids, _ = truth[_stem(record)]
    np.testing.assert_array_equal(record["image"], image)  # PNG bytes kept as-is
    assert record["label"].shape == (H, W, 1)
    np.testing.assert_array_equal(record["label"][..., 0], lut[label_ids])
    seen |= set(np.unique(label_ids).tolist())
  assert seen == set(range(34))  # the mapping was checked for every Cityscapes labelId
  pipeline = transforms.parse_pipeline("squeeze_labels|check_labels(num_classes=19)")
  for record in list(train) + list(val):
    assert pipeline(record, np.random.default_rng(0))["label"].shape == (H, W)


def test_objects_are_instances_and_crowd_groups(prepared):
  dataset, truth = prepared
  for record in list(dataset.source("train")) + list(dataset.source("validation")):
    stem = _stem(record)
    instance_ids = truth[stem][2]
    objects = record["objects"]
    assert len(objects["mask"]) == len(EXPECTED_OBJECTS[stem])
    found = {}
    for box, cls, crowd, mask in zip(objects["box"], objects["class"], objects["is_crowd"],
                                     objects["mask"]):
      mask = mask[..., 0].astype(bool)
      values = np.unique(instance_ids[mask])
      assert values.size == 1
      np.testing.assert_array_equal(mask, instance_ids == values[0])
      found[int(values[0])] = (int(cls), bool(crowd))
      x1, y1, x2, y2 = np.asarray(box).astype(int)
      np.testing.assert_array_equal(np.asarray(box), [x1, y1, x2, y2])
      assert mask[y1:y2, x1:x2].sum() == mask.sum()  # box holds the whole mask ...
      inside = mask[y1:y2, x1:x2]
      assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
    assert found == EXPECTED_OBJECTS[stem]


def test_panoptic_matches_label_and_instances(prepared):
  dataset, truth = prepared
  for record in list(dataset.source("train")) + list(dataset.source("validation")):
    _, _, instance_ids = truth[_stem(record)]
    label = record["label"][..., 0].astype(int)
    rgb = record["panoptic"].astype(np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 ** 2 * rgb[..., 2]
    segments = record["segments"]
    seg_ids = [int(i) for i in segments["id"]]
    assert len(set(seg_ids)) == len(seg_ids) and 0 not in seg_ids
    assert set(np.unique(ids).tolist()) - {0} == set(seg_ids)
    np.testing.assert_array_equal(ids == 0, label == 255)
    decoded = np.full((H, W), 255)
    for sid, cls, thing, crowd, area in zip(seg_ids, segments["class"], segments["is_thing"],
                                            segments["is_crowd"], segments["area"]):
      region = ids == sid
      decoded[region] = cls
      assert int(area) == region.sum()
      assert bool(thing) == (11 <= int(cls) <= 18)
      assert bool(crowd) == (bool(thing) and sid < 1000)
      if thing:  # a thing segment is exactly one instanceIds region
        np.testing.assert_array_equal(region, instance_ids == sid)
    np.testing.assert_array_equal(decoded, label)
    crowd_ids = {v for v, (_, c) in EXPECTED_OBJECTS[_stem(record)].items() if c}
    assert {s for s, c in zip(seg_ids, segments["is_crowd"]) if c} == crowd_ids


def _prepare_error(tmp_path, scenes, edit=None):
  manual = tmp_path / "manual"
  manual.mkdir()
  _tiny_archives(manual, np.random.default_rng(1), scenes)
  if edit:
    edit(manual)
  with pytest.raises(ValueError) as err:
    get_dataset("cityscapes", str(tmp_path / "data"), str(manual)).source("train")
  return str(err.value)


def test_image_without_gtfine_names_member(tmp_path):
  def add_orphan(manual):
    with zipfile.ZipFile(manual / IMAGES_ZIP, "a") as zf:
      zf.writestr("leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png",
                  _png(np.zeros((H, W, 3), np.uint8)))
  message = _prepare_error(tmp_path, SCENES, add_orphan)
  assert "leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png" in message
  assert "gtFine/train/aachen/aachen_000001_000019_gtFine_labelIds.png" in message


def test_inconsistent_gtfine_is_rejected(tmp_path):
  # instanceIds says car instance but labelIds keeps the road/stripe ids underneath.
  def break_labels(manual):
    stem = "gtFine/train/aachen/aachen_000000_000019_gtFine_"
    with zipfile.ZipFile(manual / LABELS_ZIP) as zf:
      members = {n: zf.read(n) for n in zf.namelist()}
    members[stem + "labelIds.png"] = _png(_scene(0, [])[0])
    with zipfile.ZipFile(manual / LABELS_ZIP, "w") as zf:
      for name, data in members.items():
        zf.writestr(name, data)
  message = _prepare_error(tmp_path, SCENES, break_labels)
  assert "aachen_000000_000019_gtFine_instanceIds.png" in message and "pixels" in message


def test_records_feed_the_instance_training_pipeline(prepared):
  """Builder records through the instance ops to static shapes: the box of every
  valid row holds its mask (crops clip boxes as detectron2 does, so a clipped box
  of a non-convex mask need not be tight), and masks lie on their class in `label`."""
  ops = ("squeeze_labels|unpack_instances|random_resize(scale=(64, 32), ratio_range=(0.8, 1.5))|"
         "random_crop(size=(24, 40))|random_flip|pad_instances(max_instances=6, max_segments=12)")
  pipeline = transforms.parse_pipeline(ops)
  dataset, _ = prepared
  for seed, record in enumerate(list(dataset.source("train")) * 3):
    out = pipeline(record, np.random.default_rng(seed))
    assert out["masks"].shape == (6, 24, 40) and out["boxes"].shape == (6, 4)
    assert out["segment_ids"].shape == (12,)
    for mask, box, cls, valid in zip(out["masks"], out["boxes"], out["classes"],
                                     out["instance_valid"]):
      if not valid:
        assert not mask.any() and not box.any()
        continue
      ys, xs = np.nonzero(mask)
      assert box[0] <= xs.min() + 1 and box[1] <= ys.min() + 1
      assert box[2] >= xs.max() and box[3] >= ys.max()
      assert box[2] <= 40 and box[3] <= 24
      assert np.all(out["label"][mask > 0] == cls)
