"""Tests for the `segjax_shapes` dataset: annotations agree, scenes are
deterministic, and the tfds ArrayRecord round trip returns the generator's
arrays."""
import os

import numpy as np
import pytest

from segjax.data import shapes
from segjax.data import shapes_builder

SIZE = shapes.IMAGE_SIZE
IGNORE = shapes.IGNORE_INDEX
TRAIN_SEED = shapes_builder.SPLITS["train"][1]
VALIDATION_SEED = shapes_builder.SPLITS["validation"][1]
NUM_DIRECT = 64


def _generate(seed, index):
  return shapes.generate_example(np.random.default_rng([seed, index]))


def _from_record(record):
  """A data-source record in the generator's layout ((H, W) label maps)."""
  out = dict(record)
  for key in ("label", "instance_ids"):
    assert record[key].shape == (SIZE, SIZE, 1)
    out[key] = record[key][..., 0]
  return out


def _panoptic_ids(rgb):
  rgb = rgb.astype(np.int64)
  return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def _inner_boundary(mask):
  """Mask pixels with a 4-neighbour outside the mask (image border excluded)."""
  padded = np.pad(mask, 1, mode="edge")
  inside = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2]
            & padded[1:-1, 2:])
  return mask & ~inside


def _assert_consistent(ex):
  """Every agreement rule between the annotations of one example."""
  n, s = shapes.MAX_INSTANCES, shapes.MAX_SEGMENTS
  expected = {
      "image": ((SIZE, SIZE, 3), np.uint8),
      "label": ((SIZE, SIZE), np.uint8),
      "instance_ids": ((SIZE, SIZE), np.uint8),
      "panoptic": ((SIZE, SIZE, 3), np.uint8),
      "boxes": ((n, 4), np.float32),
      "classes": ((n,), np.int32),
      "instance_valid": ((n,), np.bool_),
      "segment_ids": ((s,), np.int32),
      "segment_classes": ((s,), np.int32),
      "segment_is_thing": ((s,), np.bool_),
      "segment_areas": ((s,), np.int32),
      "segment_valid": ((s,), np.bool_),
  }
  assert {k: (v.shape, v.dtype) for k, v in ex.items()} == expected
  label, ids = ex["label"], ex["instance_ids"]
  ignore = label == IGNORE

  # Instances: valid slots first, padding zeroed, one id per valid slot.
  num = int(ex["instance_valid"].sum())
  assert 1 <= num and ex["instance_valid"][:num].all()
  assert np.all(ex["boxes"][num:] == 0) and np.all(ex["classes"][num:] == -1)
  assert set(np.unique(ids)) <= set(range(num + 1))
  band = np.zeros_like(ignore)
  for k in range(num):
    mask = ids == k + 1
    assert mask.any(), f"instance {k} has no pixels"
    rows, cols = np.nonzero(mask)
    box = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    np.testing.assert_array_equal(ex["boxes"][k], box)
    assert ex["classes"][k] in shapes.THING_CLASSES
    semantic = label[mask & ~ignore]
    assert semantic.size > 0 and np.all(semantic == ex["classes"][k])
    band |= _inner_boundary(mask)
  # Ignore is exactly the 1-pixel band inside each thing's visible boundary.
  np.testing.assert_array_equal(ignore, band)
  assert np.all(np.isin(label[ids == 0], shapes.STUFF_CLASSES))

  # Panoptic segments: things (in instance order), then stuff classes present.
  valid = ex["segment_valid"]
  m = int(valid.sum())
  assert valid[:m].all()
  seg_ids, seg_classes = ex["segment_ids"][:m], ex["segment_classes"][:m]
  is_thing, areas = ex["segment_is_thing"][:m], ex["segment_areas"][:m]
  assert np.all(ex["segment_ids"][m:] == 0)
  assert np.all(ex["segment_classes"][m:] == -1)
  assert not ex["segment_is_thing"][m:].any()
  assert np.all(ex["segment_areas"][m:] == 0)
  assert np.all(seg_ids > 0) and len(set(seg_ids.tolist())) == m
  np.testing.assert_array_equal(is_thing, np.arange(m) < num)
  stuff_present = sorted(set(np.unique(label[~ignore]).tolist())
                         & set(shapes.STUFF_CLASSES))
  np.testing.assert_array_equal(seg_classes[num:], stuff_present)
  pan = _panoptic_ids(ex["panoptic"])
  # Every non-ignore pixel is in exactly one segment; ignore pixels are VOID.
  np.testing.assert_array_equal(pan == 0, ignore)
  assert set(np.unique(pan[~ignore]).tolist()) == set(seg_ids.tolist())
  for j in range(m):
    segment = pan == seg_ids[j]
    assert areas[j] == segment.sum() > 0
    if is_thing[j]:
      assert seg_classes[j] == ex["classes"][j]
      np.testing.assert_array_equal(segment, (ids == j + 1) & ~ignore)
    else:
      np.testing.assert_array_equal(segment, label == seg_classes[j])


