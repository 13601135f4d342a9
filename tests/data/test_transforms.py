"""Tests for the host-side preprocessing ops and their string pipelines."""
import pickle

import cv2
import grain
import numpy as np
import pytest

from segjax.data import transforms
from segjax.data.transforms import PREPROCESS_OPS, parse_pipeline

IGNORE = 255
GEOMETRIC = ("random_resize(scale=(96, 64), ratio_range=(0.5, 2.0))"
             "|random_crop(size=(64, 80))|random_flip(prob=0.5)")


def op(name, **kwargs):
  return PREPROCESS_OPS.get(name)(**kwargs)


def block_example(rng, h, w, block=16, num_classes=6):
  """Piecewise-constant labels in block x block tiles; image colour = palette[label]."""
  tiles = rng.integers(0, num_classes, (-(-h // block), -(-w // block)))
  label = np.kron(tiles, np.ones((block, block), np.int64))[:h, :w].astype(np.uint8)
  palette = rng.permutation(np.arange(40, 240, 8))[:3 * num_classes]
  palette = palette.reshape(num_classes, 3).astype(np.uint8)
  return {"image": palette[label], "label": label}, palette


def far_from_edges(label, margin=2):
  """Pixels whose (2 * margin + 1)^2 neighbourhood holds a single label value."""
  h, w = label.shape
  padded = np.pad(label.astype(np.int32), margin, constant_values=-1)
  same = np.ones(label.shape, bool)
  for dy in range(2 * margin + 1):
    for dx in range(2 * margin + 1):
      same &= padded[dy:dy + h, dx:dx + w] == label
  return same


def rect_example(rng, h, w, num_slots=8, num_rects=5):
  """Disjoint rectangles in `instance_ids` (ids 1..n) and their tight boxes."""
  ids = np.zeros((h, w), np.int32)
  cells = rng.permutation(16)[:num_rects]
  for i, cell in enumerate(cells, start=1):
    cy, cx = divmod(cell, 4)
    y0 = cy * h // 4 + rng.integers(0, 3)
    x0 = cx * w // 4 + rng.integers(0, 3)
    y1 = y0 + rng.integers(6, h // 4 - 2)
    x1 = x0 + rng.integers(6, w // 4 - 2)
    ids[y0:y1, x0:x1] = i
  boxes, valid = tight_boxes(ids, num_slots)
  return {"image": np.zeros((h, w, 3), np.uint8), "instance_ids": ids,
          "boxes": boxes, "instance_valid": valid, "classes": np.arange(num_slots)}


def tight_boxes(ids, num_slots):
  boxes = np.zeros((num_slots, 4), np.float32)
  valid = np.zeros(num_slots, bool)
  for i in range(1, num_slots + 1):
    ys, xs = np.nonzero(ids == i)
    if ys.size:
      boxes[i - 1] = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
      valid[i - 1] = True
  return boxes, valid


@pytest.mark.parametrize("shape", [(96, 96), (72, 136)])
def test_image_and_label_stay_aligned(shape):
  pipeline = parse_pipeline(GEOMETRIC)
  checked = 0
  for seed in range(25):
    example, palette = block_example(np.random.default_rng(seed), *shape)
    out = pipeline(example, np.random.default_rng(seed))
    label, image = out["label"], out["image"].astype(np.int32)
    assert label.shape == image.shape[:2] == (64, 80)
    mask = far_from_edges(label) & (label != IGNORE)
    expected = palette[np.where(label == IGNORE, 0, label)].astype(np.int32)
    np.testing.assert_allclose(image[mask], expected[mask], atol=1)
    checked += mask.sum()
  assert checked > 25 * 64 * 80 * 0.3


def test_boxes_follow_flip_and_crop_exactly():
  for seed in range(20):
    rng = np.random.default_rng(seed)
    example = rect_example(rng, 80, 96)
    out = parse_pipeline("random_crop(size=(48, 40))|random_flip(prob=0.5)")(example, rng)
    boxes, valid = tight_boxes(out["instance_ids"], 8)
    np.testing.assert_array_equal(out["instance_valid"], valid)
    np.testing.assert_array_equal(out["boxes"], boxes)
    np.testing.assert_array_equal(out["classes"], example["classes"])


def test_flip_moves_boxes_exactly():
  example = rect_example(np.random.default_rng(0), 64, 64)
  out = op("random_flip", prob=1.0)(example, np.random.default_rng(0))
  np.testing.assert_array_equal(out["instance_ids"], example["instance_ids"][:, ::-1])
  np.testing.assert_array_equal(out["boxes"], tight_boxes(out["instance_ids"], 8)[0])


def test_crop_invalidates_boxes_it_removes():
  ids = np.zeros((64, 64), np.int32)
  ids[2:10, 2:10], ids[50:60, 50:60] = 1, 2
  boxes, valid = tight_boxes(ids, 3)
  example = {"instance_ids": ids, "boxes": boxes, "instance_valid": valid}
  crop = op("random_crop", size=(32, 32))
  for seed in range(10):
    out = crop(example, np.random.default_rng(seed))
    got_boxes, got_valid = tight_boxes(out["instance_ids"], 3)
    np.testing.assert_array_equal(out["instance_valid"], got_valid)
    np.testing.assert_array_equal(out["boxes"], got_boxes)
    # Box 1 needs a crop offset < 10 and box 2 one > 18, so one always goes;
    # slot 3 was padding and stays invalid.
    assert out["instance_valid"].sum() <= 1 and not out["instance_valid"][2]


def test_boxes_follow_resize_within_one_pixel():
  for seed in range(10):
    rng = np.random.default_rng(seed)
    example = rect_example(rng, 72, 100)
    out = parse_pipeline(
        "random_resize(scale=(100, 72), ratio_range=(0.6, 1.7))|random_flip")(example, rng)
    boxes, valid = tight_boxes(out["instance_ids"], 8)
    np.testing.assert_array_equal(out["instance_valid"], valid)
    np.testing.assert_allclose(out["boxes"], boxes, atol=1)
    assert out["boxes"].dtype == np.float32


@pytest.mark.parametrize("out_hw", [(19, 26), (37, 53), (50, 90), (111, 140)])
def test_label_resize_is_centre_aligned_nearest(out_hw):
  # Reference: cv2.INTER_NEAREST_EXACT (pixel-centre aligned, like the
  # bilinear image resize). Exact ties between two source pixels may go
  # either way, so rows/columns whose centre maps onto a tie are skipped.
  label = np.random.default_rng(0).integers(0, 250, (37, 53)).astype(np.uint8)
  out_h, out_w = out_hw
  out = op("resize", scale=(out_w, out_h), keep_ratio=False)({"label": label}, None)["label"]
  expected = cv2.resize(label, (out_w, out_h), interpolation=cv2.INTER_NEAREST_EXACT)

  def no_tie(size_in, size_out):
    return (2 * np.arange(size_out) + 1) * size_in % (2 * size_out) != 0

  mask = no_tie(37, out_h)[:, None] & no_tie(53, out_w)[None, :]
  np.testing.assert_array_equal(out[mask], expected[mask])


@pytest.mark.parametrize("hw, scale, expected", [
    ((512, 683), (2048, 512), (512, 683)),
    ((375, 500), (2048, 512), (512, 683)),
    ((640, 427), (2048, 512), (767, 512)),
    ((1024, 2048), (2048, 512), (512, 1024)),
    ((1024, 2048), (512, 2048), (512, 1024)),
    ((100, 30), (400, 40), (133, 40)),
    ((100, 30), (60, 40), (60, 18)),
])
def test_resize_keep_ratio_matches_mmseg(hw, scale, expected):
  h, w = hw
  factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
  assert (int(h * factor + 0.5), int(w * factor + 0.5)) == expected
  example = {"image": np.zeros((h, w, 3), np.uint8), "label": np.zeros((h, w), np.uint8)}
  out = op("resize", scale=scale)(example, None)
  assert out["image"].shape == expected + (3,)
  assert out["label"].shape == expected


def test_resize_without_keep_ratio_uses_wh_order():
  example = {"image": np.zeros((30, 40, 3), np.uint8), "panoptic": np.zeros((30, 40, 3))}
  out = op("resize", scale=(100, 50), keep_ratio=False)(example, None)
  assert out["image"].shape == (50, 100, 3)
  assert out["panoptic"].shape == (50, 100, 3)


def test_random_resize_ratio_scales_target():
  example = {"image": np.zeros((375, 500, 3), np.uint8)}
  sizes = {op("random_resize", scale=(2048, 512), ratio_range=(1.0, 1.0))(
      example, np.random.default_rng(s))["image"].shape for s in range(3)}
  assert sizes == {(512, 683, 3)}
  heights = [op("random_resize", scale=(2048, 512))(
      example, np.random.default_rng(s))["image"].shape[0] for s in range(20)]
  assert 256 <= min(heights) and max(heights) <= 1024 and len(set(heights)) > 10


@pytest.mark.parametrize("hw", [(20, 30), (64, 200), (300, 40), (64, 80)])
def test_random_crop_output_is_exactly_size_and_padded(hw):
  h, w = hw
  rng = np.random.default_rng(0)
  example = {
      "image": rng.integers(1, 256, (h, w, 3)).astype(np.uint8),
      "label": rng.integers(0, 5, (h, w)).astype(np.uint8),
      "instance_ids": rng.integers(1, 9, (h, w)).astype(np.int32),
      "panoptic": rng.integers(1, 9, (h, w, 3)).astype(np.uint8),
      "name": "keep me",
  }
  crop = op("random_crop", size=(64, 80), ignore_index=200)
  for seed in range(5):
    out = crop(example, np.random.default_rng(seed))
    assert out["image"].shape == (64, 80, 3) and out["panoptic"].shape == (64, 80, 3)
    assert out["label"].shape == out["instance_ids"].shape == (64, 80)
    assert out["name"] == "keep me"
    inside = np.zeros((64, 80), bool)
    inside[:min(h, 64), :min(w, 80)] = True
    assert (out["image"][~inside] == 0).all() and (out["image"][inside] > 0).all()
    assert (out["label"][~inside] == 200).all() and (out["label"][inside] < 5).all()
    assert (out["instance_ids"][~inside] == 0).all() and (out["instance_ids"][inside] > 0).all()
    assert (out["panoptic"][~inside] == 0).all()


def test_pad_values_and_error():
  example = {"image": np.full((3, 4, 3), 7, np.uint8), "label": np.ones((3, 4), np.uint8),
             "instance_ids": np.full((3, 4), 5, np.int32)}
  out = op("pad", size=(5, 6), ignore_index=250)(example, None)
  assert out["image"].shape == (5, 6, 3)
  assert (out["image"][:3, :4] == 7).all() and out["image"][3:].sum() == 0
  assert out["image"][:, 4:].sum() == 0
  assert (out["label"][3:] == 250).all() and (out["label"][:, 4:] == 250).all()
  assert (out["label"][:3, :4] == 1).all()
  assert out["instance_ids"].sum() == 5 * 12
  with pytest.raises(ValueError, match=r"3x4 \(HxW\).*2x6"):
    op("pad", size=(2, 6))(example, None)


def test_cat_max_ratio_avoids_single_class_crops():
  # Class 0 fills x < 64, class 1 fills x >= 64, ignored pixels (top rows)
  # must not count; a 32x32 crop is balanced only for x-offsets in (40, 56).
  label = np.zeros((40, 96), np.uint8)
  label[:, 64:] = 1
  label[:8] = IGNORE
  example = {"image": np.zeros((40, 96, 3), np.uint8), "label": label}

  def violation_rate(cat_max_ratio):
    crop = op("random_crop", size=(32, 32), cat_max_ratio=cat_max_ratio)
    bad = 0
    for seed in range(200):
      out = crop(example, np.random.default_rng(seed))["label"]
      counts = np.bincount(out[out != IGNORE], minlength=2)
      bad += counts.max() / counts.sum() >= 0.75
    return bad / 200

  assert violation_rate(1.0) > 0.6
  assert violation_rate(0.75) < 0.1


def test_normalize_matches_numpy():
  image = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
  mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
  out = op("normalize")({"image": image}, None)["image"]
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, (image - np.array(mean)) / np.array(std), rtol=1e-6, atol=1e-6)


def test_reduce_zero_label():
  label = np.array([[0, 1, 2], [150, 255, 0]], np.uint8)
  out = op("reduce_zero_label")({"label": label}, None)["label"]
  np.testing.assert_array_equal(out, [[255, 0, 1], [149, 255, 255]])
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(label[0], [0, 1, 2])  # Input untouched.


def test_squeeze_labels():
  example = {"label": np.zeros((4, 5, 1), np.uint8), "instance_ids": np.zeros((4, 5, 1)),
             "panoptic": np.zeros((4, 5, 3))}
  out = op("squeeze_labels")(example, None)
  assert out["label"].shape == out["instance_ids"].shape == (4, 5)
  assert out["panoptic"].shape == (4, 5, 3)


def test_check_labels():
  check = op("check_labels", num_classes=21)
  check({"label": np.array([[0, 20], [255, 3]], np.uint8)}, None)
  with pytest.raises(ValueError) as e:
    check({"label": np.array([[0, 21], [37, 255]], np.uint8)}, None)
  message = str(e.value)
  assert "[21, 37]" in message and "[0, 21)" in message and "255" in message
  assert "reduce_zero_label" in message


def test_check_image():
  check = op("check_image")
  check({"image": np.zeros((4, 4, 3), np.uint8)}, None)
  with pytest.raises(ValueError, match=r"\(4, 4, 4\).*uint8.*\(H, W, 3\) uint8"):
    check({"image": np.zeros((4, 4, 4), np.uint8)}, None)
  with pytest.raises(ValueError, match="float32"):
    check({"image": np.zeros((4, 4, 3), np.float32)}, None)
  with pytest.raises(ValueError, match=r"\(4, 4\)"):
    check({"image": np.zeros((4, 4), np.uint8)}, None)


def test_keep():
  out = op("keep", keys=("image", "label"))({"image": 1, "label": 2, "name": "x"}, None)
  assert out == {"image": 1, "label": 2}
  with pytest.raises(KeyError, match="boxes"):
    op("keep", keys=("boxes",))({"image": 1}, None)


def test_photometric_distortion_keeps_uint8_and_grey():
  rng = np.random.default_rng(0)
  colour = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
  grey = np.repeat(rng.integers(0, 256, (16, 16, 1)), 3, axis=-1).astype(np.uint8)
  distort = op("photometric_distortion")
  changed = 0
  for seed in range(20):
    out = distort({"image": colour}, np.random.default_rng(seed))["image"]
    assert out.dtype == np.uint8 and out.shape == colour.shape
    changed += not np.array_equal(out, colour)
    # Saturation and hue leave grey pixels grey: only brightness/contrast act.
    out = distort({"image": grey}, np.random.default_rng(seed))["image"]
    assert (out == out[..., :1]).all()
  assert changed > 10
  with pytest.raises(ValueError, match="before `normalize`"):
    distort({"image": colour.astype(np.float32)}, rng)


def test_labels_are_never_interpolated():
  rng = np.random.default_rng(0)
  values = np.array([3, 7, 200], np.uint8)
  label = values[rng.integers(0, 3, (50, 70))]
  panoptic = rng.integers(0, 4, (50, 70, 3)).astype(np.uint8) * 60
  example = {"image": np.zeros((50, 70, 3), np.uint8), "label": label, "panoptic": panoptic}
  pipeline = parse_pipeline(GEOMETRIC)
  for seed in range(20):
    out = pipeline(example, np.random.default_rng(seed))
    assert out["label"].dtype == np.uint8
    assert set(np.unique(out["label"])) <= {3, 7, 200, IGNORE}
    assert set(np.unique(out["panoptic"])) <= {0, 60, 120, 180}


def test_pipeline_deterministic_per_seed_and_varies_across_seeds():
  example, _ = block_example(np.random.default_rng(0), 96, 96)
  pipeline = parse_pipeline(GEOMETRIC + "|photometric_distortion|normalize")
  first = pipeline(example, np.random.default_rng(7))
  again = pipeline(example, np.random.default_rng(7))
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  others = [pipeline(example, np.random.default_rng(s))["image"] for s in range(5)]
  assert not all(np.array_equal(first["image"], other) for other in others)


def test_pipeline_does_not_modify_its_input():
  example = rect_example(np.random.default_rng(0), 64, 64)
  example["label"] = (example["instance_ids"] % 3).astype(np.uint8)[..., None]
  arrays = dict(example)
  before = {k: v.copy() for k, v in example.items()}
  parse_pipeline("squeeze_labels|" + GEOMETRIC +
                 "|photometric_distortion|reduce_zero_label|normalize")(
                     example, np.random.default_rng(0))
  assert set(example) == set(arrays)
  assert all(example[k] is arrays[k] for k in arrays)
  for key in before:
    np.testing.assert_array_equal(example[key], before[key])


def test_parse_errors_are_clear():
  with pytest.raises(KeyError, match="random_crop"):
    parse_pipeline("resize(scale=(8, 8))|random_crap(size=(4, 4))")
  with pytest.raises(ValueError, match=r"'random_crop'.*'sise'.*size"):
    parse_pipeline("random_crop(sise=(4, 4))")
  with pytest.raises(ValueError, match=r"'check_labels'.*num_classes"):
    parse_pipeline("check_labels")
  with pytest.raises(ValueError, match=r"'resize'.*`scale`.*literal"):
    parse_pipeline("resize(scale=__import__('os'))")
  with pytest.raises(ValueError, match=r"random_flip.*`prob`"):
    parse_pipeline("random_flip(prob=1.5)")
  with pytest.raises(ValueError, match=r"random_crop.*`size`"):
    parse_pipeline("random_crop(size=(512, -1))")
  with pytest.raises(ValueError, match="keyword"):
    parse_pipeline("random_crop((4, 4))")
  with pytest.raises(ValueError, match="cannot parse"):
    parse_pipeline("resize(scale=(8, 8)||normalize")


def test_parse_builds_ops_in_order():
  pipeline = parse_pipeline(
      " squeeze_labels | resize(scale=(8, 8), keep_ratio=False)|pad(size=(10, 12)) ")
  example = {"image": np.ones((4, 4, 3), np.uint8), "label": np.ones((4, 4, 1), np.uint8)}
  out = pipeline(example, np.random.default_rng(0))
  assert out["image"].shape == (10, 12, 3) and out["label"].shape == (10, 12)
  assert (out["label"][8:] == IGNORE).all() and (out["label"][:8, :8] == 1).all()
  assert parse_pipeline("")(example, None) is example
  assert "random_crop" in transforms.PREPROCESS_OPS.names()


def test_pipeline_pickles():
  pipeline = parse_pipeline(GEOMETRIC)
  restored = pickle.loads(pickle.dumps(pipeline))
  example, _ = block_example(np.random.default_rng(0), 96, 96)
  np.testing.assert_array_equal(restored(example, np.random.default_rng(3))["label"],
                                pipeline(example, np.random.default_rng(3))["label"])


def test_compose_from_op_objects_matches_the_spec():
  """Ops built by their factories, mixed with spec strings, run as the parsed spec does,
  and the composed pipeline knows its spec and pickles without a spec string."""
  example, _ = block_example(np.random.default_rng(0), 96, 96)
  composed = transforms.compose(
      transforms.random_resize(scale=(96, 64), ratio_range=(0.5, 2.0)),
      "random_crop(size=(64, 80))",
      transforms.Pipeline([transforms.random_flip(prob=0.5)]))
  assert parse_pipeline(composed.spec).spec == GEOMETRIC
  restored = pickle.loads(pickle.dumps(composed))
  for pipeline in (composed, restored):
    out = pipeline(example, np.random.default_rng(5))
    expected = parse_pipeline(GEOMETRIC)(example, np.random.default_rng(5))
    for key in ("image", "label"):
      np.testing.assert_array_equal(out[key], expected[key])


def test_spec_ops_registered_without_register_op_still_pickle(monkeypatch):
  """An op registered on PREPROCESS_OPS directly returns a closure, which does not
  pickle; a parsed pipeline of it pickles as its spec, and so does a composed one."""
  def shift(by=1):
    def fn(example, rng):
      del rng
      return {**example, "label": example["label"] + by}
    return fn
  monkeypatch.setitem(PREPROCESS_OPS._entries, "shift_for_test", shift)
  example = {"label": np.zeros((2, 2), np.uint8)}
  for pipeline in (parse_pipeline("shift_for_test(by=2)"),
                   transforms.compose("shift_for_test(by=2)", transforms.pad(size=(3, 2)))):
    restored = pickle.loads(pickle.dumps(pipeline))
    np.testing.assert_array_equal(restored(example, None)["label"][:2], 2)
    assert restored.spec == pipeline.spec


def test_pipeline_of_plain_callables():
  def add_one(example, rng):
    del rng
    return {**example, "label": example["label"] + 1}
  pipeline = transforms.Pipeline([add_one, transforms.pad(size=(3, 2), ignore_index=9)])
  out = pipeline({"label": np.zeros((2, 2), np.uint8)}, None)
  np.testing.assert_array_equal(out["label"], [[1, 1], [1, 1], [9, 9]])
  assert pipeline.spec is None and "add_one" in repr(pipeline)
  assert transforms.compose("", pipeline, " ").ops == [pipeline]
  with pytest.raises(ValueError, match="neither a spec string nor a callable"):
    transforms.compose("squeeze_labels", 3)
  with pytest.raises(ValueError, match="op 1 is 'pad', not a callable"):
    transforms.Pipeline([add_one, "pad"])


def test_runs_in_grain_random_map():
  rng = np.random.default_rng(0)
  examples = [block_example(rng, 96, 72 + 8 * i)[0] for i in range(4)]
  pipeline = parse_pipeline("check_image|" + GEOMETRIC + "|photometric_distortion|normalize")
  ds = grain.MapDataset.source(examples).random_map(pipeline, seed=0)
  elements = [ds[i] for i in range(4)]
  for element in elements:
    assert element["image"].shape == (64, 80, 3) and element["image"].dtype == np.float32
    assert element["label"].shape == (64, 80)
  np.testing.assert_array_equal(ds[2]["image"], elements[2]["image"])
