"""Host-side numpy preprocessing for segmentation, composed from a string.

A spec such as
  "squeeze_labels|random_resize(scale=(2048, 512))|random_crop(size=(512, 512))"
names registered ops separated by "|"; each op is a factory taking Python
literal keyword arguments and returning `fn(example, rng) -> example`, where
rng is the `np.random.Generator` grain's `random_map` passes in.

An example is a dict of numpy arrays. Spatial keys:
  image: (H, W, 3), resized bilinearly, padded with 0.
  label: (H, W) class ids, padded with the ignore index.
  instance_ids: (H, W), padded with 0.
  panoptic: (H, W, 3), padded with 0.
Label maps are only ever resized with nearest neighbour, so ids never blend.
`boxes` (N, 4) float32 x1, y1, x2, y2 in pixels (x2, y2 exclusive) follow every
geometric op together with `instance_valid` (N,) bool, which turns False when a
crop leaves a box empty; N never changes and invalid rows are zeroed. Other
keys pass through untouched.

Ops never write into their input arrays or dict: grain may hand the same
source element to the pipeline again in a later epoch.
"""
import ast
import inspect
from typing import Any, Callable, Dict, List, Tuple

import cv2
import numpy as np

from segjax.registry import Registry

Example = Dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]

PREPROCESS_OPS: Registry = Registry("preprocessing op")

LABEL_KEYS = ("label", "instance_ids", "panoptic")
_MMSEG_CROP_TRIES = 10


