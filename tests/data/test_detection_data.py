"""Mask R-CNN data: instance masks from id maps, thing-class remapping, the
shortest-edge resize, box-cropped masks and batching of instance keys."""
import numpy as np
import pytest
from scipy import ndimage

from segjax.data import pipeline
from segjax.data.transforms import PREPROCESS_OPS, parse_pipeline


def op(name, **kwargs):
  return PREPROCESS_OPS.get(name)(**kwargs)


def tight_boxes(masks):
  boxes = np.zeros((len(masks), 4), np.float32)
  for i, mask in enumerate(masks):
    ys, xs = np.nonzero(mask)
    if ys.size:
      boxes[i] = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
  return boxes


def nearest_resize(maps, out_h, out_w):
  """Nearest resize of (..., H, W) maps: output pixel i reads the input pixel under
  its centre, floor((i + 1/2) * in / out), in exact integer arithmetic."""
  h, w = maps.shape[-2:]
  rows = (2 * np.arange(out_h) + 1) * h // (2 * out_h)
  cols = (2 * np.arange(out_w) + 1) * w // (2 * out_w)
  return maps[..., rows[:, None], cols[None, :]]


def shapes_example(rng, h=24, w=32, n=4):
  """segjax_shapes-style record: `instance_ids` id k marks row k - 1 (random
  blobs, later ones drawn over earlier ones), tight boxes, the image channels
  holding the pixel coordinates so a crop's offset can be read back."""
  ids = np.zeros((h, w), np.int32)
  for k in range(1, n + 1):
    y0, x0 = rng.integers(0, h - 6), rng.integers(0, w - 6)
    ids[y0:y0 + rng.integers(3, 7), x0:x0 + rng.integers(3, 7)] = k
  masks = ids[None] == np.arange(1, n + 1)[:, None, None]
  ys, xs = np.mgrid[:h, :w]
  image = np.stack([ys, xs, np.full((h, w), 7)], -1).astype(np.uint8)
  return {"image": image, "instance_ids": ids, "boxes": tight_boxes(masks),
          "classes": np.arange(11, 11 + n, dtype=np.int32),
          "is_crowd": np.zeros(n, bool), "instance_valid": masks.any(axis=(1, 2))}


# instance_masks.


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64])
def test_instance_masks_are_id_maps_of_valid_rows(dtype):
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 7, (9, 11)).astype(dtype)  # ids 5, 6 have no row: ignored
  valid = np.array([True, False, True, True])
  out = op("instance_masks")({"instance_ids": ids, "instance_valid": valid}, rng)
  assert out["masks"].shape == (4, 9, 11) and out["masks"].dtype == np.uint8
  for k in range(4):
    np.testing.assert_array_equal(out["masks"][k], (ids == k + 1) & valid[k])
  assert out["masks"][0].any() and not out["masks"][1].any()


def test_instance_masks_errors():
  fn = op("instance_masks")
  valid = np.ones(2, bool)
  with pytest.raises(ValueError, match=r"`instance_ids` must be \(H, W\).*squeeze_labels"):
    fn({"instance_ids": np.zeros((4, 5, 1), np.int32), "instance_valid": valid}, None)
  with pytest.raises(KeyError, match="instance_masks needs `instance_ids`"):
    fn({"instance_valid": valid}, None)
  with pytest.raises(KeyError, match="instance_masks needs `instance_valid`"):
    fn({"instance_ids": np.zeros((4, 5), np.int32)}, None)


def check_masks_match_boxes(out):
  valid = out["instance_valid"]
  assert out["masks"][valid].any(axis=(1, 2)).all()
  assert not out["masks"][~valid].any() and not out["boxes"][~valid].any()
  np.testing.assert_array_equal(out["boxes"], tight_boxes(out["masks"]))


def test_masks_flip_with_the_boxes():
  example = shapes_example(np.random.default_rng(1))
  out = parse_pipeline("instance_masks|random_flip(prob=1.0)")(example,
                                                              np.random.default_rng(0))
  masks = example["instance_ids"][None] == np.arange(1, 5)[:, None, None]
  np.testing.assert_array_equal(out["masks"], masks[:, :, ::-1])
  np.testing.assert_array_equal(out["instance_ids"], example["instance_ids"][:, ::-1])
  check_masks_match_boxes(out)


