"""visualization.draw_instances: masks, boxes and labels of detections."""
import numpy as np
import pytest

from segjax import visualization

NAMES = ("cat", "dog", "car")
PALETTE = np.array([[255, 0, 0], [0, 200, 0], [20, 40, 250]], np.uint8)
H, W = 96, 160


def _image():
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def _rect(y1, x1, y2, x2, shape=(H, W)):
  mask = np.zeros(shape, bool)
  mask[y1:y2, x1:x2] = True
  return mask


def _blend(pixels, colour, alpha):
  return np.round((1 - alpha) * pixels.astype(np.float64) + alpha * np.asarray(colour, float))


# Three instances: two kept (cat, car), one under the threshold (dog). Their boxes
# are the masks' boxes; labels go above boxes (rows y1 - 20 .. y1).
BOXES = np.array([[20, 30, 60, 70], [100, 40, 140, 80], [70, 5, 90, 25]], np.float32)
CLASSES = np.array([0, 2, 1])
SCORES = np.array([0.9, 0.6, 0.3])


def _masks(shape=(H, W)):
  return np.stack([_rect(30, 20, 70, 60, shape), _rect(40, 100, 80, 140, shape),
                   _rect(5, 70, 25, 90, shape)])


def test_masks_are_blended_and_the_rest_untouched():
  image = _image()
  original = image.copy()
  out = visualization.draw_instances(image, BOXES, CLASSES, SCORES, _masks(), NAMES, PALETTE,
                                     alpha=0.4)
  np.testing.assert_array_equal(image, original)  # input not modified
  assert out.dtype == np.uint8 and out.shape == image.shape
  masks = _masks()
  # Kept: mask interiors (away from the outline and the label) are the blend.
  for index, (rows, cols) in enumerate(((slice(32, 68), slice(22, 58)),
                                        (slice(42, 78), slice(102, 138)))):
    assert masks[index][rows, cols].all()
    np.testing.assert_array_equal(out[rows, cols],
                                  _blend(image[rows, cols], PALETTE[CLASSES[index]], 0.4))
  # The box outline is the class colour.
  np.testing.assert_array_equal(out[50, 20], PALETTE[0])
  np.testing.assert_array_equal(out[50, 139], PALETTE[2])
  np.testing.assert_array_equal(out[79, 120], PALETTE[2])
  # The label sits above the box: it changes pixels there, in the class colour mostly.
  label = out[24:30, 20:40]
  assert (label != image[24:30, 20:40]).any(axis=-1).mean() > 0.9
  assert (label == PALETTE[0]).all(axis=-1).mean() > 0.4
  # Nothing else changes: the dog (score 0.3 < 0.5) and the background.
  drawn = np.zeros((H, W), bool)
  drawn[0:71, 20:61] = drawn[0:81, 100:141] = True  # masks, boxes and labels, generously
  np.testing.assert_array_equal(out[~drawn], image[~drawn])


def test_best_score_on_top_and_per_instance_colours():
  image = np.full((H, W, 3), 100, np.uint8)
  masks = np.stack([_rect(30, 30, 60, 70), _rect(40, 50, 80, 100)])
  boxes = np.array([[30, 30, 70, 60], [50, 40, 100, 80]], np.float32)
  scores = np.array([0.7, 0.95])
  out = visualization.draw_instances(image, boxes, np.array([1, 1]), scores, masks, NAMES)
  colours = visualization.instance_colors(2)
  assert not (colours[0] == colours[1]).all()
  np.testing.assert_array_equal(out[50, 40], _blend(image[50, 40], colours[0], 0.5))
  np.testing.assert_array_equal(out[70, 80], _blend(image[70, 80], colours[1], 0.5))
  # Overlap: the lower score is blended first, the higher over it.
  np.testing.assert_array_equal(
      out[50, 60], _blend(_blend(image[50, 60], colours[0], 0.5), colours[1], 0.5))
  # Swapping the scores swaps the order.
  swapped = visualization.draw_instances(image, boxes, np.array([1, 1]), scores[::-1], masks,
                                         NAMES)
  np.testing.assert_array_equal(
      swapped[50, 60], _blend(_blend(image[50, 60], colours[1], 0.5), colours[0], 0.5))
  # A palette colours by class instead.
  same = visualization.draw_instances(image, boxes, np.array([1, 1]), scores, masks, NAMES,
                                      PALETTE)
  np.testing.assert_array_equal(same[50, 40], same[70, 80])