# Argument checks, run once when an op is built.


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_pair(value, op: str, arg: str) -> Tuple[int, int]:
  if (not isinstance(value, (tuple, list)) or len(value) != 2 or not all(
      isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
    raise ValueError(f"{op}: `{arg}` must be a pair of positive ints, got {value!r}.")
  return int(value[0]), int(value[1])


def _range(value, op: str, arg: str) -> Tuple[float, float]:
  if (not isinstance(value, (tuple, list)) or len(value) != 2 or
      not all(_is_number(v) for v in value) or not 0 <= value[0] <= value[1]):
    raise ValueError(
        f"{op}: `{arg}` must be a pair (low, high) with 0 <= low <= high, got {value!r}.")
  return float(value[0]), float(value[1])


def _check(ok: bool, op: str, arg: str, expected: str, value) -> None:
  if not ok:
    raise ValueError(f"{op}: `{arg}` must be {expected}, got {value!r}.")


def _check_int(value, op: str, arg: str, low: int = 0) -> None:
  _check(isinstance(value, int) and not isinstance(value, bool) and value >= low,
         op, arg, f"an int >= {low}", value)


# Geometry shared by the ops.


def _require(example: Example, key: str, op: str):
  if key not in example:
    raise KeyError(f"{op} needs `{key}` but the example only has keys {sorted(example)}.")
  return example[key]


def _spatial_size(example: Example) -> Tuple[int, int]:
  """(H, W) of the example, from `image` or else the first label map present."""
  for key in ("image",) + LABEL_KEYS:
    if key in example:
      return tuple(example[key].shape[:2])
  raise KeyError(f"example has no spatial key (image, {', '.join(LABEL_KEYS)}); "
                 f"it has keys {sorted(example)}.")


def _set_boxes(example: Example, boxes: np.ndarray) -> None:
  """Stores moved boxes; a box that is empty now or was invalid becomes a zero row."""
  valid = _require(example, "instance_valid", "a geometric op on `boxes`").astype(bool)
  valid &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  example["boxes"] = np.where(valid[:, None], boxes, 0).astype(example["boxes"].dtype)
  example["instance_valid"] = valid


def _nearest_index(size_in: int, size_out: int) -> np.ndarray:
  """Source index of each output pixel, pixel centres aligned as in cv2.INTER_LINEAR."""
  index = np.floor((np.arange(size_out) + 0.5) * (size_in / size_out)).astype(np.int64)
  return np.minimum(index, size_in - 1)


def _resize(example: Example, out_h: int, out_w: int) -> Example:
  """Bilinear image, nearest-neighbour label maps, scaled boxes."""
  h, w = _spatial_size(example)
  out = dict(example)
  if "image" in out:
    out["image"] = cv2.resize(out["image"], (out_w, out_h), interpolation=cv2.INTER_LINEAR)
  # Gathering rows and columns keeps any integer dtype (cv2 lacks int64/uint32)
  # and copies ids bit-exactly, like cv2.INTER_NEAREST_EXACT.
  rows, cols = _nearest_index(h, out_h), _nearest_index(w, out_w)
  for key in LABEL_KEYS:
    if key in out:
      out[key] = out[key].take(rows, axis=0).take(cols, axis=1)
  if "boxes" in out:
    boxes = out["boxes"].astype(np.float32) * np.float32([out_w / w, out_h / h] * 2)
    _set_boxes(out, np.clip(boxes, 0, np.float32([out_w, out_h] * 2)))
  return out


def _crop(example: Example, y0: int, x0: int, h: int, w: int) -> Example:
  """Window [y0, y0 + h) x [x0, x0 + w), clipped to the example."""
  out = dict(example)
  for key in ("image",) + LABEL_KEYS:
    if key in out:
      out[key] = out[key][y0:y0 + h, x0:x0 + w]
  if "boxes" in out:
    crop_h, crop_w = _spatial_size(out)
    boxes = out["boxes"].astype(np.float32) - np.float32([x0, y0] * 2)
    _set_boxes(out, np.clip(boxes, 0, np.float32([crop_w, crop_h] * 2)))
  return out


def _pad(example: Example, out_h: int, out_w: int, ignore_index: int) -> Example:
  """Pads bottom/right to (out_h, out_w); boxes keep their coordinates."""
  h, w = _spatial_size(example)
  if (h, w) == (out_h, out_w):
    return example
  out = dict(example)
  for key, value in (("image", 0), ("label", ignore_index), ("instance_ids", 0),
                     ("panoptic", 0)):
    if key in out:
      padded = np.full((out_h, out_w) + out[key].shape[2:], value, out[key].dtype)
      padded[:h, :w] = out[key]
      out[key] = padded
  return out


def _hflip(example: Example) -> Example:
  out = dict(example)
  _, w = _spatial_size(example)
  for key in ("image",) + LABEL_KEYS:
    if key in out:
      out[key] = np.ascontiguousarray(out[key][:, ::-1])
  if "boxes" in out:
    boxes = out["boxes"].astype(np.float32)
    _set_boxes(out, np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1))
  return out


def _keep_ratio_size(h: int, w: int, scale: Tuple[int, int]) -> Tuple[int, int]:
  """mmcv `rescale_size`: the largest (h, w) of the same aspect ratio whose long
  side fits max(scale) and short side fits min(scale), rounded half up."""
  factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
  return int(h * factor + 0.5), int(w * factor + 0.5)


# Ops.


@PREPROCESS_OPS.register("squeeze_labels")
def squeeze_labels() -> Op:
  """(H, W, 1) -> (H, W) for `label` and `instance_ids`, as tfds decodes them."""
  def fn(example, rng):
    del rng
    out = dict(example)
    for key in ("label", "instance_ids"):
      if key in out and out[key].ndim == 3 and out[key].shape[-1] == 1:
        out[key] = out[key][..., 0]
    return out
  return fn


@PREPROCESS_OPS.register("resize")
def resize(scale, keep_ratio: bool = True) -> Op:
  """mmseg `Resize`. `scale` follows mmseg's (w, h) order.

  keep_ratio=True: the aspect ratio is kept and the result is as large as
  possible with long side <= max(scale) and short side <= min(scale), so the
  order inside `scale` does not matter, e.g. (2048, 512) sends 500x375 (w x h)
  to 683x512. keep_ratio=False: the output is exactly h = scale[1], w = scale[0].
  """
  scale = _int_pair(scale, "resize", "scale")
  _check(isinstance(keep_ratio, bool), "resize", "keep_ratio", "a bool", keep_ratio)

  def fn(example, rng):
    del rng
    if keep_ratio:
      return _resize(example, *_keep_ratio_size(*_spatial_size(example), scale))
    return _resize(example, scale[1], scale[0])
  return fn


@PREPROCESS_OPS.register("random_resize")
def random_resize(scale, ratio_range=(0.5, 2.0)) -> Op:
  """mmseg `RandomResize` with ratio_range and keep_ratio=True.

  Draws ratio ~ U(ratio_range), scales `scale` (w, h) by it (rounded half up),
  then resizes as `resize(keep_ratio=True)` does: this is the usual multi-scale
  training augmentation.
  """
  scale = _int_pair(scale, "random_resize", "scale")
  low, high = _range(ratio_range, "random_resize", "ratio_range")
  _check(low > 0, "random_resize", "ratio_range", "positive", ratio_range)

  def fn(example, rng):
    ratio = rng.uniform(low, high)
    target = (int(scale[0] * ratio + 0.5), int(scale[1] * ratio + 0.5))
    return _resize(example, *_keep_ratio_size(*_spatial_size(example), target))
  return fn


@PREPROCESS_OPS.register("random_crop")
def random_crop(size, cat_max_ratio: float = 1.0, ignore_index: int = 255) -> Op:
  """mmseg `RandomCrop` of `size` (h, w), then padding up to `size`.

  The offset is uniform over the valid positions. With cat_max_ratio < 1, as in
  mmseg, a crop is accepted only if its `label` holds more than one non-ignored
  class and none covers cat_max_ratio or more of the non-ignored pixels; after
  10 rejections the next draw is used unchecked. This keeps crops from being
  all sky or all road. Images smaller than `size` are padded bottom/right
  (image 0, label ignore_index, instance_ids 0, panoptic 0) so every output is
  exactly `size`, which static batch shapes need.
  """
  crop_h, crop_w = _int_pair(size, "random_crop", "size")
  _check(_is_number(cat_max_ratio) and 0 < cat_max_ratio <= 1, "random_crop",
         "cat_max_ratio", "a number in (0, 1]", cat_max_ratio)
  _check_int(ignore_index, "random_crop", "ignore_index")

  def draw(h, w, rng):
    return (int(rng.integers(0, max(h - crop_h, 0) + 1)),
            int(rng.integers(0, max(w - crop_w, 0) + 1)))

  def balanced(label):
    _, counts = np.unique(label[label != ignore_index], return_counts=True)
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio

  def fn(example, rng):
    h, w = _spatial_size(example)
    y0, x0 = draw(h, w, rng)
    if cat_max_ratio < 1 and "label" in example:
      for _ in range(_MMSEG_CROP_TRIES):
        if balanced(example["label"][y0:y0 + crop_h, x0:x0 + crop_w]):
          break
        y0, x0 = draw(h, w, rng)
    return _pad(_crop(example, y0, x0, crop_h, crop_w), crop_h, crop_w, ignore_index)
  return fn


@PREPROCESS_OPS.register("pad")
def pad(size, ignore_index: int = 255) -> Op:
  """Pads bottom/right to `size` (h, w): image 0, label ignore_index, others 0.

  Used to give evaluation batches a static shape; an example larger than
  `size` is an error rather than being cropped silently.
  """
  out_h, out_w = _int_pair(size, "pad", "size")
  _check_int(ignore_index, "pad", "ignore_index")

  def fn(example, rng):
    del rng
    h, w = _spatial_size(example)
    if h > out_h or w > out_w:
      raise ValueError(
          f"pad: the example is {h}x{w} (HxW), larger than the pad size "
          f"{out_h}x{out_w}; resize it first or raise pad's `size`.")
    return _pad(example, out_h, out_w, ignore_index)
  return fn


@PREPROCESS_OPS.register("random_flip")
def random_flip(prob: float = 0.5) -> Op:
  """mmseg `RandomFlip` (horizontal): flips all spatial keys and boxes with `prob`."""
  _check(_is_number(prob) and 0 <= prob <= 1, "random_flip", "prob",
         "a number in [0, 1]", prob)

  def fn(example, rng):
    return _hflip(example) if rng.random() < prob else example
  return fn


@PREPROCESS_OPS.register("photometric_distortion")
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


@PREPROCESS_OPS.register("normalize")
def normalize(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)) -> Op:
  """image -> float32 (image - mean) / std per RGB channel (ImageNet defaults)."""
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


