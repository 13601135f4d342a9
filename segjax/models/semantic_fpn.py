"""The semantic segmentation branch of Panoptic FPN (Kirillov et al., 2019), NHWC.

`SemanticFPNHead` follows detectron2's `SemSegFPNHead`: every FPN level runs
through max(1, log2(stride / common_stride)) stages of 3x3 conv + GroupNorm +
ReLU, each followed by a 2x bilinear upsample (align_corners=False) on the
levels coarser than `common_stride`; the levels are summed and a 1x1
"predictor" conv gives the class logits at `common_stride`.

detectron2 pads images to a multiple of 32, so its 2x upsamples always land on
the next finer level's size. Here each upsample resizes to that level's exact
size instead, so inputs of any size work (an FPN on a 96x80 image has a 3x3 P5
but a 6x5 P4); on padded inputs the two agree, as bilinear resizing to twice the
size samples the same positions as `scale_factor=2`.

`upsample_logits` brings the logits to the image as detectron2's loss and
inference do: a `common_stride`x bilinear upsample, cropped to the image.
"""
from typing import Any, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from segjax.layers import Conv, resize_bilinear

NORMS = ("GN", "")
GN_GROUPS = 32
# fvcore's c2_msra_fill: kaiming_normal_(mode="fan_out", nonlinearity="relu"), bias 0.
c2_msra_fill = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def upsample_logits(logits, size: Sequence[int], stride: int = 4):
  """Stride-`stride` NHWC logits to the image size `size` (height, width), in float32.

  Like detectron2's `F.interpolate(scale_factor=stride, mode="bilinear",
  align_corners=False)` followed by cropping the padding away: the logits are
  upsampled to exactly `stride` times their size and the top-left `size` kept,
  so every logit keeps its place on the image whether or not `size` divides by
  `stride`. Logits from an image of `size` have ceil(size / stride) rows and
  columns (what a stride-`stride` backbone with "same" padding gives).
  """
  if logits.ndim != 4:
    raise ValueError(f"upsample_logits expects NHWC logits, got shape {logits.shape}.")
  if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
    raise ValueError(f"upsample_logits: `stride` must be a positive int, got {stride!r}.")
  h, w = (int(s) for s in size)
  expected = (-(-h // stride), -(-w // stride))
  if tuple(logits.shape[1:3]) != expected:
    raise ValueError(
        f"upsample_logits: logits of spatial size {tuple(logits.shape[1:3])} do not come "
        f"from a {h}x{w} image at stride {stride}, which gives {expected}; pass the size "
        "of the image the logits were computed on and the head's common_stride.")
  big = (logits.shape[1] * stride, logits.shape[2] * stride)
  return resize_bilinear(logits.astype(jnp.float32), big, align_corners=False)[:, :h, :w]


class SemanticFPNHead(nn.Module):
  """detectron2's `SemSegFPNHead` over an FPN feature dict such as `ResNetFPN`'s.

  `in_features` are finest first, with `strides` doubling from `common_stride`
  (the FPN levels P2-P5 at 4-32 by default). `norm` is "GN" (GroupNorm with 32
  groups and no conv bias, detectron2's Panoptic FPN config) or "" (conv with
  bias, no norm). Convs are initialized with c2_msra_fill (kaiming normal,
  fan_out, ReLU gain; zero bias), the predictor too, as in detectron2;
  `predictor_std` instead draws the predictor from N(0, predictor_std^2) with
  zero bias (as detectron2's DeepLab heads do with 0.001), which starts
  training from near-uniform class scores.

  Returns logits [B, H_0, W_0, num_classes] at the size of the finest input
  level (H / common_stride rounded up), in `dtype`; see `upsample_logits`.
  Parameters: per level and stage k, "{feature}_{k}" (conv) and, with GN,
  "{feature}_{k}_norm"; then "predictor".
  """
  num_classes: int
  channels: int = 128
  common_stride: int = 4
  norm: str = "GN"
  in_features: Sequence[str] = ("p2", "p3", "p4", "p5")
  strides: Sequence[int] = (4, 8, 16, 32)
  predictor_std: Optional[float] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    self.stages()  # validates
    super().__post_init__()

  def stages(self) -> Tuple[int, ...]:
    """Conv stages per input level, finest first (1, 1, 2, 3 for P2-P5 at stride 4)."""
    name = type(self).__name__
    if not isinstance(self.num_classes, int) or self.num_classes < 1:
      raise ValueError(f"{name}: num_classes must be a positive int, got {self.num_classes!r}.")
    if self.norm not in NORMS:
      raise ValueError(f"{name}: norm must be one of {NORMS} (GroupNorm or none), got "
                       f"{self.norm!r}.")
    if not isinstance(self.channels, int) or self.channels < 1:
      raise ValueError(f"{name}: channels must be a positive int, got {self.channels!r}.")
    if self.norm == "GN" and self.channels % GN_GROUPS:
      raise ValueError(f"{name}: GroupNorm uses {GN_GROUPS} groups, so channels must be a "
                       f"multiple of {GN_GROUPS}, got {self.channels}; or use norm=\"\".")
    if self.predictor_std is not None and not (
        isinstance(self.predictor_std, (int, float)) and self.predictor_std > 0):
      raise ValueError(f"{name}: predictor_std must be None (c2_msra_fill) or > 0, got "
                       f"{self.predictor_std!r}.")
    strides = tuple(self.strides)
    expected = tuple(self.common_stride * 2**i for i in range(len(strides)))
    if not strides or len(strides) != len(self.in_features) or strides != expected:
      raise ValueError(
          f"{name}: strides {strides} must give one stride per feature of "
          f"{tuple(self.in_features)}, finest first, doubling from common_stride "
          f"{self.common_stride} (i.e. {expected}).")
    return tuple(max(1, i) for i in range(len(strides)))

  @nn.compact
  def __call__(self, features: Mapping[str, Any]):
    missing = [k for k in self.in_features if k not in features]
    if missing:
      raise ValueError(f"{type(self).__name__} needs features {list(self.in_features)}; "
                       f"{missing} are not among the inputs {sorted(features)}.")
    maps = [features[k] for k in self.in_features]
    for key, x in zip(self.in_features, maps):
      if x.ndim != 4 or x.shape[0] != maps[0].shape[0]:
        raise ValueError(f"{type(self).__name__}: feature {key!r} has shape {x.shape}; all "
                         f"must be NHWC with the batch size of {self.in_features[0]!r}.")
    sizes = [x.shape[1:3] for x in maps]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    total = None
    for level, (key, x, stages) in enumerate(zip(self.in_features, maps, self.stages())):
      x = x.astype(self.dtype)
      for k in range(stages):
        x = Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=not self.norm,
                    kernel_init=c2_msra_fill, name=f"{key}_{k}", **kw)(x)
        if self.norm:
          x = nn.GroupNorm(GN_GROUPS, epsilon=1e-5, name=f"{key}_{k}_norm", **kw)(x)
        x = nn.relu(x)
        if level:  # Coarser than common_stride: 2x up, to the next finer level's size.
          x = resize_bilinear(x, sizes[level - 1 - k], align_corners=False)
      total = x if total is None else total + x
    init = (c2_msra_fill if self.predictor_std is None
            else nn.initializers.normal(self.predictor_std))
    return Conv(self.num_classes, (1, 1), kernel_init=init, name="predictor", **kw)(total)
