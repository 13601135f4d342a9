"""Photometric ops: colour augmentation and normalization of `image`."""
import cv2
import numpy as np

from segjax.data.transforms.common import Op, _check, _is_number, _range, _require, register_op


@register_op("photometric_distortion")
def photometric_distortion(brightness_delta: float = 32,
                           contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5),
                           hue_delta: int = 18) -> Op:
  """mmseg `PhotoMetricDistortion` on an RGB uint8 image; the image stays uint8.

  In mmseg's order, each step applied with probability 0.5: brightness
  (add U(-delta, delta)), contrast (multiply by U(contrast_range)) either first
  or last (coin flip), saturation (scale HSV S by U(saturation_range)), hue
  (shift HSV H by an int in [-hue_delta, hue_delta], modulo OpenCV's 180). Each
  step clips to [0, 255] and truncates to uint8 as mmseg does.
  """
  op = "photometric_distortion"
  _check(_is_number(brightness_delta) and brightness_delta >= 0, op,
         "brightness_delta", "a number >= 0", brightness_delta)
  contrast_range = _range(contrast_range, op, "contrast_range")
  saturation_range = _range(saturation_range, op, "saturation_range")
  _check(isinstance(hue_delta, int) and not isinstance(hue_delta, bool) and
         0 <= hue_delta < 180, op, "hue_delta", "an int in [0, 180)", hue_delta)

  def affine(x, alpha, beta):
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

  def contrast(image, rng):
    if rng.integers(2):
      image = affine(image, rng.uniform(*contrast_range), 0.0)
    return image

  def fn(example, rng):
    image = _require(example, "image", op)
    if image.dtype != np.uint8:
      raise ValueError(f"{op} needs a uint8 image but got {image.dtype}; "
                       "put it before `normalize` in the pipeline.")
    if rng.integers(2):
      image = affine(image, 1.0, rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = rng.integers(2)
    if contrast_first:
      image = contrast(image, rng)
    if rng.integers(2):
      hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
      hsv[..., 1] = affine(hsv[..., 1], rng.uniform(*saturation_range), 0.0)
      image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
      hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
      shift = rng.integers(-hue_delta, hue_delta + 1)
      hsv[..., 0] = (hsv[..., 0].astype(np.int32) + shift) % 180
      image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first:
      image = contrast(image, rng)
    return {**example, "image": image}
  return fn


@register_op("normalize")
def normalize(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)) -> Op:
  """image -> float32 (image - mean) / std per RGB channel (ImageNet defaults).

  The task pipelines no longer end with it: they ship uint8 images (a quarter of the
  bytes) and the jitted steps normalize them on the device with config.data.mean / std,
  bit for bit as this op does (`segjax.data.device.normalize`). A pipeline that still
  ends with it sends float32 images, which the steps take as normalized already.
  """
  _check(isinstance(mean, (tuple, list)) and len(mean) == 3 and
         all(_is_number(v) for v in mean), "normalize", "mean", "3 numbers", mean)
  _check(isinstance(std, (tuple, list)) and len(std) == 3 and
         all(_is_number(v) and v > 0 for v in std), "normalize", "std",
         "3 positive numbers", std)
  mean, std = np.float32(mean), np.float32(std)

  def fn(example, rng):
    del rng
    image = _require(example, "image", "normalize")
    return {**example, "image": (image.astype(np.float32) - mean) / std}
  return fn
