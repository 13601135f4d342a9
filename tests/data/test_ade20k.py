"""ADE20K: a missing archive gives a clear message; a tiny archive in the
official layout is prepared and read back without TensorFlow."""
import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from segjax.data import transforms
from segjax.data.sources import DatasetNotFoundError, get_dataset


def _encode(array, fmt):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


def _tiny_archive(path, rng):
  """ADEChallengeData2016.zip with 3 train and 2 validation images of odd sizes."""
  labels = {}
  with zipfile.ZipFile(path, "w") as zf:
    for folder, prefix, count in (("training", "ADE_train", 3), ("validation", "ADE_val", 2)):
      for i in range(count):
        h, w = rng.integers(20, 40, 2)
        stem = f"{prefix}_{i + 1:08d}"
        label = rng.integers(0, 151, (h, w)).astype(np.uint8)
        labels[stem] = label
        zf.writestr(f"ADEChallengeData2016/images/{folder}/{stem}.jpg",
                    _encode(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "JPEG"))
        zf.writestr(f"ADEChallengeData2016/annotations/{folder}/{stem}.png",
                    _encode(label, "PNG"))
  return labels


def test_missing_archive_names_file_and_folder(tmp_path):
  with pytest.raises(DatasetNotFoundError) as err:
    get_dataset("ade20k", str(tmp_path / "data"), str(tmp_path / "manual"))
  message = str(err.value)
  assert "ADEChallengeData2016.zip" in message and str(tmp_path / "manual") in message


def test_tiny_archive_is_prepared_and_read(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  labels = _tiny_archive(manual / "ADEChallengeData2016.zip", np.random.default_rng(0))
  dataset = get_dataset("ade20k", str(tmp_path / "data"), str(manual))
  assert dataset.num_classes == 150 and dataset.class_names[0] == "wall"
  train, val = dataset.source("train"), dataset.source("validation")
  assert len(train) == 3 and len(val) == 2
  for record in list(train) + list(val):
    stem = record["file_name"].decode() if isinstance(record["file_name"], bytes) else str(
        record["file_name"])
    np.testing.assert_array_equal(record["label"][..., 0], labels[stem])  # PNG is lossless
    assert record["image"].shape[:2] == labels[stem].shape and record["image"].shape[2] == 3
  # The recipe's label mapping: 0 ("other") -> ignore, 1..150 -> 0..149.
  pipeline = transforms.parse_pipeline("squeeze_labels|reduce_zero_label|"
                                       "check_labels(num_classes=150)")
  out = pipeline(train[0], np.random.default_rng(0))
  raw = train[0]["label"][..., 0]
  np.testing.assert_array_equal(out["label"], np.where(raw == 0, 255, raw.astype(int) - 1))
  with pytest.raises(ValueError, match="no split 'test'"):
    dataset.source("test")


def test_prepare_command_prepares_once_and_reports_sizes(tmp_path, capsys):
  from segjax.data import prepare
  manual = tmp_path / "manual"
  manual.mkdir()
  args = ["ade20k", "--data_dir", str(tmp_path / "data"), "--manual_dir", str(manual)]
  assert prepare.main(args) == 2
  assert "ADEChallengeData2016.zip" in capsys.readouterr().err
  _tiny_archive(manual / "ADEChallengeData2016.zip", np.random.default_rng(0))
  assert prepare.main(args) == 0
  assert "ade20k: 150 classes; train 3, validation 2" in capsys.readouterr().out
  (manual / "ADEChallengeData2016.zip").unlink()  # prepared: the archive is no longer read
  assert prepare.main(args) == 0
