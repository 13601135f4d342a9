"""SemanticPredictor against direct numpy / torch re-implementations of
mmseg's whole, slide and multi-scale + flip inference."""
import cv2
import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

from segjax.inference import SemanticPredictor, resized_size
from segjax.models import build_model

NUM_CLASSES = 5
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


class Pointwise(nn.Module):
  """Per-pixel (1x1) MLP: its logits at a pixel depend on that pixel only."""

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Conv(NUM_CLASSES, (1, 1))(nn.tanh(nn.Conv(8, (1, 1))(x)))


class Local(nn.Module):
  """Two zero-padded convs: logits near a window's border depend on where the
  window was cut."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.tanh(nn.Conv(8, (3, 3), padding="SAME")(x))
    return 3.0 * nn.Conv(NUM_CLASSES, (5, 5), padding="SAME")(x)


class MirrorSymmetric(nn.Module):
  """A 3x3 conv with a left-right symmetric kernel: flip-equivariant."""

  @nn.compact
  def __call__(self, x, train=False):
    kernel = self.param("kernel", nn.initializers.normal(1.0), (3, 3, 3, NUM_CLASSES))
    kernel = kernel + kernel[:, ::-1]
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def init(model, size=8):
  """Random variables; the "rbg" key compiles far faster than threefry on CPU."""
  init_fn = jax.jit(model.init, static_argnames="train")
  return init_fn(jax.random.key(0, impl="rbg"), np.zeros((1, size, size, 3), np.float32),
                 train=False)


def random_image(height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype(np.uint8)


def normalize(image):
  return (image.astype(np.float32) - np.float32(MEAN)) / np.float32(STD)


def softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def apply(model, variables, x):
  """Model logits of one normalized (h, w, 3) image, as numpy."""
  return np.asarray(model.apply(variables, x[None], train=False)[0])


def whole_logits(model, variables, x, multiple):
  """Logits of the image zero-padded bottom/right to `multiple`, cropped back."""
  h, w = x.shape[:2]
  padded = np.zeros((-(-h // multiple) * multiple, -(-w // multiple) * multiple, 3), np.float32)
  padded[:h, :w] = x
  return apply(model, variables, padded)[:h, :w]


def mmseg_slide_logits(model, variables, x, window, stride):
  """mmseg's slide_inference loop; crops smaller than the window are
  zero-padded to it and their logits cropped back."""
  h_img, w_img = x.shape[:2]
  (h_crop, w_crop), (h_stride, w_stride) = window, stride
  h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
  w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
  preds = np.zeros((h_img, w_img, NUM_CLASSES), np.float32)
  count = np.zeros((h_img, w_img, 1), np.float32)
  for h_idx in range(h_grids):
    for w_idx in range(w_grids):
      y2 = min(h_idx * h_stride + h_crop, h_img)
      x2 = min(w_idx * w_stride + w_crop, w_img)
      y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
      crop = np.zeros((h_crop, w_crop, 3), np.float32)
      crop[:y2 - y1, :x2 - x1] = x[y1:y2, x1:x2]
      preds[y1:y2, x1:x2] += apply(model, variables, crop)[:y2 - y1, :x2 - x1]
      count[y1:y2, x1:x2] += 1
  return preds / count


def mmcv_keep_ratio(h, w, scale):
  """mmcv.rescale_size with a (w, h) tuple scale, written out."""
  factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
  return int(h * factor + 0.5), int(w * factor + 0.5)


@pytest.fixture(scope="module")
def local():
  model = Local()
  return model, init(model)


@pytest.fixture(scope="module")
def unet():
  model = build_model("unet", NUM_CLASSES, {"width": 4, "depth": 2})
  return model, init(model, 32)


def predictor(model_and_variables, **kw):
  model, variables = model_and_variables
  return SemanticPredictor(model, variables, NUM_CLASSES, mean=MEAN, std=STD, **kw)


@pytest.mark.parametrize("which", ["local", "unet"])
def test_slide_with_window_covering_image_equals_whole(which, request):
  model = request.getfixturevalue(which)
  image = random_image(37, 53)
  whole = predictor(model, size_multiple=64)
  slide = predictor(model, mode="slide", window=(64, 64), stride=(32, 32))
  np.testing.assert_allclose(slide.probabilities(image), whole.probabilities(image), atol=1e-6)
  np.testing.assert_array_equal(slide.predict(image), whole.predict(image))


def test_slide_of_pointwise_model_equals_whole():
  model = Pointwise()
  pair = (model, init(model))
  image = random_image(75, 101)
  expected = softmax(apply(model, pair[1], normalize(image)))
  whole = predictor(pair).probabilities(image)
  slide = predictor(pair, mode="slide", window=(32, 48), stride=(20, 30),
                    window_batch=5).probabilities(image)
  np.testing.assert_allclose(whole, expected, atol=1e-6)
  np.testing.assert_allclose(slide, expected, atol=1e-6)


@pytest.mark.parametrize("size", [(75, 101), (20, 30), (20, 101)])
def test_slide_matches_mmseg_loop(local, size):
  image = random_image(*size)
  model, variables = local
  expected = softmax(mmseg_slide_logits(model, variables, normalize(image), (32, 48), (20, 30)))
  slide = predictor(local, mode="slide", window=(32, 48), stride=(20, 30), window_batch=5)
  np.testing.assert_allclose(slide.probabilities(image), expected, atol=1e-5)
  # The overlapping windows disagree near their borders: averaging matters.
  plain = softmax(apply(model, variables, normalize(image)))
  assert np.abs(plain - expected).max() > 1e-2


def test_flip_of_flip_equivariant_model_changes_nothing():
  model = MirrorSymmetric()
  pair = (model, init(model))
  image = random_image(37, 53)
  plain = predictor(pair).probabilities(image)
  np.testing.assert_allclose(predictor(pair, flip=True).probabilities(image), plain, atol=1e-6)
  assert np.abs(plain - plain[:, ::-1]).max() > 1e-2  # the image is not symmetric


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_any_size_gives_original_size(unet, mode):
  p = predictor(unet, mode=mode, window=(32, 32), stride=(16, 16), scale=(48, 32),
                scales=(0.75, 1.0))
  for size in [(37, 53), (17, 9), (1, 3)]:
    image = random_image(*size)
    probabilities = p.probabilities(image)
    labels = p.predict(image)
    assert probabilities.shape == size + (NUM_CLASSES,) and probabilities.dtype == np.float32
    assert labels.shape == size and labels.dtype == np.int32
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(labels, probabilities.argmax(-1))


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_multi_scale_flip_matches_direct(local, mode):
  model, variables = local
  image = random_image(37, 53)
  scale, ratios = (96, 48), (0.5, 1.0, 1.25)
  total = 0
  for ratio in ratios:
    h, w = mmcv_keep_ratio(37, 53, (int(scale[0] * ratio), int(scale[1] * ratio)))
    resized = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    for flip in (False, True):
      x = normalize(resized[:, ::-1] if flip else resized)
      logits = (whole_logits(model, variables, x, 32) if mode == "whole" else
                mmseg_slide_logits(model, variables, x, (32, 32), (24, 24)))
      logits = torch.from_numpy(np.ascontiguousarray(logits)).permute(2, 0, 1)[None]
      logits = torch.nn.functional.interpolate(logits, size=(37, 53), mode="bilinear",
                                               align_corners=False)
      probabilities = torch.softmax(logits, 1)[0].permute(1, 2, 0).numpy()
      total = total + (probabilities[:, ::-1] if flip else probabilities)
  expected = total / (2 * len(ratios))
  p = predictor(local, mode=mode, scale=scale, scales=ratios, flip=True, window=(32, 32),
                stride=(24, 24))
  np.testing.assert_allclose(p.probabilities(image), expected, atol=1e-5)
  np.testing.assert_array_equal(p.predict(image), expected.argmax(-1))


@pytest.mark.parametrize("h, w, scale, ratio", [
    (375, 500, (2048, 512), 1.0), (375, 500, (2048, 512), 0.75), (500, 375, (2048, 512), 1.75),
    (1024, 2048, (2048, 1024), 0.5), (1024, 2048, (2048, 1024), 1.25), (37, 53, None, 0.5),
    (37, 53, None, 1.0), (37, 53, (96, 48), 1.25)])
def test_resized_size_follows_mmseg(h, w, scale, ratio):
  base = (w, h) if scale is None else scale
  expected = mmcv_keep_ratio(h, w, (int(base[0] * ratio), int(base[1] * ratio)))
  assert resized_size(h, w, scale, ratio) == expected
  if scale is None and ratio == 1.0:
    assert expected == (h, w)


def test_resized_size_known_value():
  assert resized_size(375, 500, (2048, 512)) == (512, 683)


@pytest.fixture(scope="module")
def unet_valid():
  model = build_model("unet_valid", NUM_CLASSES, {"width": 4, "depth": 1})
  return model, init(model, 28)  # 28 -> 12: a border of 8


@pytest.mark.parametrize("size", [(37, 53), (9, 10)])
def test_overlap_tile_of_center_crop_model(unet_valid, size):
  model, variables = unet_valid
  image = random_image(*size)
  p = predictor(unet_valid, mode="slide", window=(28, 28), stride=(12, 8), window_batch=3)
  got = p.probabilities(image)
  # Direct: mirror 8 pixels out, tile the image with 12x12 outputs by mmseg's grid.
  h, w = size
  hh, ww = max(h, 12), max(w, 12)
  mirrored = normalize(np.pad(image, ((8, 8 + hh - h), (8, 8 + ww - w), (0, 0)), mode="reflect"))
  canvas = np.zeros((hh, ww, NUM_CLASSES), np.float32)
  count = np.zeros((hh, ww, 1), np.float32)
  for y in [min(i * 12, hh - 12) for i in range((hh - 12 + 11) // 12 + 1)]:
    for x in [min(j * 8, ww - 12) for j in range((ww - 12 + 7) // 8 + 1)]:
      canvas[y:y + 12, x:x + 12] += apply(model, variables, mirrored[y:y + 28, x:x + 28])
      count[y:y + 12, x:x + 12] += 1
  np.testing.assert_allclose(got, softmax(canvas / count)[:h, :w], atol=1e-5)
  if size == (37, 53):
    # Rows 12-23 come from the one tile row at 12 only, whose input rows 4-31
    # lie inside the image; columns 16-19 lie in tiles at 8 and 16 only.
    left = apply(model, variables, normalize(image[4:32, 0:28]))
    right = apply(model, variables, normalize(image[4:32, 8:36]))
    np.testing.assert_allclose(got[12:24, 16:20],
                               softmax((left[:, 8:12] + right[:, 0:4]) / 2), atol=1e-5)


def test_compiles_once_per_padded_shape(local):
  whole = predictor(local)
  for size in [(37, 53), (50, 60), (64, 64)]:
    whole.predict(random_image(*size))
  assert [k for k in whole.compiled if k[0] == "whole"] == [("whole", 64, 64)]
  slide = predictor(local, mode="slide", window=(32, 32), stride=(24, 24))
  for size in [(37, 53), (70, 90)]:
    slide.predict(random_image(*size))
  assert [k for k in slide.compiled if k[0] == "windows"] == [("windows",)]


def test_bad_arguments_raise(local, unet_valid):
  with pytest.raises(ValueError, match="mode='slide'"):
    predictor(unet_valid)
  with pytest.raises(ValueError, match="stride"):
    predictor(unet_valid, mode="slide", window=(28, 28), stride=(13, 12))
  with pytest.raises(ValueError, match="stride"):
    predictor(local, mode="slide", window=(32, 32), stride=(33, 16))
  with pytest.raises(ValueError, match="mode"):
    predictor(local, mode="tiles")
  with pytest.raises(ValueError, match="uint8"):
    predictor(local).predict(random_image(8, 8).astype(np.float32))
  with pytest.raises(ValueError, match="num_classes"):
    SemanticPredictor(local[0], local[1], 7, mean=MEAN, std=STD).predict(random_image(8, 8))
