"""MobileNetV2 encoder (Sandler et al., 2018) for dense prediction, NHWC.

The layout is torchvision's `mobilenet_v2().features`: a 3x3/2 conv-BN-ReLU6
stem (`features.0`), 17 inverted residual blocks (`features.1` ... `features.17`,
named `block1` ... `block17` here) and, only with `include_last_conv`, the 1x1
conv-BN-ReLU6 to 1280 channels (`features.18`), which DeepLabV3+ leaves out in
favour of the 320-channel features. A block expands by a 1x1 conv (absent when
t = 1), filters with a 3x3 depthwise conv carrying its stride, and projects
with a linear 1x1 conv; it adds its input when stride 1 keeps the channels.
Every conv pads `dilation * (k // 2)` on each side, as PyTorch does.

Output stride 16 or 8 sets the stride of the later strided blocks to 1 and
dilates the depthwise convs after them, as DeepLab's MobileNet does: with
`contract_dilation` (default), the block that lost its stride keeps the
previous dilation, since its input is still at the previous resolution
(TensorFlow DeepLab, and `contract_dilation` of segjax's ResNet); without it,
that block gets the full new dilation too (mmseg's MobileNetV2 and torchvision's
dilated MobileNetV3).
"""
from typing import Any, Callable, Dict, Optional

import flax.linen as nn
import jax.numpy as jnp

from segjax.layers import ConvBNAct

# (expansion t, channels c, repeats n, stride s) per block group, torchvision's table.
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
OUTPUT_STRIDES = (8, 16, 32)
# Nominal stride (at output stride 32) -> the feature that the last block there gives.
STAGE_NAMES = {4: "stage1", 8: "stage2", 16: "stage3", 32: "stage4"}

# torchvision's init: He normal with fan_out (not truncated).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def make_divisible(value: float, divisor: int = 8) -> int:
  """Channels scaled by a width multiplier, rounded to a multiple of `divisor`
  and never more than 10% below `value` (torchvision's `_make_divisible`)."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn(features: int, kernel: int = 1, stride: int = 1, dilation: int = 1,
             groups: int = 1, activation: Optional[Callable] = nn.relu6, **kw) -> ConvBNAct:
  """Conv-BN-ReLU6 with torchvision's initialisation (ReLU6 unless `activation`)."""
  return ConvBNAct(features, (kernel, kernel), (stride, stride), dilation,
                   feature_group_count=groups, activation=activation, kernel_init=_conv_init,
                   **kw)


class InvertedResidual(nn.Module):
  """1x1 expand (t > 1), 3x3 depthwise (strided, dilated), linear 1x1 project."""
  features: int
  expand_ratio: int
  stride: int = 1
  dilation: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hidden = int(round(x.shape[-1] * self.expand_ratio))
    y = x
    if self.expand_ratio != 1:
      y = _conv_bn(hidden, name="expand", **kw)(y, train)
    y = _conv_bn(hidden, 3, self.stride, self.dilation, groups=hidden, name="depthwise",
               **kw)(y, train)
    y = _conv_bn(self.features, activation=None, name="project", **kw)(y, train)
    return x + y if self.stride == 1 and x.shape[-1] == self.features else y


class MobileNetV2(nn.Module):
  """A MobileNetV2 encoder returning the stem and four stage features.

  Returns {"stem": `features.0` (stride 2), "stage1": stride 4 (24 channels at
  width 1), "stage2": 8 (32), "stage3": min(16, os) (96), "stage4": os (320, or
  1280 with `include_last_conv`)}, where os is `output_stride`. Channels scale
  with `width_mult` as in torchvision.
  """
  width_mult: float = 1.0
  output_stride: int = 32
  contract_dilation: bool = True
  include_last_conv: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.output_stride not in OUTPUT_STRIDES:
      raise ValueError(f"Unknown output_stride {self.output_stride}; use one of "
                       f"{list(OUTPUT_STRIDES)}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, images, train: bool = False) -> Dict[str, Any]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _conv_bn(make_divisible(STEM_CHANNELS * self.width_mult), 3, 2, name="stem",
               **kw)(images.astype(self.dtype), train)
    features = {"stem": x}
    nominal, current, dilation = 2, 2, 1  # stride at os 32, actual stride, dilation
    index = 1
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
      channels = make_divisible(c * self.width_mult)
      for i in range(n):
        stride = s if i == 0 else 1
        nominal *= stride
        rate = dilation
        if current * stride > self.output_stride:
          dilation *= stride
          stride = 1
          rate = rate if self.contract_dilation else dilation
        current *= stride
        x = InvertedResidual(channels, t, stride, rate, name=f"block{index}", **kw)(x, train)
        index += 1
      if nominal in STAGE_NAMES:
        features[STAGE_NAMES[nominal]] = x  # a later group at the same stride overwrites
    if self.include_last_conv:
      last = make_divisible(LAST_CHANNELS * max(1.0, self.width_mult))
      features["stage4"] = _conv_bn(last, name="last_conv", **kw)(x, train)
    return features