def test_masks_crop_with_the_boxes():
  ops = parse_pipeline("instance_masks|random_crop(size=(12, 14))")
  dropped = 0
  for seed in range(20):
    example = shapes_example(np.random.default_rng(seed))
    out = ops(example, np.random.default_rng(seed))
    y0, x0 = out["image"][0, 0, :2]
    masks = example["instance_ids"][None] == np.arange(1, 5)[:, None, None]
    window = masks[:, y0:y0 + 12, x0:x0 + 14]
    expected_valid = example["instance_valid"] & window.any(axis=(1, 2))
    np.testing.assert_array_equal(out["instance_valid"], expected_valid)
    np.testing.assert_array_equal(out["masks"], window & expected_valid[:, None, None])
    check_masks_match_boxes(out)
    dropped += (~expected_valid).sum()
  assert dropped > 0


def test_masks_resize_with_the_boxes():
  example = shapes_example(np.random.default_rng(2))
  masks = parse_pipeline("instance_masks")(example, None)["masks"]

  # Integer upsampling: nearest neighbour repeats pixels, so the scaled boxes are exact.
  out = parse_pipeline("instance_masks|resize(scale=(64, 48), keep_ratio=False)")(example, None)
  np.testing.assert_array_equal(out["masks"], masks.repeat(2, 1).repeat(2, 2))
  np.testing.assert_array_equal(out["boxes"], example["boxes"] * 2)
  check_masks_match_boxes(out)

  # Any other size: masks are resized by the nearest pixel centre, boxes within a pixel.
  out = parse_pipeline("instance_masks|resize(scale=(45, 17), keep_ratio=False)")(example, None)
  expected = nearest_resize(masks, 17, 45) * out["instance_valid"][:, None, None]
  np.testing.assert_array_equal(out["masks"], expected)
  valid = out["instance_valid"]
  np.testing.assert_allclose(out["boxes"][valid], tight_boxes(out["masks"])[valid], atol=1)
  assert not out["boxes"][~valid].any()


# thing_classes.


def test_thing_classes_maps_cityscapes_ids_and_drops_stuff():
  rng = np.random.default_rng(3)
  classes = np.int32([11, 5, 18, 13, 0, 24, 12])
  valid = np.array([True, True, True, True, True, True, False])
  boxes = rng.uniform(1, 9, (7, 4)).astype(np.float32)
  masks = rng.integers(0, 2, (7, 6, 8)).astype(np.uint8)
  example = {"classes": classes, "instance_valid": valid, "boxes": boxes, "masks": masks}
  out = parse_pipeline("thing_classes(ids=(11, 12, 13, 14, 15, 16, 17, 18))")(example, rng)
  expected_valid = valid & (classes >= 11) & (classes <= 18)
  np.testing.assert_array_equal(out["instance_valid"], expected_valid)
  np.testing.assert_array_equal(out["classes"], np.where(expected_valid, classes - 11, 0))
  assert out["classes"].dtype == np.int32
  np.testing.assert_array_equal(out["boxes"], boxes * expected_valid[:, None])
  np.testing.assert_array_equal(out["masks"], masks * expected_valid[:, None, None])
  assert out["boxes"].dtype == np.float32 and out["masks"].dtype == np.uint8
  np.testing.assert_array_equal(example["classes"], classes)  # input untouched


def test_thing_classes_follows_the_order_of_ids_and_handles_no_rows():
  example = {"classes": np.int32([7, 3, 9]), "instance_valid": np.ones(3, bool)}
  out = op("thing_classes", ids=[9, 7, 3])(example, None)
  np.testing.assert_array_equal(out["classes"], [1, 2, 0])
  empty = {"classes": np.zeros(0, np.int32), "instance_valid": np.zeros(0, bool),
           "boxes": np.zeros((0, 4), np.float32)}
  out = op("thing_classes", ids=(1,))(empty, None)
  assert out["classes"].shape == (0,) and out["boxes"].shape == (0, 4)


