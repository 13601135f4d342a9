"""Decode heads shared by several models."""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from segjax.layers import (Conv, ConvBNAct, SeparableConvBNAct, adaptive_avg_pool,
                           resize_bilinear)


def head_dropout(rate: float, train: bool, channel_dropout: bool) -> nn.Dropout:
  """Dropout before a classifier: per element (torchvision's `nn.Dropout`), or with
  `channel_dropout` whole feature maps per image and channel (mmseg's `nn.Dropout2d`)."""
  return nn.Dropout(rate, broadcast_dims=(1, 2) if channel_dropout else (),
                    deterministic=not train)


class FCNHead(nn.Module):
  """`num_convs` 3x3 conv-BN-ReLU, dropout, and a 1x1 classifier.

  The FCN head on a dilated ResNet (torchvision `FCNHead`, mmseg `FCNHead` with
  concat_input=False) and the auxiliary head of PSPNet and DeepLabV3. With
  `concat_input` (mmseg's FCN decode head), the input and the convs' output are
  concatenated and fused by one more 3x3 conv-BN-ReLU (`conv_cat`) before dropout.
  """
  num_classes: int
  channels: int = 256
  num_convs: int = 1
  concat_input: bool = False
  dropout: float = 0.1
  channel_dropout: bool = False  # mmseg's Dropout2d
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = x
    for i in range(self.num_convs):
      y = ConvBNAct(self.channels, (3, 3), name=f"conv{i}", **kw)(y, train)
    if self.concat_input:
      y = ConvBNAct(self.channels, (3, 3), name="conv_cat", **kw)(
          jnp.concatenate([x.astype(y.dtype), y], axis=-1), train)
    y = head_dropout(self.dropout, train, self.channel_dropout)(y)
    return Conv(self.num_classes, (1, 1), name="classifier", **kw)(y)


class ASPPHead(nn.Module):
  """mmseg's `ASPPHead` (DeepLabV3) and, with `separable` and `c1_channels`, its
  `DepthwiseSeparableASPPHead` (DeepLabV3+), in mmseg's order of operations.

  Branches, concatenated in this order: image pooling (global average, 1x1
  conv-BN-ReLU, bilinear back to the map's size; `image_pool`), then per
  dilation rate a 1x1 conv-BN-ReLU for rate 1 or a 3x3 atrous conv-BN-ReLU
  (depthwise-separable with `separable`: a dilated 3x3 depthwise conv-BN-ReLU
  and a 1x1 conv-BN-ReLU) (`aspp{i}`); then a 3x3 conv-BN-ReLU to `channels`
  (`bottleneck`). DeepLabV3+ (`c1_channels` > 0): the stride-4 features `c1`
  go through a 1x1 conv-BN-ReLU to `c1_channels` (`c1_bottleneck`), the
  bottleneck output is resized bilinearly to their size and concatenated
  before them, and two 3x3 depthwise-separable conv-BN-ReLUs to `channels`
  follow (`sep_bottleneck{0,1}`). Finally channel dropout (mmseg's Dropout2d)
  and a 1x1 classifier. Resizing is bilinear with align_corners=False.
  """
  num_classes: int
  channels: int = 512
  dilations: Sequence[int] = (1, 12, 24, 36)
  separable: bool = False
  c1_channels: int = 0
  dropout: float = 0.1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, c1: Optional[Any] = None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    pooled = ConvBNAct(self.channels, (1, 1), name="image_pool", **kw)(
        adaptive_avg_pool(x, 1), train)
    outs = [resize_bilinear(pooled, x.shape[1:3], align_corners=False)]
    for i, rate in enumerate(self.dilations):
      if rate == 1:
        branch = ConvBNAct(self.channels, (1, 1), name=f"aspp{i}", **kw)
      elif self.separable:
        branch = SeparableConvBNAct(self.channels, dilation=rate, name=f"aspp{i}", **kw)
      else:
        branch = ConvBNAct(self.channels, (3, 3), dilation=rate, name=f"aspp{i}", **kw)
      outs.append(branch(x, train))
    y = ConvBNAct(self.channels, (3, 3), name="bottleneck", **kw)(
        jnp.concatenate(outs, axis=-1), train)
    if self.c1_channels:
      if c1 is None:
        raise ValueError("ASPPHead with c1_channels > 0 (DeepLabV3+) needs the stride-4 "
                         "features `c1`.")
      low = ConvBNAct(self.c1_channels, (1, 1), name="c1_bottleneck", **kw)(c1, train)
      y = jnp.concatenate([resize_bilinear(y, low.shape[1:3], align_corners=False), low],
                          axis=-1)
      for i in range(2):
        y = SeparableConvBNAct(self.channels, name=f"sep_bottleneck{i}", **kw)(y, train)
    y = head_dropout(self.dropout, train, True)(y)
    return Conv(self.num_classes, (1, 1), name="classifier", **kw)(y)


def outputs_at_input_size(logits, images, features, train: bool, num_classes: int,
                          aux_channels: int, dropout: float = 0.1,
                          channel_dropout: bool = False, **kw):
  """The decode head's logits upsampled to the input (bilinear, align_corners=False);
  in training with `aux_channels` > 0, a dict that adds `aux_logits` from an FCN
  head (`aux_head`) on stage 3. Called inside a model's compact `__call__`."""
  size = images.shape[1:3]
  upsample = lambda y: resize_bilinear(y.astype(jnp.float32), size, align_corners=False)
  if not (train and aux_channels):
    return upsample(logits)
  aux = FCNHead(num_classes, aux_channels, dropout=dropout, channel_dropout=channel_dropout,
                name="aux_head", **kw)(features["stage3"], train)
  return {"logits": upsample(logits), "aux_logits": upsample(aux)}
