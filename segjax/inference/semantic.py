"""Whole-image, sliding-window and test-time-augmented semantic inference on
single images of any size, with mmsegmentation's semantics.

`SemanticPredictor` takes one uint8 RGB image, does the host-side work in
numpy (the test Resize, flips, cutting windows) and the rest in jit-compiled
functions of static shapes, each compiled once per shape and kept:

* whole: the image is padded bottom/right (with zeros after normalization, as
  the `pad` preprocessing op does) to a multiple of `size_multiple`, so images
  of similar sizes share one compiled model; the logits of the valid region
  are used.
* slide (mmseg `slide_inference`): windows of `window` at `stride`, the last
  row and column shifted to end at the border; an image smaller than the
  window is padded up to it, again with zeros after normalization. The
  windows run in fixed batches of `window_batch` (the last one padded), so
  one compiled model serves every image; their logits are summed into a
  canvas and divided by the number of windows covering each pixel.
* test-time augmentation (mmseg `MultiScaleFlipAug` + `aug_test`): for each
  ratio r in `scales`, the image is resized keeping its ratio to
  (int(w * r), int(h * r)) of the target `scale` (w, h) (of the image itself
  without one) with OpenCV's bilinear resize, as the data pipeline does; with
  `flip` also mirrored horizontally. Each pass's logits are resized bilinearly
  (align_corners=False) to the original size, turned into softmax
  probabilities (mirrored back) and averaged.

The resize to the original size takes the sizes as traced values, so it is
compiled once per pair of padded shapes rather than per image size (and
skipped when the two sizes are equal). With a single pass (no test-time
augmentation, no CRF) the labels are the argmax of those resized logits, as
mmseg's `postprocess_result` takes it; with several passes, of the summed
softmax probabilities, as mmseg's `SegTTAModel` does.

`exact_shapes=True` computes what mmseg computes, to the rounding of float32
arithmetic: the model runs on exactly the resized image (whole) and, in slide
mode, an image smaller than the window in a dimension is cut into windows of
its own size there instead of being padded (mmseg's "the small patch will be
used to decode without padding"). Padding changes the logits near the padded
border and every global pooling (PSPNet's pyramid, ASPP's image pooling), so
padded predictions differ slightly from mmseg's; the price of exactness is one
compilation per distinct resized shape (or window shape) instead of per
`size_multiple` bucket. tests/test_mmseg_parity.py checks this mode against
mmseg's `inference_model`.

Models whose logits cover only the centre of their input
(`output_is_center_crop`, e.g. `unet_valid`) run in slide mode as the U-Net
paper's overlap-tile strategy: `window` is the model's input, the centre it
predicts is the tile, tiles are laid out over the image with mmseg's rule
(`stride` at most the tile size), and the image is mirrored (reflect-101, like
the `mirror_pad` op) by the border the model loses, so every pixel, border
pixels included, is predicted from mirrored context instead of padding.
"""
import functools
from typing import Any, Mapping, Optional, Sequence, Tuple

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax.data import device
from segjax.data.transforms import keep_ratio_size
from segjax.inference.original_size import bilinear_source_index

MODES = ("whole", "slide")


def resized_size(height: int, width: int, scale: Optional[Sequence[int]] = None,
                 ratio: float = 1.0) -> Tuple[int, int]:
  """The (h, w) mmseg's test pipeline resizes an image to: keep-ratio Resize to
  (int(scale_w * ratio), int(scale_h * ratio)), `scale` being (w, h) or, when
  None, the image's own (width, height)."""
  base_w, base_h = (width, height) if scale is None else scale
  target = (int(base_w * ratio), int(base_h * ratio))
  if min(target) < 1:
    raise ValueError(f"Test-time scale {tuple(scale or (width, height))} x ratio {ratio} "
                     f"gives an empty target {target} for a {height}x{width} image; use "
                     "larger ratios.")
  size = keep_ratio_size(height, width, target)
  if min(size) < 1:
    raise ValueError(f"A {height}x{width} image resized to fit {target} would be empty "
                     f"({size[0]}x{size[1]}); use a larger scale or ratio.")
  return size