@pytest.mark.parametrize("ids", [(), (11, 11), ("car",), None, 11, (11, True)])
def test_thing_classes_rejects_bad_ids(ids):
  with pytest.raises(ValueError, match=r"thing_classes: `ids` must be a tuple of distinct"):
    op("thing_classes", ids=ids)


def test_thing_classes_needs_rows():
  with pytest.raises(KeyError, match="thing_classes needs `classes`"):
    op("thing_classes", ids=(1,))({"instance_valid": np.ones(1, bool)}, None)


# random_short_side.


def detectron2_shape(h, w, short, max_size):
  """ResizeShortestEdge.get_output_shape, as floats before rounding."""
  scale = short / min(h, w)
  new_h, new_w = h * scale, w * scale
  if max(new_h, new_w) > max_size:
    new_h, new_w = new_h * max_size / max(new_h, new_w), new_w * max_size / max(new_h, new_w)
  return new_h, new_w


@pytest.mark.parametrize("h,w,sizes,max_size", [
    (24, 32, (16, 20, 30), 1000),   # portrait and landscape, max_size never binds
    (35, 21, (10, 14, 42), 1000),
    (20, 80, (10, 40), 100),        # 40: the long side would be 160, max_size binds
    (36, 24, (12, 30), 40)])        # 30: long side 45 > 40
def test_random_short_side_sizes(h, w, sizes, max_size):
  rng = np.random.default_rng(4)
  ids = rng.integers(0, 3, (h, w))
  masks = (ids[None] == np.arange(1, 3)[:, None, None]).astype(np.uint8)
  example = {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "masks": masks,
             "boxes": np.float32([[1, 2, w - 3, h - 1], [0, 0, w, h]]),
             "instance_valid": np.ones(2, bool)}
  expected = {s: detectron2_shape(h, w, s, max_size) for s in sizes}
  fn = op("random_short_side", sizes=sizes, max_size=max_size)
  seen = set()
  for seed in range(30):
    out = fn(example, np.random.default_rng(seed))
    out_h, out_w = out["image"].shape[:2]
    drawn = [s for s, (e_h, e_w) in expected.items()
             if abs(out_h - e_h) <= 0.5 + 1e-6 and abs(out_w - e_w) <= 0.5 + 1e-6]
    assert len(drawn) == 1, (out_h, out_w, expected)
    if max(h, w) * drawn[0] / min(h, w) > max_size:
      assert max(out_h, out_w) == max_size
    else:
      assert min(out_h, out_w) == drawn[0]
    seen.add(drawn[0])
    assert out["masks"].shape == (2, out_h, out_w)
    np.testing.assert_allclose(out["boxes"], example["boxes"] * np.float32(
        [out_w / w, out_h / h] * 2), rtol=1e-6)
    np.testing.assert_array_equal(out["masks"][1], nearest_resize(ids, out_h, out_w) == 2)
  assert seen == set(sizes)


def test_random_short_side_caps_the_long_side_for_sizes_above_max_size():
  """detectron2 bounds the long side by max_size even when the drawn short side
  itself exceeds max_size (e.g. a small max_size for a low-resolution run)."""
  example = {"image": np.zeros((20, 30, 3), np.uint8)}
  out = op("random_short_side", sizes=(40,), max_size=35)(example, np.random.default_rng(0))
  assert out["image"].shape[:2] == (23, 35)  # detectron2: (23.3, 35) rounded


def test_random_short_side_is_seeded():
  example = {"image": np.zeros((10, 10, 3), np.uint8)}
  fn = parse_pipeline("random_short_side(sizes=(4, 6, 8, 12, 16))")
  shapes = [fn(example, np.random.default_rng(seed))["image"].shape for seed in range(20)]
  assert len(set(shapes)) >= 4
  again = [fn(example, np.random.default_rng(seed))["image"].shape for seed in range(20)]
  assert shapes == again


