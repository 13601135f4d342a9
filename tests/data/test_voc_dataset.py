"""Pascal VOC 2012 and its SBD-augmented train_aug: tiny archives in the
original layouts are prepared and read back without TensorFlow."""
import io
import tarfile

import numpy as np
import pytest
import scipy.io
from PIL import Image

from segjax.data import transforms, voc_builder
from segjax.data.sources import DatasetNotFoundError, get_dataset

VOC = "VOCdevkit/VOC2012/"
SBD = "benchmark_RELEASE/dataset/"


def _jpeg(h, w, color):
  buffer = io.BytesIO()
  Image.fromarray(np.full((h, w, 3), color, np.uint8)).save(buffer, format="JPEG")
  return buffer.getvalue()


def _palette_png(indices):
  """A VOC-style label: palette indices with the devkit's colours attached."""
  image = Image.frombytes("P", indices.shape[::-1], indices.tobytes())
  colors = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [7, 11, 13] * 251 + [224, 224, 192]
  image.putpalette(colors)
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def _mat(segmentation):
  buffer = io.BytesIO()
  scipy.io.savemat(buffer, {"GTcls": {"Segmentation": segmentation,
                                      "CategoriesPresent": np.unique(segmentation)}})
  return buffer.getvalue()


def _write_tar(path, members, mode="w"):
  with tarfile.open(path, mode) as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _voc_label(rng, h, w):
  """Ids 0..20 with a 255 boundary ring, as VOC draws around objects."""
  label = rng.integers(0, 21, (h, w)).astype(np.uint8)
  label[h // 4, :] = 255
  label[:, w // 3] = 255
  return label


def _voc_tar(path, rng, train, val, extra_images=(), skip=()):
  """VOCtrainval_11-May-2012.tar; returns {id: ((h, w), label)} of the labelled ids."""
  members, labels = [], {}
  for image_id in train + val + list(extra_images):
    h, w = (int(v) for v in rng.integers(16, 40, 2))
    members.append((f"{VOC}JPEGImages/{image_id}.jpg", _jpeg(h, w, (200, 30, 30))))
    members.append((f"{VOC}Annotations/{image_id}.xml", b"<annotation/>"))
    if image_id in extra_images:
      labels[image_id] = ((h, w), None)
      continue
    labels[image_id] = ((h, w), _voc_label(rng, h, w))
    members.append((f"{VOC}SegmentationClass/{image_id}.png", _palette_png(labels[image_id][1])))
    members.append((f"{VOC}SegmentationObject/{image_id}.png",
                    _palette_png(np.zeros((h, w), np.uint8))))
  members.append((f"{VOC}ImageSets/Segmentation/train.txt", "\n".join(train).encode() + b"\n"))
  members.append((f"{VOC}ImageSets/Segmentation/val.txt", "\n".join(val).encode() + b"\n"))
  members.append((f"{VOC}ImageSets/Main/train.txt", b"2099_999999\n"))
  _write_tar(path, [m for m in members if m[0] not in skip])
  return labels


def _text(value):
  return value.decode() if isinstance(value, bytes) else str(value)


def test_palette_is_the_voc_colormap():
  colors = voc_builder.voc_colormap()
  known = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128),
           7: (128, 128, 128), 8: (64, 0, 0), 15: (192, 128, 128), 20: (0, 64, 128),
           255: (224, 224, 192)}
  for index, rgb in known.items():
    assert tuple(colors[index]) == rgb, index
  assert len(np.unique(colors, axis=0)) == 256
  dataset = voc_builder.VOC2012
  assert dataset.palette.shape == (21, 3) and dataset.palette.dtype == np.uint8
  assert dataset.class_names[0] == "background" and dataset.class_names[15] == "person"
  assert dataset.class_names[-1] == "tvmonitor" and len(dataset.class_names) == 21


def test_missing_archives_are_named(tmp_path):
  manual = tmp_path / "manual"
  with pytest.raises(DatasetNotFoundError) as err:
    get_dataset("voc2012_aug", str(tmp_path / "data"), str(manual))
  message = str(err.value)
  assert "VOCtrainval_11-May-2012.tar" in message and "benchmark.tgz" in message
  assert str(manual) in message
  manual.mkdir()
  _write_tar(manual / "VOCtrainval_11-May-2012.tar", [])
  with pytest.raises(DatasetNotFoundError) as err:
    get_dataset("voc2012_aug", str(tmp_path / "data"), str(manual))
  assert "benchmark.tgz" in str(err.value)
  assert "VOCtrainval_11-May-2012.tar" not in str(err.value)


