"""Box and mask RoI heads of Faster / Mask R-CNN, torchvision's semantics, NHWC.

`BoxHead` is torchvision's `TwoMLPHead` followed by `FastRCNNPredictor`; `MaskHead` is
`MaskRCNNHeads` followed by `MaskRCNNPredictor`. Both take RoIAligned features with any leading
dims (e.g. [B, R, P, P, C]). Class index 0 is the background, as in torchvision.

`postprocess_detections` is `RoIHeads.postprocess_detections` for one image with static shapes:
torchvision's variable-length selections become validity masks and the output is a fixed number
of detection slots padded with invalid rows. Use `jax.vmap` for batches.

`segjax.convert.roi_heads` converts the RoI heads of a torchvision detector state dict.
"""
import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

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