@PREPROCESS_OPS.register("check_labels")
def check_labels(num_classes: int, ignore_index: int = 255) -> Op:
  """Fails loudly on `label` values outside [0, num_classes) + {ignore_index}.

  Out-of-range ids would otherwise index past the logits in the loss or
  silently count as wrong in metrics.
  """
  _check_int(num_classes, "check_labels", "num_classes", low=1)
  _check_int(ignore_index, "check_labels", "ignore_index")

  def fn(example, rng):
    del rng
    values = np.unique(_require(example, "label", "check_labels"))
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
    if bad.size:
      shown = ", ".join(str(v) for v in bad[:10].tolist()) + (", ..." if bad.size > 10 else "")
      raise ValueError(
          f"label map contains values [{shown}] that are neither a class id in "
          f"[0, {num_classes}) nor the ignore index {ignore_index}; remap the "
          "labels, set data.reduce_zero_label, or fix data.num_classes.")
    return example
  return fn


@PREPROCESS_OPS.register("reduce_zero_label")
def reduce_zero_label(ignore_index: int = 255) -> Op:
  """mmseg `reduce_zero_label` (ADE20K): 0 -> ignore, k -> k - 1, ignore stays.

  For datasets whose id 0 means "other"/unlabelled rather than a class.
  """
  _check_int(ignore_index, "reduce_zero_label", "ignore_index")

  def fn(example, rng):
    del rng
    label = _require(example, "label", "reduce_zero_label")
    ignored = (label == 0) | (label == ignore_index)
    return {**example, "label": np.where(ignored, ignore_index, label - 1).astype(label.dtype)}
  return fn


