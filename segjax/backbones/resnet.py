"""ResNet encoders (He et al., 2016) for dense prediction, NHWC.

The layout follows torchvision's ResNet v1.5: the stride of a Bottleneck sits on
its 3x3 conv. Two stems are offered: torchvision's 7x7/2 conv and mmseg's
"v1c" deep stem (three 3x3 convs). Every conv pads explicitly and symmetrically
by `dilation * (k // 2)`, as PyTorch does, so converted weights give the same
numbers (flax's "SAME" pads stride-2 convs more at the end than at the start).

Output stride 16 or 8 replaces the stride of the last one or two stages by
dilation (DeepLab). As in torchvision's `replace_stride_with_dilation` and
mmseg's `contract_dilation=True`, the first block of such a stage still uses
the previous stage's dilation in its 3x3 conv, since its input is still at the
previous resolution (for these output strides that is half the stage's
dilation). `contract_dilation=False` gives it the stage's full dilation, as
mmseg's ResNet does by default; that is not torchvision's network.
Dilated BasicBlocks dilate only their first conv, as mmseg's do (torchvision
has no dilated BasicBlock).
"""
from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from segjax.layers import Conv, batch_norm, remat

# depth -> (bottleneck?, blocks per stage), torchvision's layer counts.
ARCHS = {18: (False, (2, 2, 2, 2)), 34: (False, (3, 4, 6, 3)),
         50: (True, (3, 4, 6, 3)), 101: (True, (3, 4, 23, 3))}
STEMS = ("torchvision", "v1c")
# output stride -> how many of the last stages trade their stride for dilation.
DILATED_STAGES = {32: 0, 16: 1, 8: 2}
STAGE_WIDTHS = (64, 128, 256, 512)

# torchvision's init: He normal with fan_out (not truncated).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel: int, stride: int = 1, dilation: int = 1,
         name: Optional[str] = None, **kw) -> nn.Conv:
  """A bias-free conv padded like PyTorch's: `dilation * (kernel // 2)` each side."""
  pad = dilation * (kernel // 2)
  return Conv(features, (kernel, kernel), strides=(stride, stride),
                 kernel_dilation=(dilation, dilation), padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=_conv_init, name=name, **kw)


def shortcut(x, features: int, stride: int, train: bool, dtype: Any, param_dtype: Any):
  """Identity, or a strided 1x1 conv-BN projection where shape changes.

  Called from a block's compact method, so its layers belong to that block.
  """
  if stride == 1 and x.shape[-1] == features:
    return x
  y = conv(features, 1, stride, name="downsample_conv", dtype=dtype,
           param_dtype=param_dtype)(x)
  return batch_norm(train, dtype, param_dtype, name="downsample_bn")(y)


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN with an identity (or 1x1 conv-BN) shortcut."""
  width: int
  stride: int = 1
  dilation: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    bn = lambda name: batch_norm(train, self.dtype, self.param_dtype, name=name)
    y = conv(self.width, 3, self.stride, self.dilation, name="conv1", **kw)(x)
    y = nn.relu(bn("bn1")(y))
    y = bn("bn2")(conv(self.width, 3, name="conv2", **kw)(y))
    return nn.relu(y + shortcut(x, self.width, self.stride, train, **kw))


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided, dilated), 1x1 expand to 4x `width`, plus shortcut."""
  width: int
  stride: int = 1
  dilation: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    bn = lambda name: batch_norm(train, self.dtype, self.param_dtype, name=name)
    y = nn.relu(bn("bn1")(conv(self.width, 1, name="conv1", **kw)(x)))
    y = conv(self.width, 3, self.stride, self.dilation, name="conv2", **kw)(y)
    y = nn.relu(bn("bn2")(y))
    out = 4 * self.width
    y = bn("bn3")(conv(out, 1, name="conv3", **kw)(y))
    return nn.relu(y + shortcut(x, out, self.stride, train, **kw))


class ResNet(nn.Module):
  """A ResNet-`depth` encoder returning the stem and the four stage features.

  Returns {"stem": after the stem convs (stride 2, before the max pool),
  "stage1": stride 4, "stage2": 8, "stage3": min(16, os), "stage4": os}, where
  os is `output_stride`. `multi_grid` multiplies the dilation of each block of
  the last stage (DeepLabV3's Multi-Grid), e.g. (1, 2, 4) at output stride 16
  gives dilations 2, 4, 8; it overrides the contraction of the first block.
  (mmseg's `multi_grid` lists the dilations themselves, not multipliers.)
  """
  depth: int = 50
  stem: str = "torchvision"
  output_stride: int = 32
  contract_dilation: bool = True
  multi_grid: Optional[Sequence[int]] = None
  width: int = 64  # channels of the first stage's 3x3 convs; scales the whole network
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.depth not in ARCHS:
      raise ValueError(f"Unknown ResNet depth {self.depth}; use one of {sorted(ARCHS)}.")
    if self.stem not in STEMS:
      raise ValueError(f"Unknown ResNet stem {self.stem!r}; use one of {list(STEMS)}.")
    if self.output_stride not in DILATED_STAGES:
      raise ValueError(f"Unknown output_stride {self.output_stride}; use one of "
                       f"{sorted(DILATED_STAGES)}.")
    last_blocks = ARCHS[self.depth][1][-1]
    if self.multi_grid is not None and len(self.multi_grid) != last_blocks:
      raise ValueError(f"multi_grid needs one multiplier per block of the last stage "
                       f"({last_blocks} for ResNet-{self.depth}), got {tuple(self.multi_grid)}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, images, train: bool = False) -> Dict[str, Any]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    bn = lambda name: batch_norm(train, self.dtype, self.param_dtype, name=name)
    x = images.astype(self.dtype)
    w = self.width
    if self.stem == "torchvision":
      x = nn.relu(bn("stem_bn1")(conv(w, 7, 2, name="stem_conv1", **kw)(x)))
    else:
      for i, (channels, stride) in enumerate([(w // 2, 2), (w // 2, 1), (w, 1)], start=1):
        x = nn.relu(bn(f"stem_bn{i}")(conv(channels, 3, stride, name=f"stem_conv{i}", **kw)(x)))
    features = {"stem": x}
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    bottleneck, blocks_per_stage = ARCHS[self.depth]
    block_cls = remat.block(Bottleneck if bottleneck else BasicBlock)
    first_dilated = len(STAGE_WIDTHS) - DILATED_STAGES[self.output_stride]
    dilation = 1
    for s, (base, blocks) in enumerate(zip(STAGE_WIDTHS, blocks_per_stage)):
      width = base * w // 64
      stride = 1 if s == 0 else 2
      previous = dilation
      if s >= first_dilated:
        dilation, stride = dilation * stride, 1
      rates = [previous if self.contract_dilation else dilation] + [dilation] * (blocks - 1)
      if self.multi_grid is not None and s == len(STAGE_WIDTHS) - 1:
        rates = [dilation * m for m in self.multi_grid]
      for b, rate in enumerate(rates):
        x = block_cls(width, stride if b == 0 else 1, rate, name=f"stage{s + 1}_block{b}",
                      **kw)(x, train)
      features[f"stage{s + 1}"] = x
    return features