@pytest.mark.parametrize("kwargs", [{"sizes": ()}, {"sizes": 800}, {"sizes": (800, 0)},
                                    {"sizes": (800,), "max_size": 0}])
def test_random_short_side_rejects_bad_arguments(kwargs):
  with pytest.raises(ValueError, match="random_short_side: `(sizes|max_size)` must be"):
    op("random_short_side", **kwargs)


# crop_masks.


def bilinear_crop(mask, box, size):
  """The crop by scipy: bilinear samples at the box's pixel centres, zero
  outside the image; returns the sampled values before thresholding."""
  x1, y1, x2, y2 = box
  v, u = np.mgrid[:size, :size] + 0.5
  coords = [y1 + v * (y2 - y1) / size - 0.5, x1 + u * (x2 - x1) / size - 0.5]
  return ndimage.map_coordinates(mask.astype(np.float64), coords, order=1, mode="grid-constant",
                                 cval=0.0)


@pytest.mark.parametrize("side", [1, 3, 7, 16])
def test_crop_of_a_square_on_a_box_of_its_size_is_all_ones(side):
  masks = np.zeros((1, 20, 24), np.uint8)
  masks[0, 2:2 + side, 5:5 + side] = 1
  example = {"masks": masks, "boxes": tight_boxes(masks), "instance_valid": np.ones(1, bool)}
  out = op("crop_masks", size=side)(example, None)
  assert out["box_masks"].shape == (1, side, side) and out["box_masks"].dtype == np.uint8
  assert (out["box_masks"] == 1).all()


@pytest.mark.parametrize("size", [2, 4, 6, 9])
def test_crop_of_a_rectangle_on_its_box_is_all_ones(size):
  """Sampling points stay within 1/3 pixel of the box (size <= 1.5 x each side), so
  even the corner samples that blend with the zeros outside stay >= 0.5."""
  masks = np.zeros((2, 20, 24), np.uint8)
  masks[0, 5:11, 3:9] = 1    # 6 x 6
  masks[1, 2:17, 10:16] = 1  # 15 high, 6 wide
  example = {"masks": masks, "boxes": tight_boxes(masks), "instance_valid": np.ones(2, bool)}
  out = op("crop_masks", size=size)(example, None)
  assert out["box_masks"].shape == (2, size, size) and out["box_masks"].dtype == np.uint8
  assert (out["box_masks"] == 1).all()


@pytest.mark.parametrize("size", [14, 28, 56])
def test_disk_crop_resampled_back_matches_the_mask(size):
  h, w = 48, 56
  ys, xs = np.mgrid[:h, :w]
  masks = np.stack([(ys - 20.3) ** 2 + (xs - 24.6) ** 2 <= 11.2 ** 2,
                    ((ys - 30) / 9.5) ** 2 + ((xs - 40) / 14.5) ** 2 <= 1]).astype(np.uint8)
  boxes = tight_boxes(masks)
  out = op("crop_masks", size=size)({"masks": masks, "boxes": boxes}, None)
  for mask, box, crop in zip(masks, boxes.astype(int), out["box_masks"]):
    x1, y1, x2, y2 = box
    # Nearest: image pixel (y, x) of the box reads crop cell floor((y - y1 + 0.5) * size / bh).
    rows = np.floor((np.arange(y1, y2) - y1 + 0.5) * size / (y2 - y1)).astype(int)
    cols = np.floor((np.arange(x1, x2) - x1 + 0.5) * size / (x2 - x1)).astype(int)
    back = crop[rows[:, None], cols[None, :]]
    assert (back == mask[y1:y2, x1:x2]).mean() >= 0.95
    # And the crop itself is the bilinear resampling, up to cv2's 1/32 pixel grid.
    values = bilinear_crop(mask, box, size)
    clear = np.abs(values - 0.5) > 0.05
    np.testing.assert_array_equal(crop[clear], values[clear] >= 0.5)
    assert clear.mean() > 0.9