@PREPROCESS_OPS.register("check_image")
def check_image() -> Op:
  """Fails loudly unless `image` is (H, W, 3) uint8, what the other ops expect."""
  def fn(example, rng):
    del rng
    image = _require(example, "image", "check_image")
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise ValueError(
          f"image has shape {image.shape} and dtype {image.dtype}, but "
          "preprocessing expects an (H, W, 3) uint8 RGB array; decode images "
          "as 3-channel uint8 (convert grayscale or RGBA to RGB) first.")
    return example
  return fn


@PREPROCESS_OPS.register("keep")
def keep(keys) -> Op:
  """Keeps only `keys`, e.g. to drop strings and ids before batching."""
  _check(isinstance(keys, (tuple, list)) and all(isinstance(k, str) for k in keys),
         "keep", "keys", "a tuple of key names", keys)
  keys = tuple(keys)

  def fn(example, rng):
    del rng
    missing = [k for k in keys if k not in example]
    if missing:
      raise KeyError(f"keep: the example has no key(s) {missing}; it has {sorted(example)}.")
    return {k: example[k] for k in keys}
  return fn


# Parsing.


class Pipeline:
  """Ops applied in order; pickles as its spec so grain can ship it to workers."""

  def __init__(self, spec: str, ops: List[Op]):
    self.spec = spec
    self._ops = ops

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    for op in self._ops:
      example = op(example, rng)
    return example

  def __reduce__(self):
    return parse_pipeline, (self.spec,)

  def __repr__(self) -> str:
    return f"Pipeline({self.spec!r})"


def _split_ops(node: ast.AST) -> List[ast.AST]:
  """Flattens the left-nested `a | b | c` expression into [a, b, c]."""
  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
    return _split_ops(node.left) + _split_ops(node.right)
  return [node]


def _build_op(node: ast.AST, spec: str) -> Op:
  text = ast.get_source_segment(spec, node)
  if isinstance(node, ast.Name):
    name, keywords = node.id, []
  elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
    name, keywords = node.func.id, node.keywords
    if node.args or any(kw.arg is None for kw in keywords):
      raise ValueError(f"preprocessing op {name!r}: arguments must be given by keyword, "
                       f"e.g. {name}(size=(512, 512)); got {text!r}.")
  else:
    raise ValueError(f"cannot read {text!r} in preprocessing spec {spec!r}: expected "
                     "`name` or `name(key=value, ...)` between '|'.")
  factory = PREPROCESS_OPS.get(name)
  kwargs = {}
  for kw in keywords:
    try:
      kwargs[kw.arg] = ast.literal_eval(kw.value)
    except (ValueError, TypeError, SyntaxError, RecursionError):
      raise ValueError(
          f"preprocessing op {name!r}: argument `{kw.arg}` must be a Python literal, "
          f"got {ast.get_source_segment(spec, kw.value)!r}.") from None
  signature = inspect.signature(factory)
  known = ", ".join(signature.parameters) or "none"
  unknown = [k for k in kwargs if k not in signature.parameters]
  if unknown:
    raise ValueError(f"preprocessing op {name!r} got unknown argument(s) {unknown}; "
                     f"its arguments are: {known}.")
  try:
    signature.bind(**kwargs)
  except TypeError as e:
    raise ValueError(f"preprocessing op {name!r}: {e}; its arguments are: {known}.") from None
  return factory(**kwargs)


def parse_pipeline(spec: str) -> Pipeline:
  """Builds `fn(example, rng) -> example` from "op1|op2(key=literal, ...)|...".

  The spec is read with `ast` (only literals are evaluated, never code); an
  empty spec gives the identity. Unknown ops raise KeyError listing known ops;
  bad arguments raise ValueError naming the op and the argument.
  """
  if not spec.strip():
    return Pipeline(spec, [])
  try:
    tree = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"cannot parse preprocessing spec {spec!r}: {e.msg}.") from None
  return Pipeline(spec, [_build_op(node, spec.strip()) for node in _split_ops(tree)])