def _window_origins(height: int, width: int, window: Tuple[int, int],
                    stride: Tuple[int, int]) -> np.ndarray:
  """(N, 2) top-left (y, x) of mmseg's sliding windows, row by row: a grid at
  `stride` whose last row and column end at the border (at 0 when the image is
  smaller than the window)."""
  def starts(size, crop, step):
    count = max(size - crop + step - 1, 0) // step + 1
    return [min(i * step, max(size - crop, 0)) for i in range(count)]
  return np.array([(y, x) for y in starts(height, window[0], stride[0])
                   for x in starts(width, window[1], stride[1])], np.int32).reshape(-1, 2)


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _pair(value, name: str, low: int) -> Tuple[int, int]:
  """A pair of ints >= low, or a clear error."""
  if (not isinstance(value, (tuple, list)) or len(value) != 2 or
      not all(isinstance(v, (int, np.integer)) and v >= low for v in value)):
    raise ValueError(f"SemanticPredictor: `{name}` must be a pair of integers >= {low} "
                     f"(height, width), got {value!r}.")
  return int(value[0]), int(value[1])


def _accumulate(canvas, count, logits, origins, num_valid):
  """Adds the first `num_valid` window logits (B, h, w, C) at `origins` (B, 2)
  to the canvas (H, W, C) and 1 to the count (H, W, 1) under each, in order."""
  num_classes = logits.shape[-1]
  size = logits.shape[1:3]

  def add(i, carry):
    canvas, count = carry
    y, x = origins[i, 0], origins[i, 1]
    keep = i < num_valid
    patch = jax.lax.dynamic_slice(canvas, (y, x, 0), size + (num_classes,))
    canvas = jax.lax.dynamic_update_slice(
        canvas, jnp.where(keep, patch + logits[i], patch), (y, x, 0))
    hits = jax.lax.dynamic_slice(count, (y, x, 0), size + (1,))
    count = jax.lax.dynamic_update_slice(count, hits + keep.astype(count.dtype), (y, x, 0))
    return canvas, count
  return jax.lax.fori_loop(0, logits.shape[0], add, (canvas, count))


def _average(canvas, count):
  """Summed window logits / the windows covering each pixel (0 where none)."""
  return jnp.where(count > 0, canvas / jnp.maximum(count, 1), 0.0)


def _add_probabilities(total, logits, in_size, out_size, *, resize: bool, flip: bool,
                       softmax: bool = True):
  """total (H', W', C) + softmax of the top-left `in_size` of `logits`, resized
  bilinearly (PyTorch's align_corners=False) to `out_size` if `resize` (else
  the two are equal) and, if `flip`, mirrored back; only the top-left
  `out_size` of the result is meaningful. Without `softmax`, the resized
  logits themselves are added (one pass, labelled by their argmax)."""
  out_h, out_w = total.shape[:2]
  if resize:
    row_lo, row_hi, row_w = bilinear_source_index(out_h, in_size[0], out_size[0])
    col_lo, col_hi, col_w = bilinear_source_index(out_w, in_size[1], out_size[1])
    weight = row_w[:, None, None]
    logits = logits[row_lo] * (1 - weight) + logits[row_hi] * weight
    weight = col_w[None, :, None]
    logits = (jnp.take(logits, col_lo, axis=1) * (1 - weight) +
              jnp.take(logits, col_hi, axis=1) * weight)
  else:
    logits = logits[:out_h, :out_w]
  probabilities = jax.nn.softmax(logits, axis=-1) if softmax else logits
  if flip:
    cols = jnp.arange(out_w)
    probabilities = jnp.take(
        probabilities, jnp.where(cols < out_size[1], out_size[1] - 1 - cols, cols), axis=1)
  return total + probabilities


def _argmax(total):
  return jnp.argmax(total, axis=-1).astype(jnp.int32)


def refine_with_crf(probabilities, image: np.ndarray, options: Mapping[str, Any]):
  """(H, W, C) probabilities refined by `segjax.classical.crf.dense_crf(**options)` on the
  (H, W, 3) uint8 image, with -log p as the unary (DeepLab's post-processing)."""
  from segjax.classical.crf import dense_crf
  unary = jnp.log(jnp.maximum(probabilities, 1e-8))[None]
  return dense_crf(unary, image[None], **options)[0]


