"""Label ops: checks and conversions of `label` / `image`, per-pixel loss
weights, and `keep` to select the keys that are batched."""
import numpy as np

from segjax.data.transforms.common import Op, _check, _check_int, _is_number, _require, register_op
from segjax.data.unet_weights import unet_weight_map


@register_op("squeeze_labels")
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


@register_op("check_labels")
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
      name = example.get("file_name", "")
      name = name.decode() if isinstance(name, bytes) else str(name)
      raise ValueError(
          f"the label map{f' of {name}' if name else ''} contains values [{shown}] that are "
          f"neither a class id in [0, {num_classes}) nor the ignore index {ignore_index}; if "
          "its labels count from 1 with 0 for 'other' (as ADE20K's do), start data.train_ops, "
          "data.eval_ops and inference.label_ops with the reduce_zero_label op (as "
          "configs/pspnet_ade20k.py does), else remap the labels to the dataset's classes.")
    return example
  return fn


@register_op("reduce_zero_label")
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


@register_op("check_image")
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


@register_op("unet_weights")
def unet_weights(w0: float = 10.0, sigma: float = 5.0, ignore_index: int = 255) -> Op:
  """U-Net's per-pixel loss weights from `instance_ids` (and `label` for the class
  balance), stored as `pixel_weights` (H, W) float32 for the losses that take
  them (see `segjax.data.unet_weights`). Put it after the geometric ops
  (weights are not moved by them) and before `normalize`."""
  _check(_is_number(w0) and w0 >= 0, "unet_weights", "w0", "a number >= 0", w0)
  _check(_is_number(sigma) and sigma > 0, "unet_weights", "sigma", "a number > 0", sigma)

  def fn(example, rng):
    del rng
    instance_ids = _require(example, "instance_ids", "unet_weights")
    out = dict(example)
    out["pixel_weights"] = unet_weight_map(instance_ids, example.get("label"), w0=w0,
                                           sigma=sigma, ignore_index=ignore_index)
    return out
  return fn


@register_op("keep")
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
