"""Region Proposal Network (Ren et al., 2015) for FPN detectors, torchvision's semantics, NHWC.

`RPNHead` is torchvision's `RPNHead`: a 3x3 conv (channels -> channels, ReLU) then two 1x1
convs giving A objectness logits and 4A box deltas per position, one set of weights shared by
every pyramid level. Outputs are flattened per level with positions outer and anchors inner,
the order of `segjax.ops.generate_anchors` and of torchvision's `concat_box_prediction_layers`.

`propose` is `RegionProposalNetwork.filter_proposals` for one image with static shapes: the
variable-length selections of torchvision become validity masks, and the output is a fixed
number of proposal slots padded with invalid rows. Use `jax.vmap` for batches.
"""
from typing import Any, List, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.layers import Conv
from segjax.ops import batched_nms, clip_boxes, decode_boxes

# torchvision's RPNHead init: normal_(std=0.01) weights, zero biases.
_rpn_init = nn.initializers.normal(0.01)
_RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)  # torchvision's RPN BoxCoder weights


class RPNHead(nn.Module):
  """Objectness and box-delta predictor applied to every FPN level with shared weights.

  Attributes:
    num_anchors: A, anchors per position (torchvision: 3 aspect ratios x 1 size).
    conv_depth: number of 3x3 conv + ReLU layers before the predictors (torchvision: 1).

  Called on a sequence of NHWC feature maps [N, Hl, Wl, C] (same C on every level), returns
  (objectness: per level [N, Hl * Wl * A] logits, deltas: per level [N, Hl * Wl * A, 4]).
  """
  num_anchors: int = 3
  conv_depth: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[Any]) -> Tuple[List[Any], List[Any]]:
    if isinstance(features, Mapping) or not features:
      raise ValueError("RPNHead takes a non-empty sequence of NHWC feature maps, finest first; "
                       "pass e.g. [fpn_out[k] for k in ('p2', 'p3', 'p4', 'p5', 'p6')].")
    channels = {f.shape[-1] for f in features}
    if any(f.ndim != 4 for f in features) or len(channels) != 1:
      raise ValueError(f"RPNHead needs 4-D NHWC maps with one channel count on every level, got "
                       f"shapes {[tuple(f.shape) for f in features]}.")
    channels = channels.pop()
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_rpn_init,
              bias_init=nn.initializers.zeros)
    convs = [Conv(channels, (3, 3), padding=((1, 1), (1, 1)), name=f"conv_{i}", **kw)
             for i in range(self.conv_depth)]
    cls_logits = Conv(self.num_anchors, (1, 1), name="cls_logits", **kw)
    bbox_pred = Conv(4 * self.num_anchors, (1, 1), name="bbox_pred", **kw)
    objectness, deltas = [], []
    for x in features:
      for conv in convs:
        x = nn.relu(conv(x))
      n = x.shape[0]
      objectness.append(cls_logits(x).reshape(n, -1))
      deltas.append(bbox_pred(x).reshape(n, -1, 4))  # channel a * 4 + coord, as torchvision
    return objectness, deltas


def propose(objectness: Sequence[Any], deltas: Sequence[Any], anchors: Sequence[Any],
            image_size, *, pre_nms_top_n: int = 1000, post_nms_top_n: int = 1000,
            nms_thresh: float = 0.7, min_size: float = 1e-3,
            score_thresh: float = 0.0) -> Tuple[Any, Any, Any]:
  """RPN proposals of one image, torchvision's `filter_proposals` with static shapes.

  Per level, the `pre_nms_top_n` highest logits (all if the level has fewer) are kept and
  their deltas decoded on their anchors (BoxCoder weights 1, dw/dh clamped at log(1000/16));
  boxes are clipped to the image; boxes with a side < `min_size` or a sigmoid score <
  `score_thresh` are dropped; NMS at `nms_thresh` runs per level (levels as classes); the
  `post_nms_top_n` best survivors are returned by descending score. Inputs are not
  differentiated through (torchvision detaches them too).

  Args:
    objectness: per level [Ml] logits of one image (an `RPNHead` output row).
    deltas: per level [Ml, 4] box deltas.
    anchors: per level [Ml, 4] anchors (`segjax.ops.generate_anchors`).
    image_size: (height, width) to clip to; may be traced (e.g. vmapped per image).
    pre_nms_top_n: static candidates per level (torchvision: 2000 training, 1000 testing).
    post_nms_top_n: static number of output slots (torchvision: 2000 training, 1000 testing).

  Returns:
    (boxes [post_nms_top_n, 4], scores [post_nms_top_n] sigmoid probabilities, valid
    [post_nms_top_n] bool); the valid rows come first, padding rows are zero.
  """
  if not (len(objectness) == len(deltas) == len(anchors)) or not objectness:
    raise ValueError(f"objectness, deltas and anchors need one entry per level, got "
                     f"{len(objectness)}, {len(deltas)} and {len(anchors)}.")
  for name, value in (("pre_nms_top_n", pre_nms_top_n), ("post_nms_top_n", post_nms_top_n)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive Python int (a static shape), got {value!r}.")
  boxes, scores, levels = [], [], []
  for level, (obj, dlt, anc) in enumerate(zip(objectness, deltas, anchors)):
    obj, dlt, anc = jnp.asarray(obj), jnp.asarray(dlt), jnp.asarray(anc)
    if obj.ndim != 1 or dlt.shape != obj.shape + (4,) or anc.shape != dlt.shape:
      raise ValueError(f"Level {level}: objectness must be [M], deltas and anchors [M, 4] for "
                       f"one image, got {obj.shape}, {dlt.shape}, {anc.shape}; use jax.vmap "
                       "for batches.")
    logits, idx = jax.lax.top_k(jax.lax.stop_gradient(obj).astype(jnp.float32),
                                min(pre_nms_top_n, obj.shape[0]))
    dlt = jax.lax.stop_gradient(dlt).astype(jnp.float32)[idx]
    boxes.append(decode_boxes(dlt, anc.astype(jnp.float32)[idx], weights=_RPN_WEIGHTS))
    scores.append(jax.nn.sigmoid(logits))
    levels.append(jnp.full(idx.shape, level, jnp.int32))
  boxes = clip_boxes(jnp.concatenate(boxes), image_size[0], image_size[1])
  scores = jnp.concatenate(scores)
  valid = ((boxes[:, 2] - boxes[:, 0] >= min_size) & (boxes[:, 3] - boxes[:, 1] >= min_size)
           & (scores >= score_thresh))
  keep, _ = batched_nms(boxes, scores, jnp.concatenate(levels), nms_thresh, post_nms_top_n,
                        valid=valid)
  kept = keep >= 0
  safe = jnp.maximum(keep, 0)
  return (jnp.where(kept[:, None], boxes[safe], 0), jnp.where(kept, scores[safe], 0), kept)