def test_crop_with_fractional_boxes_matches_scipy():
  rng = np.random.default_rng(5)
  masks = (ndimage.gaussian_filter(rng.normal(size=(3, 30, 40)), (0, 3, 3)) > 0).astype(np.uint8)
  boxes = np.float32([[2.3, 4.7, 31.9, 22.2], [-3.5, 10.25, 12.0, 35.5], [5.0, 0.0, 40.0, 30.0]])
  out = op("crop_masks", size=16)({"masks": masks, "boxes": boxes}, None)
  for mask, box, crop in zip(masks, boxes, out["box_masks"]):
    values = bilinear_crop(mask, box, 16)
    clear = np.abs(values - 0.5) > 0.05
    np.testing.assert_array_equal(crop[clear], values[clear] >= 0.5)
    assert clear.mean() > 0.8


def test_crop_masks_of_empty_boxes_are_zero_and_keys_change():
  masks = np.ones((4, 10, 12), np.uint8)
  boxes = np.float32([[0, 0, 0, 0], [5, 5, 5, 9], [6, 3, 2, 8], [1, 1, 7, 7]])
  example = {"masks": masks, "boxes": boxes, "classes": np.arange(4, dtype=np.int32),
             "instance_valid": np.array([False, True, True, True])}
  out = parse_pipeline("crop_masks(size=5)")(example, None)
  assert sorted(out) == ["box_masks", "boxes", "classes", "instance_valid"]
  assert out["box_masks"].shape == (4, 5, 5) and out["box_masks"].dtype == np.uint8
  assert not out["box_masks"][:3].any() and out["box_masks"][3].all()
  np.testing.assert_array_equal(out["boxes"], boxes)
  assert "masks" in example  # input untouched


def test_crop_masks_errors():
  with pytest.raises(ValueError, match=r"crop_masks: `size` must be an int >= 1"):
    op("crop_masks", size=0)
  with pytest.raises(KeyError, match="crop_masks needs `masks`"):
    op("crop_masks")({"boxes": np.zeros((1, 4), np.float32)}, None)
  with pytest.raises(KeyError, match="crop_masks needs `boxes`"):
    op("crop_masks")({"masks": np.zeros((1, 4, 4), np.uint8)}, None)


def test_crop_masks_after_pad_instances():
  """The full host-side chain: rows compacted valid-first, then each cropped on its box."""
  ops = ("instance_masks|thing_classes(ids=(12, 13, 14))|random_flip"
         "|pad_instances(max_instances=6)|crop_masks(size=8)")
  for seed in range(5):
    example = shapes_example(np.random.default_rng(seed), n=4)
    reference = parse_pipeline(ops.rsplit("|", 1)[0])(example, np.random.default_rng(seed))
    out = parse_pipeline(ops)(example, np.random.default_rng(seed))
    assert "masks" not in out and out["box_masks"].shape == (6, 8, 8)
    valid = out["instance_valid"]
    assert valid.sum() == (example["instance_valid"] & (example["classes"] >= 12)).sum()
    assert not valid[valid.sum():].any() and not out["box_masks"][~valid].any()
    np.testing.assert_array_equal(out["boxes"], reference["boxes"])
    for mask, box, crop in zip(reference["masks"][valid], out["boxes"][valid],
                               out["box_masks"][valid]):
      values = bilinear_crop(mask, box, 8)
      clear = np.abs(values - 0.5) > 0.05
      np.testing.assert_array_equal(crop[clear], values[clear] >= 0.5)
      assert crop.any()


# Batching instance keys.


def instance_source(n=5):
  return [shapes_example(np.random.default_rng(i)) for i in range(n)]


EVAL_OPS = "instance_masks|thing_classes(ids=(11, 12, 13, 14))|pad_instances(max_instances=6)"


