"""Box and mask RoI heads of Faster / Mask R-CNN, torchvision's semantics, NHWC.

`BoxHead` is torchvision's `TwoMLPHead` followed by `FastRCNNPredictor`; `MaskHead` is
`MaskRCNNHeads` followed by `MaskRCNNPredictor`. Both take RoIAligned features with any leading
dims (e.g. [B, R, P, P, C]). Class index 0 is the background, as in torchvision.

`postprocess_detections` is `RoIHeads.postprocess_detections` for one image with static shapes:
torchvision's variable-length selections become validity masks and the output is a fixed number
of detection slots padded with invalid rows. Use `jax.vmap` for batches.

`torch_roi_heads_to_flax` converts the RoI heads of a torchvision detector state dict.
"""
import math
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax.layers import Conv, Deconv2x2
from segjax.ops import batched_nms, clip_boxes, decode_boxes
from segjax.ops.boxes import DEFAULT_WEIGHTS

# nn.Linear's default weight init, kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)).
_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# kaiming_normal_(mode="fan_out", nonlinearity="relu"): an untruncated normal, std
# sqrt(2 / fan_out) with torch's fan_out = out_channels * kh * kw.
_conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# The same for ConvTranspose2d, whose torch weight is (in, out, kh, kw), so torch's "fan_out"
# is in_channels * kh * kw: the fan-in axis of flax's (kh, kw, in, out) kernel.
_deconv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _linear_bias_init(fan_in: int):
  """nn.Linear's default bias init, U(+-1/sqrt(fan_in)); fan_in is not in the bias shape."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _check_num_classes(num_classes):
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int (foreground classes, background "
                     f"excluded), got {num_classes!r}.")


class BoxHead(nn.Module):
  """Two fully connected layers then class logits and class-specific box deltas.

  Attributes:
    num_classes: K foreground classes; outputs have K + 1 entries, index 0 the background.
    representation_size: width of fc6 and fc7 (torchvision: 1024).

  Called on pooled features [..., P, P, C], flattened in (P, P, C) order, returns
  (class_logits [..., K + 1], box_deltas [..., K + 1, 4]) with deltas encoded with the R-CNN
  box coder weights (10, 10, 5, 5).
  """
  num_classes: int
  representation_size: int = 1024
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pooled) -> Tuple[Any, Any]:
    _check_num_classes(self.num_classes)
    if pooled.ndim < 3:
      raise ValueError(f"BoxHead needs pooled features [..., P, P, C], got shape "
                       f"{pooled.shape}.")
    lead = pooled.shape[:-3]
    x = pooled.reshape(lead + (math.prod(pooled.shape[-3:]),))
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for name in ("fc6", "fc7"):
      x = nn.Dense(self.representation_size, kernel_init=_linear_kernel_init,
                   bias_init=_linear_bias_init(x.shape[-1]), name=name, **kw)(x)
      x = nn.relu(x)
    n = self.num_classes + 1
    logits = nn.Dense(n, kernel_init=nn.initializers.normal(0.01),
                      bias_init=nn.initializers.zeros, name="cls_score", **kw)(x)
    deltas = nn.Dense(4 * n, kernel_init=nn.initializers.normal(0.001),
                      bias_init=nn.initializers.zeros, name="bbox_pred", **kw)(x)
    return logits, deltas.reshape(lead + (n, 4))  # class-major, as torchvision


class MaskHead(nn.Module):
  """Mask R-CNN mask branch: 3x3 convs, a 2x upsampling deconv, per-class mask logits.

  Attributes:
    num_classes: K foreground classes; the output has K + 1 channels, channel = label.
    channels: width of every conv and of the deconv (torchvision: 256).
    num_convs: number of 3x3 conv + ReLU layers (torchvision: 4).
    dilation: dilation (and padding) of the 3x3 convs (torchvision: 1).

  Called on pooled features [..., H, W, C] (torchvision: 14 x 14), returns mask logits
  [..., 2H, 2W, K + 1].
  """
  num_classes: int
  channels: int = 256
  num_convs: int = 4
  dilation: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pooled):
    _check_num_classes(self.num_classes)
    if pooled.ndim < 4:
      raise ValueError(f"MaskHead needs pooled features [..., H, W, C] with at least one "
                       f"leading dim, got shape {pooled.shape}.")
    lead, (h, w, c) = pooled.shape[:-3], pooled.shape[-3:]
    x = pooled.reshape((math.prod(lead), h, w, c))
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, bias_init=nn.initializers.zeros)
    d = self.dilation
    for i in range(self.num_convs):
      x = Conv(self.channels, (3, 3), padding=((d, d), (d, d)), kernel_dilation=(d, d),
                  kernel_init=_conv_kernel_init, name=f"mask_fcn_{i}", **kw)(x)
      x = nn.relu(x)
    x = Deconv2x2(self.channels, kernel_init=_deconv_kernel_init, name="conv5_mask", **kw)(x)
    x = nn.relu(x)
    x = Conv(self.num_classes + 1, (1, 1), kernel_init=_conv_kernel_init,
                name="mask_fcn_logits", **kw)(x)
    return x.reshape(lead + x.shape[1:])


def postprocess_detections(class_logits, box_deltas, proposals, proposal_valid, image_size, *,
                           score_thresh: float = 0.05, nms_thresh: float = 0.5,
                           detections_per_img: int = 100, min_size: float = 1e-2,
                           pre_nms_top_k: Optional[int] = 1000,
                           weights: Sequence[float] = DEFAULT_WEIGHTS) -> Tuple[Any, ...]:
  """Final detections of one image, torchvision's `RoIHeads.postprocess_detections`.

  Scores are the softmax of the logits; each proposal's deltas of every class are decoded on it
  (dw, dh clamped at log(1000/16)) and clipped to the image; the background is dropped and every
  (proposal, class) pair becomes a candidate, kept when its score is > `score_thresh`, both box
  sides are >= `min_size` and its proposal is valid; class-aware NMS at `nms_thresh` then keeps
  the `detections_per_img` best survivors.

  Static shapes: the R * K candidates are first cut to the `pre_nms_top_k` highest-scoring
  valid ones, so that NMS runs on a bounded set. Greedy NMS visits candidates by descending
  score, and whether a candidate survives depends only on the candidates scoring higher, so NMS
  on the top k gives exactly the survivors of the full NMS that lie in the top k. If at least
  `detections_per_img` of them survive, they are the full NMS's best `detections_per_img`
  (every survivor outside the top k scores lower), so the result is exact. Otherwise the result
  is a correct but shorter prefix of torchvision's: survivors beyond the top k are missed.
  `pre_nms_top_k=None` keeps all candidates (always exact, costlier).

  Args:
    class_logits: [R, K + 1] logits (a `BoxHead` output for one image), 0 = background.
    box_deltas: [R, K + 1, 4] class-specific box deltas.
    proposals: [R, 4] boxes (x1, y1, x2, y2) the deltas are relative to.
    proposal_valid: [R] bool; invalid (padding) proposals never produce detections.
    image_size: (height, width) to clip to; may be traced (e.g. vmapped per image).
    score_thresh, nms_thresh, detections_per_img: torchvision's `box_score_thresh`,
      `box_nms_thresh`, `box_detections_per_img`; detections_per_img is a static shape.
    min_size: smallest box side kept (torchvision hard-codes 1e-2).
    pre_nms_top_k: static number of candidates NMS runs on, or None for all R * K.
    weights: box coder weights (wx, wy, ww, wh).

  Returns:
    (boxes [D, 4], scores [D], classes [D] int32 foreground class in [0, K), valid [D] bool)
    for D = detections_per_img; valid rows come first by descending score, padding rows are
    zero (class 0). torchvision's label is `classes + 1`.
  """
  class_logits, box_deltas = jnp.asarray(class_logits), jnp.asarray(box_deltas)
  proposals, proposal_valid = jnp.asarray(proposals), jnp.asarray(proposal_valid)
  if class_logits.ndim != 2 or class_logits.shape[1] < 2:
    raise ValueError(f"class_logits must be [R, K + 1] with K >= 1 for one image, got shape "
                     f"{class_logits.shape}; use jax.vmap for batches.")
  r, n = class_logits.shape
  if (box_deltas.shape != (r, n, 4) or proposals.shape != (r, 4)
      or proposal_valid.shape != (r,)):
    raise ValueError(f"With class_logits {class_logits.shape}, box_deltas must be {(r, n, 4)}, "
                     f"proposals {(r, 4)} and proposal_valid {(r,)}; got {box_deltas.shape}, "
                     f"{proposals.shape} and {proposal_valid.shape}.")
  if not isinstance(detections_per_img, int) or detections_per_img < 1:
    raise ValueError(f"detections_per_img must be a positive Python int (a static shape), got "
                     f"{detections_per_img!r}.")
  if pre_nms_top_k is not None and (not isinstance(pre_nms_top_k, int) or pre_nms_top_k < 1):
    raise ValueError(f"pre_nms_top_k must be a positive Python int (a static shape) or None, got "
                     f"{pre_nms_top_k!r}.")
  k = n - 1
  scores = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, 1:].reshape(-1)
  reference = jnp.broadcast_to(proposals.astype(jnp.float32)[:, None], (r, k, 4))
  boxes = decode_boxes(box_deltas.astype(jnp.float32)[:, 1:], reference, weights=weights)
  boxes = clip_boxes(boxes, image_size[0], image_size[1]).reshape(-1, 4)
  classes = jnp.tile(jnp.arange(k, dtype=jnp.int32), r)  # candidate r * K + c, as torchvision
  valid = (jnp.repeat(proposal_valid.astype(bool), k) & (scores > score_thresh)
           & (boxes[:, 2] - boxes[:, 0] >= min_size) & (boxes[:, 3] - boxes[:, 1] >= min_size))
  if pre_nms_top_k is not None and pre_nms_top_k < r * k:
    _, idx = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), pre_nms_top_k)
    boxes, scores, classes, valid = boxes[idx], scores[idx], classes[idx], valid[idx]
  keep, _ = batched_nms(boxes, scores, classes, nms_thresh, detections_per_img, valid=valid)
  kept = keep >= 0
  safe = jnp.maximum(keep, 0)
  return (jnp.where(kept[:, None], boxes[safe], 0), jnp.where(kept, scores[safe], 0),
          jnp.where(kept, classes[safe], 0), kept)


_KEY = re.compile(r"(box_head\.(?P<fc>fc6|fc7)"
                  r"|box_predictor\.(?P<pred>cls_score|bbox_pred)"
                  r"|mask_head\.(?:(?P<conv>\d+)\.0|mask_fcn(?P<legacy>\d+))"
                  r"|mask_predictor\.(?P<mpred>conv5_mask|mask_fcn_logits))"
                  r"\.(?P<kind>weight|bias)")


def _group_keys(heads: Mapping[str, Any], prefix: str) -> Dict[Tuple[str, str], Dict[str, str]]:
  """Maps (head, flax module) -> {'weight': key, 'bias': key} of the state dict."""
  modules = {}
  for key in heads:
    m = _KEY.fullmatch(key)
    if not m or (m["legacy"] is not None and int(m["legacy"]) < 1):
      raise ValueError(
          f"Unknown RoI heads key {prefix}{key}; expected box_head.fc6/fc7, "
          "box_predictor.cls_score/bbox_pred, mask_head.<i>.0 (or legacy mask_head.mask_fcn<i>), "
          "mask_predictor.conv5_mask/mask_fcn_logits weights and biases (TwoMLPHead and "
          "MaskRCNNHeads without norm layers; other heads are not supported).")
    if m["fc"] or m["pred"]:
      module = ("box_head", m["fc"] or m["pred"])
    elif m["mpred"]:
      module = ("mask_head", m["mpred"])
    else:
      index = int(m["conv"]) if m["conv"] is not None else int(m["legacy"]) - 1
      module = ("mask_head", f"mask_fcn_{index}")
    entry = modules.setdefault(module, {})
    if m["kind"] in entry:
      raise ValueError(f"{prefix}{entry[m['kind']]} and {prefix}{key} are the same parameter "
                       "(current and legacy names); keep one of them.")
    entry[m["kind"]] = key
  return modules


def _weight_bias(heads, keys, prefix, name, weight_ndim):
  if set(keys) != {"weight", "bias"}:
    raise ValueError(f"RoI heads module {name} needs a weight and a bias, got {sorted(keys)}.")
  weight = np.asarray(heads[keys["weight"]], dtype=np.float32)
  bias = np.asarray(heads[keys["bias"]], dtype=np.float32)
  out_axis = 1 if name == "conv5_mask" else 0  # ConvTranspose2d weights are (in, out, kh, kw)
  if weight.ndim != weight_ndim or bias.shape != (weight.shape[out_axis],):
    raise ValueError(f"{prefix}{keys['weight']} / bias have shapes {weight.shape} / {bias.shape}; "
                     f"expected a {weight_ndim}-D weight and a matching bias.")
  return weight, bias


def _check_complete(head, modules, expected):
  if set(modules) != expected:
    raise ValueError(f"RoI {head} modules {sorted(modules)} are incomplete or not contiguous; "
                     f"expected {sorted(expected)}.")


def torch_roi_heads_to_flax(state_dict: Mapping[str, Any], prefix: str = "roi_heads.",
                            channels: int = 256) -> Dict[str, Any]:
  """Converts the RoI heads of a torchvision detector state dict into `BoxHead`/`MaskHead` vars.

  Maps `{prefix}box_head.fc6/fc7` and `{prefix}box_predictor.cls_score/bbox_pred` to the
  `BoxHead` modules of the same names, `{prefix}mask_head.{i}.0` (or the legacy
  `mask_head.mask_fcn{i+1}`) to `mask_fcn_{i}`, and `{prefix}mask_predictor.conv5_mask /
  mask_fcn_logits` to the `MaskHead` modules of the same names. Linear weights are transposed,
  conv weights OIHW -> HWIO, the ConvTranspose2d weight (in, out, kh, kw) -> (kh, kw, in, out)
  flipped spatially (flax's ConvTranspose correlates the dilated input with the kernel, torch
  scatters with it). torch flattens the pooled features as (C, P, P) before fc6, `BoxHead` as
  (P, P, C): the fc6 kernel rows are permuted with P = sqrt(fc6 inputs / channels). Keys
  outside `prefix` are ignored.

  Args:
    state_dict: name -> array (torch tensors are converted with np.asarray).
    prefix: the RoI heads' key prefix ('' for a bare RoIHeads state dict).
    channels: C, channels of the pooled box features (torchvision's FPN: 256).

  Returns:
    {'box_head': {'params': ...}} plus 'mask_head' when the state dict has mask keys; build the
    modules from `roi_heads_config` of it.
  """
  heads = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  if not heads:
    raise ValueError(f"No key starts with {prefix!r}; pass a torchvision detector state dict "
                     "(or the RoI heads' own with prefix='').")
  if not isinstance(channels, int) or channels < 1:
    raise ValueError(f"channels must be a positive int (the pooled feature channels), got "
                     f"{channels!r}.")
  modules = _group_keys(heads, prefix)
  box = {name: keys for (head, name), keys in modules.items() if head == "box_head"}
  mask = {name: keys for (head, name), keys in modules.items() if head == "mask_head"}
  _check_complete("box head", box, {"fc6", "fc7", "cls_score", "bbox_pred"})

  params = {}
  for name, keys in box.items():
    weight, bias = _weight_bias(heads, keys, prefix, name, 2)
    params[name] = {"kernel": weight.T, "bias": bias}
  rep, fc6_in = params["fc6"]["kernel"].shape[::-1]
  size = math.isqrt(fc6_in // channels)
  if size * size * channels != fc6_in:
    raise ValueError(f"fc6 takes {fc6_in} inputs, not channels x P x P for channels={channels}; "
                     "pass the channel count of the pooled box features as `channels`.")
  params["fc6"]["kernel"] = (params["fc6"]["kernel"].reshape(channels, size, size, rep)
                             .transpose(1, 2, 0, 3).reshape(fc6_in, rep))
  num_outputs = params["cls_score"]["bias"].shape[0]
  if (params["fc7"]["kernel"].shape != (rep, rep)
      or params["cls_score"]["kernel"].shape[0] != rep
      or params["bbox_pred"]["kernel"].shape != (rep, 4 * num_outputs)):
    raise ValueError(f"Box head shapes disagree: fc6 {(fc6_in, rep)}, fc7 "
                     f"{params['fc7']['kernel'].shape}, cls_score "
                     f"{params['cls_score']['kernel'].shape}, bbox_pred "
                     f"{params['bbox_pred']['kernel'].shape} (in, out); expected fc7 (R, R), "
                     "cls_score (R, K + 1) and bbox_pred (R, 4 (K + 1)).")
  if num_outputs < 2:
    raise ValueError(f"cls_score has {num_outputs} output; expected K + 1 >= 2 (background "
                     "first).")
  converted = {"box_head": {"params": params}}
  if not mask:
    return converted

  num_convs = sum(name.startswith("mask_fcn_") and name != "mask_fcn_logits" for name in mask)
  _check_complete("mask head", mask, {f"mask_fcn_{i}" for i in range(num_convs)}
                  | {"conv5_mask", "mask_fcn_logits"})
  params = {}
  for name, keys in mask.items():
    weight, bias = _weight_bias(heads, keys, prefix, name, 4)
    if name == "conv5_mask":
      params[name] = {"kernel": weight.transpose(2, 3, 0, 1)[::-1, ::-1].copy(), "bias": bias}
    else:
      params[name] = {"kernel": weight.transpose(2, 3, 1, 0), "bias": bias}
  layers = [f"mask_fcn_{i}" for i in range(num_convs)] + ["conv5_mask"]
  width = params["conv5_mask"]["kernel"].shape[-1]
  shapes = [params[name]["kernel"].shape for name in layers + ["mask_fcn_logits"]]
  consistent = (all(params[name]["kernel"].shape[-1] == width for name in layers)
                and all(params[name]["kernel"].shape[:2] == (3, 3) for name in layers[:-1])
                and params["conv5_mask"]["kernel"].shape[:2] == (2, 2)
                and all(params[b]["kernel"].shape[2] == width
                        for b in layers[1:] + ["mask_fcn_logits"])
                and params["mask_fcn_logits"]["kernel"].shape[:2] == (1, 1))
  if not consistent:
    raise ValueError(f"Mask head kernels (kh, kw, in, out) {shapes} for {layers} and "
                     "mask_fcn_logits do not form MaskHead: 3x3 convs and a 2x2 deconv of one "
                     "width, then a 1x1 conv.")
  if params["mask_fcn_logits"]["bias"].shape[0] != num_outputs:
    raise ValueError(f"mask_fcn_logits has {params['mask_fcn_logits']['bias'].shape[0]} outputs "
                     f"but cls_score {num_outputs}; both must be K + 1.")
  converted["mask_head"] = {"params": params}
  return converted


def roi_heads_config(converted: Mapping[str, Any]) -> Dict[str, int]:
  """Constructor arguments matching `torch_roi_heads_to_flax` output.

  Returns dict(num_classes=K, representation_size=...) for `BoxHead` and, when a mask head was
  converted, mask_channels and mask_num_convs: `MaskHead(num_classes,
  channels=mask_channels, num_convs=mask_num_convs)` (the dilation is not in the weights;
  torchvision's is 1).
  """
  if "box_head" not in converted:
    raise ValueError("converted has no 'box_head'; pass the output of torch_roi_heads_to_flax.")
  box = converted["box_head"]["params"]
  config = dict(num_classes=int(box["cls_score"]["bias"].shape[0]) - 1,
                representation_size=int(box["fc6"]["kernel"].shape[1]))
  if "mask_head" in converted:
    mask = converted["mask_head"]["params"]
    config["mask_channels"] = int(mask["conv5_mask"]["kernel"].shape[-1])
    config["mask_num_convs"] = sum(name.startswith("mask_fcn_") and name != "mask_fcn_logits"
                                   for name in mask)
  return config
