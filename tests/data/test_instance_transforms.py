"""Tests for the instance, segment, elastic and overlap-tile preprocessing ops."""
import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from segjax.data.transforms import PREPROCESS_OPS, parse_pipeline

IGNORE = 255
LABEL_STEP, INSTANCE_STEP = 40, 30  # image channel 0 = 40 * label, 1 = 30 * (i + 1).


def op(name, **kwargs):
  return PREPROCESS_OPS.get(name)(**kwargs)


def scene(rng, h=48, w=64, n=5):
  """A tfds-style record: block labels, `n` rectangles in distinct cells of a
  3x4 grid as instances (class 10 + i), the maps drawn into the image."""
  label = np.kron(rng.integers(0, 4, (-(-h // 8), -(-w // 8))), np.ones((8, 8), np.int64))
  label = label[:h, :w].astype(np.uint8)
  instance_map = np.zeros((h, w), np.int64)
  boxes, masks = [], []
  for i, cell in enumerate(rng.permutation(12)[:n]):
    cy, cx = divmod(int(cell), 4)
    y0, x0 = cy * h // 3 + rng.integers(0, 3), cx * w // 4 + rng.integers(0, 3)
    y1, x1 = y0 + rng.integers(4, h // 3 - 3), x0 + rng.integers(4, w // 4 - 3)
    mask = np.zeros((h, w, 1), np.uint8)
    mask[y0:y1, x0:x1] = 1
    masks.append(mask)
    boxes.append(np.float32([x0, y0, x1, y1]))
    instance_map[y0:y1, x0:x1] = i + 1
    label[y0:y1, x0:x1] = 4 + i % 2
  image = np.stack([LABEL_STEP * label, INSTANCE_STEP * instance_map,
                    np.full((h, w), 200)], -1).astype(np.uint8)
  objects = {"box": boxes, "class": [np.int32(10 + i) for i in range(n)],
             "is_crowd": [np.bool_(i == 1) for i in range(n)], "mask": masks}
  return {"image": image, "label": label, "objects": objects, "file_name": "x"}


def tight_boxes(masks):
  boxes = np.zeros((len(masks), 4), np.float32)
  for i, mask in enumerate(masks):
    ys, xs = np.nonzero(mask)
    if ys.size:
      boxes[i] = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
  return boxes


def far_from_edges(values, margin=2):
  """Pixels whose (2 * margin + 1)^2 neighbourhood holds a single value."""
  h, w = values.shape
  padded = np.pad(values.astype(np.int64), margin, constant_values=-1)
  same = np.ones(values.shape, bool)
  for dy in range(2 * margin + 1):
    for dx in range(2 * margin + 1):
      same &= padded[dy:dy + h, dx:dx + w] == values
  return same


def check_rows(out, max_rows):
  """Valid rows first, invalid rows all zero, masks and boxes agree on validity."""
  valid = out["instance_valid"]
  assert valid.shape == (max_rows,) and valid.dtype == bool
  assert (np.sort(~valid, kind="stable") == ~valid).all()
  assert not out["masks"][~valid].any() and not out["boxes"][~valid].any()
  assert not out["classes"][~valid].any() and not out["is_crowd"][~valid].any()
  assert out["masks"][valid].any(axis=(1, 2)).all()


def image_disagreement(out):
  """(mismatched, checked) pixels of image channel 0 vs the label and channel 1
  vs the instance masks, away from edges where interpolation blends."""
  image = out["image"].astype(np.int64)
  label = out["label"]
  inside = far_from_edges(label) & (label != IGNORE)
  bad = np.abs(image[..., 0] - LABEL_STEP * label.astype(np.int64)) > 1
  valid = out["instance_valid"]
  ids = (out["classes"][valid] - 10 + 1)[:, None, None]
  instance_map = (ids * out["masks"][valid]).sum(0)
  assert (out["masks"][valid].sum(0) <= 1).all()
  # Padding and warped-in pixels (label ignored) count as edges: an instance
  # just outside a crop window still blends into the window's border pixels.
  inside_instances = far_from_edges(np.where(label == IGNORE, -1, instance_map))
  bad_instances = np.abs(image[..., 1] - INSTANCE_STEP * instance_map) > 1
  return ((bad & inside).sum() + (bad_instances & inside_instances).sum(),
          inside.sum() + inside_instances.sum())


GEOMETRY = ("unpack_instances|random_resize(scale=(64, 48), ratio_range=(0.5, 1.6))"
            "|random_crop(size=(40, 48))|random_flip|pad(size=(44, 52))")


def test_alignment_through_elastic_and_pad_instances():
  pipeline = parse_pipeline(GEOMETRY + "|elastic(std=4.0)|pad_instances(max_instances=6)")
  bad = checked = 0
  for seed in range(30):
    out = pipeline(scene(np.random.default_rng(seed)), np.random.default_rng(seed))
    assert out["image"].shape == (44, 52, 3) and out["label"].shape == (44, 52)
    assert out["masks"].shape == (6, 44, 52) and out["masks"].dtype == np.uint8
    assert out["boxes"].shape == (6, 4) and out["boxes"].dtype == np.float32
    assert "objects" not in out and out["file_name"] == "x"
    check_rows(out, 6)
    np.testing.assert_array_equal(out["boxes"], tight_boxes(out["masks"]))
    example_bad, example_checked = image_disagreement(out)
    # The warp can stretch a resize-blurred edge past the 2-pixel margin.
    assert example_bad < 0.05 * example_checked
    bad, checked = bad + example_bad, checked + example_checked
  assert bad < 0.005 * checked and checked > 30 * 44 * 52 * 0.6


def test_boxes_stay_within_a_pixel_through_resize():
  pipeline = parse_pipeline(GEOMETRY + "|pad_instances(max_instances=5)")
  for seed in range(30):
    out = pipeline(scene(np.random.default_rng(seed)), np.random.default_rng(seed))
    check_rows(out, 5)
    assert image_disagreement(out)[0] == 0
    np.testing.assert_allclose(out["boxes"], tight_boxes(out["masks"]), atol=1)


def test_boxes_are_exact_through_crop_and_flip():
  pipeline = parse_pipeline(
      "unpack_instances|random_crop(size=(32, 40))|random_flip|pad_instances(max_instances=5)")
  dropped = 0
  for seed in range(30):
    out = pipeline(scene(np.random.default_rng(seed)), np.random.default_rng(seed))
    check_rows(out, 5)
    assert image_disagreement(out)[0] == 0
    np.testing.assert_array_equal(out["boxes"], tight_boxes(out["masks"]))
    dropped += 5 - out["instance_valid"].sum()
  assert dropped > 0


def coordinate_example(h, w):
  """image channels: y, x, 1 (uint16 so 64 px fit); masks drawn by hand."""
  ys, xs = np.mgrid[:h, :w]
  return {"image": np.stack([ys, xs, np.ones_like(ys)], -1).astype(np.uint16)}


def test_crop_drops_outside_instances_and_clips_the_rest():
  example = coordinate_example(32, 32)
  masks = np.zeros((3, 32, 32), np.uint8)
  masks[0, 2:8, 2:8] = 1
  masks[1, 20:30, 18:30] = 1
  masks[2, :4, 28:] = masks[2, 28:, :4] = 1  # Two far corners: its box spans the image.
  example.update(masks=masks, boxes=tight_boxes(masks), instance_valid=np.ones(3, bool),
                 classes=np.int32([1, 2, 3]))
  crop = op("random_crop", size=(16, 16))
  seen = set()
  for seed in range(60):
    out = crop(example, np.random.default_rng(seed))
    y0, x0 = out["image"][0, 0, :2].astype(int)
    window = masks[:, y0:y0 + 16, x0:x0 + 16]
    clipped = np.clip(example["boxes"] - np.float32([x0, y0] * 2), 0, 16)
    box_left = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    valid = box_left & window.any(axis=(1, 2))
    np.testing.assert_array_equal(out["instance_valid"], valid)
    np.testing.assert_array_equal(out["boxes"], np.where(valid[:, None], clipped, 0))
    np.testing.assert_array_equal(out["masks"], window * valid[:, None, None])
    np.testing.assert_array_equal(out["classes"], [1, 2, 3])
    seen.update(("dropped", i) for i in np.flatnonzero(~box_left))
    seen.update(("clipped", i) for i in np.flatnonzero(
        valid & (clipped != example["boxes"] - np.float32([x0, y0] * 2)).any(1)))
    seen.update(("empty mask", i) for i in np.flatnonzero(box_left & ~valid))
  assert {("dropped", 0), ("dropped", 1), ("clipped", 0), ("clipped", 1),
          ("empty mask", 2)} <= seen


def test_resize_invalidates_instances_whose_mask_vanishes():
  masks = np.zeros((3, 32, 32), np.uint8)
  masks[0, 5, 4:20] = 1  # One row thick: nearest downscaling by 4 skips row 5.
  masks[1:, 10:20, 10:20] = 1
  example = {"masks": masks, "boxes": tight_boxes(masks),
             "instance_valid": np.bool_([1, 1, 0])}  # Row 2 was dropped earlier.
  out = op("resize", scale=(8, 8))(example, None)
  np.testing.assert_array_equal(out["instance_valid"], [False, True, False])
  assert not out["masks"][[0, 2]].any() and not out["boxes"][[0, 2]].any()
  np.testing.assert_array_equal(out["boxes"][1], [2.5, 2.5, 5, 5])
  assert masks[2].any()  # Input untouched.


def test_unpack_instances_and_segments():
  record = scene(np.random.default_rng(0), n=3)
  record["segments"] = {"id": [np.int32(7), np.int32(70000)], "class": [np.int32(1)] * 2,
                        "is_thing": [True, False], "is_crowd": [False, True],
                        "area": [np.int32(5), np.int32(9)]}
  out = op("unpack_instances")(record, None)
  assert "objects" not in out and "segments" not in out and "objects" in record
  np.testing.assert_array_equal(out["boxes"], np.stack(record["objects"]["box"]))
  np.testing.assert_array_equal(out["masks"], np.stack(record["objects"]["mask"])[..., 0])
  np.testing.assert_array_equal(out["classes"], [10, 11, 12])
  np.testing.assert_array_equal(out["is_crowd"], [False, True, False])
  np.testing.assert_array_equal(out["instance_valid"], [True] * 3)
  for key, dtype in (("boxes", np.float32), ("classes", np.int32), ("is_crowd", bool),
                     ("masks", np.uint8), ("segment_ids", np.int32),
                     ("segment_is_thing", bool), ("segment_areas", np.int32)):
    assert out[key].dtype == dtype, key
  np.testing.assert_array_equal(out["segment_ids"], [7, 70000])
  np.testing.assert_array_equal(out["segment_is_crowd"], [False, True])
  np.testing.assert_array_equal(out["segment_areas"], [5, 9])
  np.testing.assert_array_equal(out["segment_valid"], [True, True])


def test_empty_instances_go_through_everything():
  record = scene(np.random.default_rng(0), n=0)
  record["segments"] = {"id": [], "class": [], "is_thing": [], "is_crowd": [], "area": []}
  record["panoptic"] = np.zeros(record["image"].shape, np.uint8)
  out = op("unpack_instances")(record, None)
  assert out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 48, 64)
  assert out["classes"].shape == out["is_crowd"].shape == out["instance_valid"].shape == (0,)
  assert out["segment_ids"].shape == out["segment_valid"].shape == (0,)
  out = parse_pipeline("random_resize(scale=(64, 48))|random_crop(size=(32, 32))|random_flip"
                       "|elastic|pad_instances(max_instances=4, max_segments=3)")(
                           out, np.random.default_rng(0))
  assert out["boxes"].shape == (4, 4) and out["masks"].shape == (4, 32, 32)
  assert not out["instance_valid"].any() and not out["segment_valid"].any()
  assert out["segment_areas"].shape == (3,)


def test_unpack_errors():
  record = scene(np.random.default_rng(0), n=2)
  record["objects"]["mask"][1] = np.zeros((48, 60, 1), np.uint8)
  with pytest.raises(ValueError, match=r"mask 1.*\(48, 60, 1\).*48x64"):
    op("unpack_instances")(record, None)
  record = scene(np.random.default_rng(0), n=2)
  record["objects"]["class"].pop()
  with pytest.raises(ValueError, match="differ in length"):
    op("unpack_instances")(record, None)
  with pytest.raises(KeyError, match="objects"):
    op("unpack_instances")({"image": record["image"]}, None)


def test_pad_instances_order_and_overflow():
  masks = np.arange(1, 6, dtype=np.uint8)[:, None, None] * np.ones((5, 4, 4), np.uint8)
  example = {"boxes": np.arange(20, dtype=np.float32).reshape(5, 4),
             "classes": np.int32([1, 2, 3, 4, 5]), "is_crowd": np.bool_([1, 0, 0, 1, 1]),
             "masks": masks, "instance_valid": np.bool_([0, 1, 0, 1, 1])}
  out = op("pad_instances", max_instances=4)(example, None)
  np.testing.assert_array_equal(out["classes"], [2, 4, 5, 0])
  np.testing.assert_array_equal(out["instance_valid"], [True, True, True, False])
  np.testing.assert_array_equal(out["is_crowd"], [False, True, True, False])
  np.testing.assert_array_equal(out["boxes"], example["boxes"][[1, 3, 4, 0]] * [[1], [1], [1],
                                                                              [0]])
  np.testing.assert_array_equal(out["masks"][:, 0, 0], [2, 4, 5, 0])
  assert out["masks"].shape == (4, 4, 4) and out["masks"].dtype == np.uint8
  out = op("pad_instances", max_instances=2)(example, None)
  np.testing.assert_array_equal(out["classes"], [2, 4])
  with pytest.raises(ValueError, match=r"3 valid instances.*limit of 2"):
    op("pad_instances", max_instances=2, on_overflow="error")(example, None)
  op("pad_instances", max_instances=3, on_overflow="error")(example, None)
  with pytest.raises(ValueError, match="on_overflow"):
    parse_pipeline("pad_instances(on_overflow='truncate')")
  with pytest.raises(KeyError, match="unpack_instances"):
    op("pad_instances")({"image": np.zeros((4, 4, 3), np.uint8)}, None)


def test_segment_areas_follow_the_crop():
  ids = np.zeros((24, 32), np.int64)
  ids[:, :10], ids[:, 10:20], ids[:12, 20:] = 5, 300, 70000  # 300 = (44, 1, 0).
  ids[12:, 28:] = 9  # Not listed as a segment: ignored.
  panoptic = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
  example = {**coordinate_example(24, 32), "panoptic": panoptic,
             "segment_ids": np.int32([70000, 5, 300, 0]),
             "segment_classes": np.int32([3, 1, 2, 0]),
             "segment_is_thing": np.bool_([1, 0, 0, 0]),
             "segment_is_crowd": np.bool_([0, 0, 1, 0]),
             "segment_areas": np.int32([120, 240, 240, 0]),
             "segment_valid": np.bool_([1, 1, 1, 0])}
  pipeline = parse_pipeline("random_crop(size=(14, 14))|pad_instances(max_segments=3)")
  dropped = 0
  for seed in range(20):
    out = pipeline(example, np.random.default_rng(seed))
    y0, x0 = out["image"][0, 0, :2].astype(int)
    window = ids[y0:y0 + 14, x0:x0 + 14]
    areas = np.int32([(window == i).sum() for i in (70000, 5, 300)])
    keep = np.flatnonzero(areas > 0)
    dropped += 3 - keep.size
    n = keep.size
    np.testing.assert_array_equal(out["segment_areas"][:n], areas[keep])
    np.testing.assert_array_equal(out["segment_ids"][:n], np.int32([70000, 5, 300])[keep])
    np.testing.assert_array_equal(out["segment_classes"][:n], np.int32([3, 1, 2])[keep])
    np.testing.assert_array_equal(out["segment_is_crowd"][:n], np.bool_([0, 0, 1])[keep])
    np.testing.assert_array_equal(out["segment_valid"], np.arange(3) < n)
    assert not out["segment_ids"][n:].any() and not out["segment_areas"][n:].any()
    assert "boxes" not in out
  assert dropped > 0
  with pytest.raises(ValueError, match=r"3 valid segments.*limit of 2"):
    op("pad_instances", max_segments=2, on_overflow="error")(example, None)


def test_elastic_uses_one_field_for_image_and_labels():
  # A float coordinate image interpolates exactly to the sampled position.
  h, w = 40, 48
  ys, xs = np.mgrid[:h, :w].astype(np.float32)
  rng = np.random.default_rng(0)
  label = rng.integers(0, 5, (h, w)).astype(np.uint8)
  masks = (rng.random((3, h, w)) < 0.3).astype(np.uint8)
  example = {"image": np.stack([ys, xs, np.ones_like(ys)], -1), "label": label, "masks": masks,
             "boxes": tight_boxes(masks), "instance_valid": np.ones(3, bool)}
  for seed in range(5):
    out = op("elastic", std=8.0)(example, np.random.default_rng(seed))
    sample_y, sample_x, weight = np.moveaxis(out["image"], -1, 0)
    inside = np.isclose(weight, 1)
    sample_y, sample_x = sample_y[inside], sample_x[inside]
    # cv2.remap quantises positions to 1/32 pixel: skip near-ties when rounding.
    clear = (np.abs(sample_y % 1 - 0.5) > 0.05) & (np.abs(sample_x % 1 - 0.5) > 0.05)
    src_y = np.floor(sample_y[clear] + 0.5).astype(int)
    src_x = np.floor(sample_x[clear] + 0.5).astype(int)
    np.testing.assert_array_equal(out["label"][inside][clear], label[src_y, src_x])
    np.testing.assert_array_equal(out["masks"][:, inside][:, clear], masks[:, src_y, src_x])
    assert clear.sum() > 0.6 * inside.sum() and inside.sum() > 0.4 * h * w
    assert (out["label"][weight == 0] == IGNORE).all() and (weight == 0).any()
    assert not out["masks"][:, weight == 0].any()
    np.testing.assert_array_equal(out["boxes"], tight_boxes(out["masks"]))
    displacement = np.hypot(sample_y - ys[inside], sample_x - xs[inside])
    assert 0.5 < displacement.mean() < 40


def test_elastic_displacement_std_at_grid_points():
  # On a 33 x 33 image the 3 x 3 grid points fall on pixels, where the
  # interpolated field equals the drawn vector, so the centre moves ~N(0, std^2).
  ys, xs = np.mgrid[:33, :33].astype(np.float32)
  example = {"image": np.stack([ys, xs, np.ones_like(ys)], -1)}
  warp = op("elastic", std=5.0)
  shifts = np.array([warp(example, np.random.default_rng(s))["image"][16, 16, :2] - 16
                     for s in range(300)])
  assert 4.3 < shifts.std() < 5.7 and abs(shifts.mean()) < 0.8


def test_elastic_grid_spans_the_image():
  # The 3 x 3 lattice runs from corner to corner: on a 33 x 33 image pixel
  # (16 i, 16 j) moves by exactly the vector drawn for grid point (i, j).
  # Replays the draws: the prob coin, then N(0, std^2) for (dy, dx) x 3 x 3.
  ys, xs = np.mgrid[:33, :33].astype(np.float32)
  example = {"image": np.stack([ys, xs, np.ones_like(ys)], -1)}
  checked = np.zeros((3, 3), int)
  for seed in range(20):
    out = op("elastic", std=3.0)(example, np.random.default_rng(seed))["image"]
    replay = np.random.default_rng(seed)
    replay.random()
    shift = replay.normal(0.0, 3.0, (2, 3, 3))
    grid = out[::16, ::16]
    inside = np.isclose(grid[..., 2], 1)
    moved = np.stack([grid[..., 0] - ys[::16, ::16], grid[..., 1] - xs[::16, ::16]])
    np.testing.assert_allclose(moved[:, inside], shift[:, inside], atol=0.05)
    checked += inside
  assert (checked >= 3).all()  # Corners and edges too, when warped inwards.


def test_elastic_determinism_values_and_identity():
  record = scene(np.random.default_rng(1))
  ids = np.arange(48 * 64).reshape(48, 64) % 7 * 1000
  record["panoptic"] = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], -1).astype(np.uint8)
  example = op("unpack_instances")(record, None)
  warp = op("elastic")
  first = warp(example, np.random.default_rng(3))
  again = warp(example, np.random.default_rng(3))
  other = warp(example, np.random.default_rng(4))
  for key in ("image", "label", "masks", "boxes", "panoptic", "instance_valid"):
    np.testing.assert_array_equal(first[key], again[key])
  assert not np.array_equal(first["label"], other["label"])
  for seed in range(10):
    out = warp(example, np.random.default_rng(seed))
    assert set(np.unique(out["label"])) <= set(np.unique(example["label"])) | {IGNORE}
    assert set(np.unique(out["masks"])) <= {0, 1}
    pixels = set(map(tuple, out["panoptic"].reshape(-1, 3)))
    assert pixels <= set(map(tuple, example["panoptic"].reshape(-1, 3))) | {(0, 0, 0)}
  still = op("elastic", std=0.0)(example, np.random.default_rng(0))
  for key in ("image", "label", "masks", "boxes", "panoptic", "instance_valid"):
    np.testing.assert_array_equal(still[key], example[key])
  assert op("elastic", prob=0.0)(example, np.random.default_rng(0)) is example
  with pytest.raises(ValueError, match="needs `masks` to move `boxes`"):
    warp({k: v for k, v in example.items() if k != "masks"}, np.random.default_rng(0))


def test_ops_do_not_modify_their_input():
  record = scene(np.random.default_rng(0))
  arrays = {"image": record["image"].copy(), "label": record["label"].copy()}
  objects = {k: [np.copy(v) for v in values] for k, values in record["objects"].items()}
  parse_pipeline(GEOMETRY + "|elastic|pad_instances(max_instances=3)|mirror_pad(pixels=4)")(
      record, np.random.default_rng(0))
  assert set(record) == {"image", "label", "objects", "file_name"}
  for key, value in arrays.items():
    np.testing.assert_array_equal(record[key], value)
  for key, values in objects.items():
    assert len(record["objects"][key]) == len(values)
    for got, expected in zip(record["objects"][key], values):
      np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("pixels", [1, 2, 4])
def test_mirror_pad_matches_numpy_reflect(pixels):
  image = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
  label = np.zeros((5, 7), np.uint8)
  out = op("mirror_pad", pixels=pixels)({"image": image, "label": label}, None)
  expected = np.pad(image, ((pixels, pixels), (pixels, pixels), (0, 0)), mode="reflect")
  np.testing.assert_array_equal(out["image"], expected)
  np.testing.assert_array_equal(out["image"][pixels - 1, pixels:-pixels], image[1])
  assert out["label"] is label


def test_mirror_pad_error_and_following_crop():
  image = np.zeros((5, 7, 3), np.float32)
  with pytest.raises(ValueError, match=r"5 pixels.*5x7"):
    op("mirror_pad", pixels=5)({"image": image}, None)
  padded = op("mirror_pad", pixels=2)({"image": image, "label": np.zeros((5, 7))}, None)
  with pytest.raises(ValueError, match=r"image 9x11, label 5x7"):
    op("random_flip", prob=1.0)(padded, np.random.default_rng(0))


def test_resize_image_only_then_pad_to_label_size():
  example = op("unpack_instances")(scene(np.random.default_rng(0), h=30, w=40, n=2), None)
  out = op("resize", scale=(64, 64), resize_labels=False)(example, None)
  assert out["image"].shape == (48, 64, 3) and out["label"].shape == (30, 40)
  assert out["masks"].shape == (2, 30, 40)
  np.testing.assert_array_equal(out["boxes"], example["boxes"])
  for key, value in (("original_size", [30, 40]), ("resized_size", [48, 64])):
    assert out[key].dtype == np.int32
    np.testing.assert_array_equal(out[key], value)
  padded = op("pad", size=(64, 64), label_size=(32, 48))(out, None)
  assert padded["image"].shape == (64, 64, 3) and padded["label"].shape == (32, 48)
  assert padded["masks"].shape == (2, 32, 48)
  np.testing.assert_array_equal(padded["label"][:30, :40], example["label"])
  assert (padded["label"][30:] == IGNORE).all() and (padded["label"][:, 40:] == IGNORE).all()
  assert not padded["image"][48:].any()
  with pytest.raises(ValueError, match=r"`label` is 30x40.*label_size 24x48"):
    op("pad", size=(64, 64), label_size=(24, 48))(out, None)
  with pytest.raises(ValueError, match=r"`image` is 48x64.*size 40x64"):
    op("pad", size=(40, 64), label_size=(32, 48))(out, None)
  with pytest.raises(ValueError, match="resize_labels=False"):
    op("pad", size=(64, 64))(out, None)
  with pytest.raises(ValueError, match="resize_labels=False"):
    op("random_crop", size=(16, 16))(out, np.random.default_rng(0))
  same = op("resize", scale=(64, 64))(example, None)
  assert same["label"].shape == (48, 64) and "original_size" not in same


def balanced(window, ratio=0.75):
  counts = np.bincount(window[window != IGNORE].ravel(), minlength=4)
  counts = counts[counts > 0]
  return counts.size > 1 and counts.max() / counts.sum() < ratio


@hypothesis.settings(max_examples=150, deadline=None, database=None, derandomize=True)
@hypothesis.given(
    seed=st.integers(0, 2**32 - 1), shape=st.tuples(st.integers(6, 20), st.integers(6, 20)),
    crop=st.tuples(st.integers(2, 8), st.integers(2, 8)), classes=st.integers(2, 4),
    ignore_fraction=st.sampled_from([0.0, 0.3]))
def test_cat_max_ratio_accept_rule(seed, shape, crop, classes, ignore_fraction):
  rng = np.random.default_rng(seed)
  h, w = shape
  crop_h, crop_w = min(crop[0], h), min(crop[1], w)
  # Blobs of 2 x 2 pixels so that both balanced and unbalanced windows occur.
  label = np.kron(rng.integers(0, classes, (-(-h // 2), -(-w // 2))), np.ones((2, 2), int))
  label = label[:h, :w].astype(np.uint8)
  label[rng.random((h, w)) < ignore_fraction] = IGNORE
  example = {**coordinate_example(h, w), "label": label}
  out = op("random_crop", size=(crop_h, crop_w), cat_max_ratio=0.75)(
      example, np.random.default_rng(seed + 1))
  y0, x0 = out["image"][0, 0, :2].astype(int)
  # Replay the crop's draws: offsets uniform over positions, 10 checked tries,
  # then the 11th draw unchecked.
  replay = np.random.default_rng(seed + 1)
  draws = [(int(replay.integers(0, h - crop_h + 1)), int(replay.integers(0, w - crop_w + 1)))
           for _ in range(11)]
  accepted = [d for d in draws[:10] if balanced(label[d[0]:d[0] + crop_h, d[1]:d[1] + crop_w])]
  assert (y0, x0) == (accepted[0] if accepted else draws[10])
  window = out["label"]
  np.testing.assert_array_equal(window, label[y0:y0 + crop_h, x0:x0 + crop_w])
  if not balanced(window):
    assert not accepted


def test_cat_max_ratio_accept_rate():
  # Two classes as vertical halves: 11 of the 25 offsets of a 24 x 24 crop are balanced,
  # so all 10 tries fail with probability 0.56^10 < 0.01.
  label = np.zeros((24, 48), np.uint8)
  label[:, 24:] = 1
  example = {"image": np.zeros((24, 48, 3), np.uint8), "label": label}
  crop = op("random_crop", size=(24, 24), cat_max_ratio=0.75)
  windows = [crop(example, np.random.default_rng(s))["label"] for s in range(100)]
  assert sum(balanced(window) for window in windows) >= 98