class SemanticPredictor:
  """Per-class probabilities and labels of one image at its original size.

  Args:
    model: a segjax semantic model (or any flax module called as
      `model.apply(variables, images, train=False)` returning (B, h, w, C)
      logits at the input size, or at its centre with `output_is_center_crop`).
    variables: its variables ({"params": ..., "batch_stats": ...}).
    num_classes: C, checked against the model's logits.
    mean, std: per-RGB-channel normalization, done on the device exactly as the
      `normalize` op does it on the host (`segjax.data.device.normalize`).
    mode: "whole" or "slide" (see the module docstring).
    scale: mmseg's test Resize target (w, h) with keep_ratio, e.g. (2048, 512);
      None keeps the image's size.
    window, stride: slide mode's window (the model input) and stride (h, w).
    window_batch: windows per model call in slide mode.
    scales: test-time ratios multiplying `scale`, e.g. (0.5, 0.75, ..., 1.75).
    flip: also average over horizontally mirrored passes.
    size_multiple: whole mode pads the (resized) image bottom/right to a
      multiple of this, and the canvases are padded alike, to bound the
      number of compiled shapes.
    exact_shapes: no padding at all, as mmseg (see the module docstring):
      whole mode runs on the resized image itself (`size_multiple` is then
      1), slide mode clips windows to images smaller than them.
    crf: keyword arguments of `segjax.classical.crf.dense_crf` to refine the
      averaged probabilities with a dense CRF on the image (`refine_with_crf`),
      or None for none.
  """

  def __init__(self, model: nn.Module, variables: Any, num_classes: int, *,
               mean: Sequence[float], std: Sequence[float], mode: str = "whole",
               scale: Optional[Sequence[int]] = None, window: Sequence[int] = (512, 512),
               stride: Sequence[int] = (341, 341), window_batch: int = 4,
               scales: Sequence[float] = (1.0,), flip: bool = False, size_multiple: int = 32,
               crf: Optional[Mapping[str, Any]] = None, exact_shapes: bool = False):
    if mode not in MODES:
      raise ValueError(f"SemanticPredictor: `mode` must be one of {MODES}, got {mode!r}.")
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
      raise ValueError(f"SemanticPredictor: `num_classes` must be a positive integer, got "
                       f"{num_classes!r}.")
    for name, values in (("mean", mean), ("std", std)):
      if len(values) != 3 or (name == "std" and min(values) <= 0):
        raise ValueError(f"SemanticPredictor: `{name}` must be 3 per-RGB-channel numbers"
                         f"{' > 0' if name == 'std' else ''}, got {values!r}.")
    if scale is not None:
      scale = _pair(scale, "scale", 1)
    if not scales or any(not isinstance(r, (int, float, np.number)) or r <= 0 for r in scales):
      raise ValueError(f"SemanticPredictor: `scales` must be positive ratios, got {scales!r}.")
    if not isinstance(window_batch, (int, np.integer)) or window_batch < 1:
      raise ValueError(f"SemanticPredictor: `window_batch` must be a positive integer, got "
                       f"{window_batch!r}.")
    if not isinstance(size_multiple, (int, np.integer)) or size_multiple < 1:
      raise ValueError(f"SemanticPredictor: `size_multiple` must be a positive integer, got "
                       f"{size_multiple!r}.")
    self.model = model
    self.num_classes = int(num_classes)
    self.mode = mode
    self.scale = scale
    self.scales = tuple(float(r) for r in scales)
    self.flip = bool(flip)
    self.exact_shapes = bool(exact_shapes)
    self.size_multiple = 1 if self.exact_shapes else int(size_multiple)
    self.window = _pair(window, "window", 1)
    self.stride = _pair(stride, "stride", 1)
    self.window_batch = int(window_batch)
    self._mean, self._std = tuple(mean), tuple(std)
    self._variables = jax.device_put(variables)
    self._cache = {}
    self.crf = dict(crf) if crf is not None else None
    self._center_crop = bool(getattr(model, "output_is_center_crop", False))
    if self._center_crop and mode == "whole":
      raise ValueError(
          f"{type(model).__name__} predicts only the centre of its input, which whole-image "
          "inference cannot cover; use mode='slide' (overlap-tile) with a `window` the model "
          "accepts as input.")
    if self._center_crop and self.exact_shapes:
      raise ValueError(f"{type(model).__name__} predicts only the centre of its input, whose "
                       "windows must be padded with mirrored context; use exact_shapes=False.")
    # The tile each window predicts, and its offset inside the window.
    self._tile, self._border = self.window, (0, 0)
    if mode == "slide" and self._center_crop:
      shape = jax.ShapeDtypeStruct((1,) + self.window + (3,), jnp.float32)
      out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, shape)
      self._tile = tuple(int(s) for s in out.shape[1:3])
      self._border = tuple((w - t) // 2 for w, t in zip(self.window, self._tile))
    if mode == "slide" and any(s > t for s, t in zip(self.stride, self._tile)):
      raise ValueError(f"SemanticPredictor: stride {self.stride} is larger than the "
                       f"{self._tile} region each window predicts, which would leave pixels "
                       "unpredicted; use a stride at most that size.")

  @property
  def compiled(self) -> Tuple[tuple, ...]:
    """Keys (function name and shapes) of the functions compiled so far."""
    return tuple(self._cache)

  @property
  def passes(self) -> int:
    """Test-time passes per image: scales times (1 or 2 with flips)."""
    return len(self.scales) * (2 if self.flip else 1)

  def probabilities(self, image: np.ndarray) -> np.ndarray:
    """(H, W, C) float32 class probabilities of an (H, W, 3) uint8 RGB image,
    averaged over the test-time passes (and refined by the CRF, if any)."""
    total, passes = self._total(image, softmax=True)
    height, width = image.shape[:2]
    probabilities = total[:height, :width] / np.float32(passes)
    if self.crf is not None:
      probabilities = refine_with_crf(probabilities, image, self.crf)
    return np.asarray(probabilities)

  def predict(self, image: np.ndarray) -> np.ndarray:
    """(H, W) int32 labels of an (H, W, 3) uint8 RGB image."""
    if self.crf is not None:
      return np.argmax(self.probabilities(image), axis=-1).astype(np.int32)
    total, _ = self._total(image, softmax=self.passes > 1)
    labels = self._run(("argmax",) + total.shape[:2], _argmax, (total,))
    height, width = image.shape[:2]
    return np.ascontiguousarray(np.asarray(labels)[:height, :width])

  def _run(self, key: tuple, fn, args: tuple, donate: Tuple[int, ...] = ()):
    """fn(*args), jit-compiled once per `key` (which must determine the shapes)."""
    if key not in self._cache:
      self._cache[key] = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    return self._cache[key](*args)

  def _total(self, image: np.ndarray, softmax: bool):
    """Summed probabilities (or, without `softmax`, logits) over the passes,
    padded to `size_multiple`, and the number of passes."""
    if (not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or
        image.shape[2] != 3 or min(image.shape[:2]) < 1):
      raise ValueError("SemanticPredictor expects one RGB image as a uint8 numpy array "
                       "shaped (height, width, 3), got "
                       f"{getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}.")
    height, width = image.shape[:2]
    out_shape = (_round_up(height, self.size_multiple), _round_up(width, self.size_multiple))
    total = jnp.zeros(out_shape + (self.num_classes,), jnp.float32)
    out_size = np.array([height, width], np.int32)
    passes = 0
    for ratio in self.scales:
      size = resized_size(height, width, self.scale, ratio)
      resized = (image if size == (height, width) else
                 cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR))
      for flip in (False, True) if self.flip else (False,):
        view = np.ascontiguousarray(resized[:, ::-1]) if flip else resized
        logits = self._whole(view) if self.mode == "whole" else self._slide(view)
        resize = size != (height, width)
        key = ("add_probabilities", resize, flip, softmax) + logits.shape[:2] + out_shape
        total = self._run(key, functools.partial(_add_probabilities, resize=resize, flip=flip,
                                                 softmax=softmax),
                          (total, logits, np.array(size, np.int32), out_size), donate=(0,))
        passes += 1
    return total, passes

  def _forward(self, variables, images, valid, tile=None):
    """Logits of uint8 images (B, h, w, 3), normalized and zeroed beyond the
    first `valid` (2,) rows and columns; `tile` is the logits' expected (h, w)
    (default: the input's, or in slide mode the tile)."""
    extent = jnp.broadcast_to(valid, (images.shape[0], 2))
    x = device.normalize(images, self._mean, self._std, extent)
    logits = self.model.apply(variables, x, train=False)
    if tile is None:
      tile = self._tile if self.mode == "slide" else images.shape[1:3]
    expected = (images.shape[0],) + tuple(tile) + (self.num_classes,)
    if tuple(logits.shape) != expected:
      raise ValueError(f"{type(self.model).__name__} gave logits of shape {logits.shape} for "
                       f"inputs {images.shape}; SemanticPredictor expects {expected} (logits "
                       "at the input size, num_classes channels).")
    return logits.astype(jnp.float32)

  def _whole(self, image: np.ndarray):
    """Padded (h', w', C) logits of the whole image, valid at the top left."""
    height, width = image.shape[:2]
    padded = np.zeros((_round_up(height, self.size_multiple),
                       _round_up(width, self.size_multiple), 3), np.uint8)
    padded[:height, :width] = image
    logits = self._run(("whole",) + padded.shape[:2], self._forward,
                       (self._variables, padded[None], np.array([height, width], np.int32)))
    return logits[0]

  def _slide(self, image: np.ndarray):
    """Padded (h', w', C) window-averaged logits, valid at the top left."""
    height, width = image.shape[:2]
    if self.exact_shapes:
      return self._slide_exact(image)
    size = (max(height, self._tile[0]), max(width, self._tile[1]))
    if self._center_crop:  # overlap-tile: mirrored context around every tile
      extra = [w - t - b for w, t, b in zip(self.window, self._tile, self._border)]
      source = np.pad(image, ((self._border[0], extra[0] + size[0] - height),
                              (self._border[1], extra[1] + size[1] - width), (0, 0)),
                      mode="reflect")
      valid = np.array(self.window, np.int32)
    else:
      source = np.zeros(size + (3,), np.uint8)
      source[:height, :width] = image
      valid = np.array([min(height, self.window[0]), min(width, self.window[1])], np.int32)
    canvas_shape = tuple(_round_up(s, self.size_multiple) for s in size)
    canvas = jnp.zeros(canvas_shape + (self.num_classes,), jnp.float32)
    count = jnp.zeros(canvas_shape + (1,), jnp.float32)
    origins = _window_origins(*size, self._tile, self.stride)
    for start in range(0, len(origins), self.window_batch):
      batch = np.zeros((self.window_batch,) + self.window + (3,), np.uint8)
      part = np.zeros((self.window_batch, 2), np.int32)
      chunk = origins[start:start + self.window_batch]
      part[:len(chunk)] = chunk
      for i, (y, x) in enumerate(chunk):
        batch[i] = source[y:y + self.window[0], x:x + self.window[1]]
      logits = self._run(("windows",), self._forward, (self._variables, batch, valid))
      canvas, count = self._run(("accumulate",) + canvas_shape, _accumulate,
                                (canvas, count, logits, part, np.int32(len(chunk))),
                                donate=(0, 1))
    return self._run(("average",) + canvas_shape, _average, (canvas, count))

  def _slide_exact(self, image: np.ndarray):
    """mmseg's `slide_inference` exactly: windows clipped to the image where it is
    smaller than them, nothing padded; (H, W, C) window-averaged logits."""
    height, width = image.shape[:2]
    window = (min(height, self.window[0]), min(width, self.window[1]))
    canvas = jnp.zeros((height, width, self.num_classes), jnp.float32)
    count = jnp.zeros((height, width, 1), jnp.float32)
    origins = _window_origins(height, width, window, self.stride)
    valid = np.array(window, np.int32)
    forward = functools.partial(self._forward, tile=window)
    for start in range(0, len(origins), self.window_batch):
      batch = np.zeros((self.window_batch,) + window + (3,), np.uint8)
      part = np.zeros((self.window_batch, 2), np.int32)
      chunk = origins[start:start + self.window_batch]
      part[:len(chunk)] = chunk
      for i, (y, x) in enumerate(chunk):
        batch[i] = image[y:y + window[0], x:x + window[1]]
      logits = self._run(("windows",) + window, forward, (self._variables, batch, valid))
      canvas, count = self._run(("accumulate", height, width) + window, _accumulate,
                                (canvas, count, logits, part, np.int32(len(chunk))),
                                donate=(0, 1))
    return self._run(("average", height, width), _average, (canvas, count))