@pytest.fixture(scope="module")
def direct_examples():
  return [_generate(VALIDATION_SEED, i) for i in range(NUM_DIRECT)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  shapes_builder.load_shapes("train", data_dir)
  return data_dir


def test_metadata():
  assert len(shapes.CLASS_NAMES) == 7
  assert shapes.THING_CLASSES + shapes.STUFF_CLASSES == tuple(range(7))
  assert shapes.MAX_SEGMENTS == shapes.MAX_INSTANCES + 3 == 11
  assert shapes.PALETTE.shape == (7, 3) and shapes.PALETTE.dtype == np.uint8
  assert len({tuple(c) for c in shapes.PALETTE.tolist()}) == 7


def test_same_seed_gives_identical_examples():
  a, b = _generate(TRAIN_SEED, 5), _generate(TRAIN_SEED, 5)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_different_index_or_seed_gives_different_images():
  images = [_generate(TRAIN_SEED, i)["image"] for i in range(4)]
  images.append(_generate(VALIDATION_SEED, 0)["image"])
  for i in range(len(images)):
    for j in range(i):
      assert not np.array_equal(images[i], images[j])


def test_generated_annotations_are_consistent(direct_examples):
  for i, ex in enumerate(direct_examples):
    try:
      _assert_consistent(ex)
    except AssertionError as e:
      raise AssertionError(f"example {i}: {e}") from e


@pytest.mark.parametrize("corruption", [
    "box", "instance_pixel", "label_pixel", "panoptic_pixel", "area", "class"])
def test_consistency_check_catches_corruption(direct_examples, corruption):
  ex = {k: v.copy() for k, v in direct_examples[0].items()}
  ids = ex["instance_ids"]
  if corruption == "box":
    ex["boxes"][0, 2] += 1
  elif corruption == "instance_pixel":  # Grow instance 1 by one pixel.
    rows, cols = np.nonzero(ids == 1)
    ids[rows.min() - 1 if rows.min() > 0 else rows.max() + 1, cols[0]] = 1
  elif corruption == "label_pixel":
    y, x = np.argwhere(ex["label"] == IGNORE)[0]
    ex["label"][y, x] = ex["classes"][0]
  elif corruption == "panoptic_pixel":
    y, x = np.argwhere(ex["label"] != IGNORE)[0]
    ex["panoptic"][y, x] = (7, 7, 7)
  elif corruption == "area":
    ex["segment_areas"][0] += 1
  else:
    ex["classes"][0] = (ex["classes"][0] + 1) % 4
  with pytest.raises(AssertionError):
    _assert_consistent(ex)


def test_value_ranges_and_scene_statistics(direct_examples):
  labels = np.stack([ex["label"] for ex in direct_examples])
  assert set(np.unique(labels).tolist()) == set(range(7)) | {IGNORE}
  assert all((ex["label"] == IGNORE).any() for ex in direct_examples)
  counts = np.bincount(labels[labels != IGNORE], minlength=7)
  stuff_share = counts[list(shapes.STUFF_CLASSES)].sum() / counts.sum()
  assert 0.5 < stuff_share < 0.95
  num_instances = [int(ex["instance_valid"].sum()) for ex in direct_examples]
  assert min(num_instances) >= 1 and max(num_instances) >= 5
  assert all(np.ptp(ex["image"]) > 50 for ex in direct_examples)
  # Occlusion: some instance masks touch (paint order hides one behind another).
  touching = 0
  for ex in direct_examples:
    ids = ex["instance_ids"]
    pairs = [(ids[1:], ids[:-1]), (ids[:, 1:], ids[:, :-1])]
    touching += any(np.any((a > 0) & (b > 0) & (a != b)) for a, b in pairs)
  assert touching >= NUM_DIRECT // 8
  # Some things are cut by the image border.
  boxes = np.concatenate([ex["boxes"][ex["instance_valid"]]
                          for ex in direct_examples])
  assert np.all((boxes[:, :2] >= 0) & (boxes[:, 2:] <= SIZE))
  assert np.all(boxes[:, 2:] > boxes[:, :2])
  assert np.any(boxes[:, :2] == 0) and np.any(boxes[:, 2:] == SIZE)


def test_split_sizes(data_dir):
  assert len(shapes_builder.load_shapes("train", data_dir)) == 2048
  assert len(shapes_builder.load_shapes("validation", data_dir)) == 256
  assert len(shapes_builder.load_shapes("validation[:10]", data_dir)) == 10


def test_unknown_split_names_known_splits(data_dir):
  with pytest.raises(ValueError, match="train, validation"):
    shapes_builder.load_shapes("test", data_dir)


def test_round_trip_returns_generated_examples(data_dir):
  source = shapes_builder.load_shapes("validation", data_dir)
  generated = {_generate(VALIDATION_SEED, i)["image"].tobytes(): i
               for i in range(len(source))}
  indices = set()
  for r in range(len(source)):
    record = _from_record(source[r])
    i = generated.get(record["image"].tobytes())
    assert i is not None, f"record {r} is no generated example"
    indices.add(i)
    if r < 8:
      expected = _generate(VALIDATION_SEED, i)
      for key in expected:
        np.testing.assert_array_equal(record[key], expected[key], err_msg=key)
      _assert_consistent(record)
  assert indices == set(range(len(source)))


def test_preparation_is_reused_and_reproducible(data_dir, tmp_path,
                                                monkeypatch):
  record_file = os.path.join(
      data_dir, "segjax_shapes", "1.0.0",
      "segjax_shapes-validation.array_record-00000-of-00001")
  mtime = os.path.getmtime(record_file)
  first = shapes_builder.load_shapes("validation", data_dir)
  assert os.path.getmtime(record_file) == mtime
  # An independent preparation (train shrunk to keep the test fast) stores
  # the validation split in the same order.
  monkeypatch.setitem(shapes_builder.SPLITS, "train", (16, TRAIN_SEED))
  second = shapes_builder.load_shapes("validation", str(tmp_path))
  assert len(shapes_builder.load_shapes("train", str(tmp_path))) == 16
  for i in (0, 1, 100, 255):
    a, b = first[i], second[i]
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