def test_invalid_and_low_scores_are_not_drawn():
  image = _image()
  masks = _masks()
  nothing = visualization.draw_instances(image, BOXES, CLASSES, SCORES, masks, NAMES, PALETTE,
                                         valid=np.array([False, False, True]))
  np.testing.assert_array_equal(nothing, image)  # the valid one scores under 0.5
  high = visualization.draw_instances(image, BOXES, CLASSES, SCORES, masks, NAMES, PALETTE,
                                      score_threshold=0.95)
  np.testing.assert_array_equal(high, image)
  # Garbage classes in rows that are not drawn are fine; the threshold is inclusive.
  low = visualization.draw_instances(image, BOXES, np.array([0, 2, 99]), SCORES, masks, NAMES,
                                     PALETTE, score_threshold=0.6)
  first_two = visualization.draw_instances(image, BOXES[:2], CLASSES[:2], SCORES[:2], masks[:2],
                                          NAMES, PALETTE, score_threshold=0.6)
  np.testing.assert_array_equal(low, first_two)
  np.testing.assert_array_equal(low[45:75, 105:135],
                                _blend(image[45:75, 105:135], PALETTE[2], 0.5))


def test_boxes_only_and_padded_masks():
  image = _image()
  out = visualization.draw_instances(image, BOXES, CLASSES, SCORES, None, NAMES, PALETTE)
  np.testing.assert_array_equal(out[30, 20:60], np.tile(PALETTE[0], (40, 1)))  # top edge
  np.testing.assert_array_equal(out[69, 20:60], np.tile(PALETTE[0], (40, 1)))  # bottom edge
  np.testing.assert_array_equal(out[40:80, 139], np.tile(PALETTE[2], (40, 1)))  # right edge
  np.testing.assert_array_equal(out[32:68, 22:58], image[32:68, 22:58])  # interior untouched
  # Masks padded beyond the image draw as the cropped ones; padding is ignored.
  padded = np.ones((3, H + 8, W + 5), np.float32)
  padded[:, :H, :W] = _masks() * 0.8
  np.testing.assert_array_equal(
      visualization.draw_instances(image, BOXES, CLASSES, SCORES, padded, NAMES, PALETTE),
      visualization.draw_instances(image, BOXES, CLASSES, SCORES, _masks(), NAMES, PALETTE))
  # A box partly outside the image is clipped; on an image smaller than the label,
  # the label is cropped to it.
  small = np.zeros((40, 60, 3), np.uint8)
  clipped = visualization.draw_instances(small, np.array([[-5, 20, 30, 50]]), np.array([1]),
                                         np.array([0.99]), None, NAMES, PALETTE)
  np.testing.assert_array_equal(clipped[20:40, 0], np.tile(PALETTE[1], (20, 1)))  # left edge
  np.testing.assert_array_equal(clipped[39, 0:30], np.tile(PALETTE[1], (30, 1)))  # bottom
  np.testing.assert_array_equal(clipped[22:38, 1:29], small[22:38, 1:29])
  tiny = visualization.draw_instances(np.zeros((8, 6, 3), np.uint8),
                                      np.array([[1, 1, 5, 7]]), np.array([1]),
                                      np.array([0.99]), None, NAMES, PALETTE)
  assert tiny.shape == (8, 6, 3) and (tiny != 0).any()


def test_rejects_bad_input():
  image, masks = _image(), _masks()
  args = (BOXES, CLASSES, SCORES, masks, NAMES, PALETTE)
  with pytest.raises(ValueError, match="uint8"):
    visualization.draw_instances(image.astype(np.float32), *args)
  with pytest.raises(ValueError, match="uint8"):
    visualization.draw_instances(image[..., 0], *args)
  with pytest.raises(ValueError, match="boxes has shape"):
    visualization.draw_instances(image, BOXES[:, :3], *args[1:])
  with pytest.raises(ValueError, match="scores has shape"):
    visualization.draw_instances(image, BOXES, CLASSES, SCORES[:2], masks, NAMES, PALETTE)
  with pytest.raises(ValueError, match="masks has shape"):
    visualization.draw_instances(image, BOXES, CLASSES, SCORES, masks[:, :50], NAMES, PALETTE)
  with pytest.raises(ValueError, match="masks has shape"):
    visualization.draw_instances(image, BOXES, CLASSES, SCORES, masks[:2], NAMES, PALETTE)
  with pytest.raises(ValueError, match="classes \\[5\\]"):
    visualization.draw_instances(image, BOXES, np.array([5, 0, 0]), SCORES, masks, NAMES)
  with pytest.raises(ValueError, match="integer"):
    visualization.draw_instances(image, BOXES, CLASSES.astype(float), SCORES, masks, NAMES)
  with pytest.raises(ValueError, match="palette"):
    visualization.draw_instances(image, *args[:-1], PALETTE[:2])
  with pytest.raises(ValueError, match="alpha"):
    visualization.draw_instances(image, *args, alpha=1.5)