def test_eval_batches_pad_the_last_batch_with_blank_examples():
  source = instance_source(5)
  batches = list(pipeline.eval_batches(source, EVAL_OPS, 4, ignore_index=255,
                                       keys=pipeline.INSTANCE_KEYS, optional_keys=("masks",)))
  assert len(batches) == 2
  expected_keys = set(pipeline.INSTANCE_KEYS) | {"masks"}
  shapes = {"image": (4, 24, 32, 3), "boxes": (4, 6, 4), "classes": (4, 6),
            "instance_valid": (4, 6), "masks": (4, 6, 24, 32)}
  for batch in batches:
    assert set(batch) == expected_keys
    assert {k: v.shape for k, v in batch.items()} == shapes
  reference = parse_pipeline(EVAL_OPS)
  examples = [reference(record, np.random.default_rng(0)) for record in source]
  for i, example in enumerate(examples):
    for key in expected_keys:
      np.testing.assert_array_equal(batches[i // 4][key][i % 4], example[key])
    assert example["instance_valid"].any()
  last = batches[1]
  assert not last["instance_valid"][1:].any()
  for key in expected_keys:
    assert not last[key][1:].any()
    assert last[key].dtype == examples[0][key].dtype


@pytest.mark.parametrize("n,batch", [(10, 4), (8, 4), (3, 1)])
def test_eval_batches_yield_every_example_once_in_order(n, batch):
  source = [{"image": np.full((2, 3, 3), i, np.uint8), "label": np.full((2, 3), i, np.uint8)}
            for i in range(n)]
  batches = list(pipeline.eval_batches(source, "", batch, ignore_index=255))
  assert len(batches) == -(-n // batch)
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(images[:n, 0, 0, 0], np.arange(n))
  np.testing.assert_array_equal(labels[:n, 0, 0], np.arange(n))
  assert not images[n:].any() and (labels[n:] == 255).all()


def test_eval_batches_leave_out_optional_keys_the_ops_do_not_make():
  ops = EVAL_OPS + "|crop_masks(size=4)"
  batches = list(pipeline.eval_batches(instance_source(3), ops, 2, ignore_index=255,
                                       keys=pipeline.INSTANCE_KEYS,
                                       optional_keys=pipeline.OPTIONAL_INSTANCE_KEYS))
  # is_crowd passes through pad_instances; masks became box_masks.
  assert set(batches[0]) == set(pipeline.INSTANCE_KEYS) | {"is_crowd", "box_masks"}
  assert batches[1]["box_masks"].shape == (2, 6, 4, 4) and not batches[1]["box_masks"][1].any()


def test_train_iterator_yields_instance_batches():
  ops = ("instance_masks|thing_classes(ids=(11, 12, 13, 14))|random_flip"
         "|random_crop(size=(16, 20))|pad_instances(max_instances=5)")
  source = instance_source(6)
  it = pipeline.train_iterator(source, ops, 4, seed=0, num_threads=1,
                               keys=pipeline.INSTANCE_KEYS,
                               optional_keys=pipeline.OPTIONAL_INSTANCE_KEYS)
  shapes = {"image": (4, 16, 20, 3), "boxes": (4, 5, 4), "classes": (4, 5),
            "instance_valid": (4, 5), "is_crowd": (4, 5), "masks": (4, 5, 16, 20)}
  for _ in range(3):
    batch = next(it)
    assert {k: v.shape for k, v in batch.items()} == shapes
    assert batch["instance_valid"].dtype == bool and batch["masks"].dtype == np.uint8
    for masks, boxes, valid in zip(batch["masks"], batch["boxes"], batch["instance_valid"]):
      np.testing.assert_array_equal(boxes, tight_boxes(masks))
      np.testing.assert_array_equal(valid, masks.any(axis=(1, 2)))


def test_example_shapes_of_instance_keys_and_missing_keys():
  source = instance_source(1)
  shapes = pipeline.example_shapes(source, EVAL_OPS, keys=pipeline.INSTANCE_KEYS)
  assert shapes == {"image": (24, 32, 3), "boxes": (6, 4), "classes": (6,),
                    "instance_valid": (6,)}
  with pytest.raises(ValueError, match=r"without \['masks'\].*the model needs"):
    pipeline.example_shapes(source, EVAL_OPS + "|crop_masks(size=4)",
                            keys=pipeline.INSTANCE_KEYS + ("masks",))
  with pytest.raises(ValueError, match=r"without \['label'\]"):
    pipeline.example_shapes(source, EVAL_OPS)