def test_voc2012_is_prepared_and_read(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  train, val = ["2007_000032", "2008_000002", "2011_003271"], ["2007_000033", "2010_000005"]
  labels = _voc_tar(manual / "VOCtrainval_11-May-2012.tar", np.random.default_rng(0), train,
                    val, extra_images=["2012_000001"])
  dataset = get_dataset("voc2012", str(tmp_path / "data"), str(manual))
  assert dataset.num_classes == 21 and dataset.ignore_index == 255
  for split, ids in (("train", train), ("validation", val)):
    source = dataset.source(split)
    assert len(source) == len(ids)
    records = {_text(r["file_name"]): r for r in source}
    assert sorted(records) == sorted(ids)
    for image_id, record in records.items():
      shape, label = labels[image_id]
      assert record["image"].shape == shape + (3,)
      np.testing.assert_array_equal(record["label"][..., 0], label)
      assert (record["label"] == 255).any()
  pipeline = transforms.parse_pipeline("squeeze_labels|check_labels(num_classes=21)")
  out = pipeline(dataset.source("train")[0], np.random.default_rng(0))
  assert out["label"].ndim == 2
  with pytest.raises(ValueError, match="no split 'train_aug'"):
    dataset.source("train_aug")


def test_voc2012_missing_member_is_named(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  _voc_tar(manual / "VOCtrainval_11-May-2012.tar", np.random.default_rng(1), ["2007_000032"],
           ["2007_000033"], skip=[f"{VOC}SegmentationClass/2007_000033.png"])
  dataset = get_dataset("voc2012", str(tmp_path / "data"), str(manual))
  with pytest.raises(ValueError, match="SegmentationClass/2007_000033.png is missing from .*"
                                       "VOCtrainval_11-May-2012.tar"):
    dataset.source("train")


def test_voc2012_aug_train_aug_rule_and_labels(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  rng = np.random.default_rng(2)
  # a: VOC train only. b: VOC train and SBD train (VOC's label wins). c: VOC val and
  # SBD train (excluded from train_aug). d: VOC val only. e: SBD train with its JPEG
  # also in the VOC tar. f, g: SBD only (train, val), images from SBD.
  a, b, c, d, e, f, g = ("2007_000032", "2007_000039", "2007_000033", "2007_000042",
                         "2008_000008", "2008_000015", "2009_000001")
  voc = _voc_tar(manual / "VOCtrainval_11-May-2012.tar", rng, [a, b], [c, d],
                 extra_images=[e])
  sizes = {i: voc[i][0] for i in (a, b, c, d, e)}
  sizes.update({f: (21, 33), g: (37, 18)})
  sbd_labels = {i: rng.integers(0, 21, sizes[i]).astype(np.uint8) for i in (b, c, e, f, g)}
  members = [(f"{SBD}cls/{i}.mat", _mat(sbd_labels[i])) for i in (b, c, e, f, g)]
  members += [(f"{SBD}inst/{i}.mat", _mat(np.zeros(sizes[i], np.uint8))) for i in (b, f)]
  # SBD's copy of e is blue while VOC's is red: e must take VOC's JPEG.
  members += [(f"{SBD}img/{i}.jpg", _jpeg(*sizes[i], (30, 30, 200))) for i in (b, c, e, f, g)]
  members += [(f"{SBD}train.txt", f"{b}\n{c}\n{e}\n{f}\n".encode()),
              (f"{SBD}val.txt", f"{g}\n".encode())]
  _write_tar(manual / "benchmark.tgz", members, mode="w:gz")

  dataset = get_dataset("voc2012_aug", str(tmp_path / "data"), str(manual))
  train_aug = dataset.source("train_aug")
  records = {_text(r["file_name"]): r for r in train_aug}
  assert len(train_aug) == 5 and sorted(records) == [a, b, e, f, g]
  expected = {a: voc[a][1], b: voc[b][1], e: sbd_labels[e], f: sbd_labels[f],
              g: sbd_labels[g]}
  pipeline = transforms.parse_pipeline("squeeze_labels|check_labels(num_classes=21)")
  for image_id, record in records.items():
    np.testing.assert_array_equal(record["label"][..., 0], expected[image_id])
    assert record["image"].shape == sizes[image_id] + (3,)
    red, _, blue = record["image"].reshape(-1, 3).mean(0)
    assert (red > blue) == (image_id in (a, b, e)), image_id
    pipeline(record, np.random.default_rng(0))
  assert (records[b]["label"] == 255).any()  # VOC's boundary survives.
  validation = {_text(r["file_name"]): r for r in dataset.source("validation")}
  assert sorted(validation) == [c, d]
  for image_id, record in validation.items():
    np.testing.assert_array_equal(record["label"][..., 0], voc[image_id][1])
  with pytest.raises(ValueError, match="no split 'train'"):
    dataset.source("train")


def test_voc2012_aug_missing_sbd_label_is_named(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  _voc_tar(manual / "VOCtrainval_11-May-2012.tar", np.random.default_rng(3), ["2007_000032"],
           ["2007_000033"])
  _write_tar(manual / "benchmark.tgz",
             [(f"{SBD}img/2008_000015.jpg", _jpeg(20, 20, (0, 0, 0))),
              (f"{SBD}train.txt", b"2008_000015\n"), (f"{SBD}val.txt", b"")], mode="w:gz")
  dataset = get_dataset("voc2012_aug", str(tmp_path / "data"), str(manual))
  with pytest.raises(ValueError, match="cls/2008_000015.mat is missing from .*benchmark.tgz"):
    dataset.source("train_aug")
