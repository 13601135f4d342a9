"""Multi-scale context modules of PSPNet and DeepLab, laid out like the PyTorch
implementations whose pretrained weights we convert.

Parameter names (PyTorch conv `weight` (O, I, kh, kw) -> flax `kernel`
(kh, kw, I, O); BN `weight`/`bias` -> params `scale`/`bias`, `running_mean`/
`running_var` -> batch_stats `mean`/`var`):

  PyTorch                                        segjax
  torchvision ASPP (DeepLabHead[0]):
    convs.0.{0,1}       1x1 conv, BN             branch0/{conv,bn}
    convs.k.{0,1}       3x3 atrous, k=1..R       branch{k}/{conv,bn}
    convs.{R+1}.{1,2}   image pooling conv, BN   pool_branch/{conv,bn}
    project.{0,1}       1x1 conv, BN             project/{conv,bn}
  mmseg PSPHead.psp_modules (PPM):
    {i}.1.{conv,bn}     bin i's 1x1 ConvModule   branch{i}/{conv,bn}
  mmseg DepthwiseSeparableConvModule:
    depthwise_conv.{conv,bn}                     depthwise/{conv,bn}
    pointwise_conv.{conv,bn}                     pointwise/{conv,bn}

(R = number of atrous rates; pooling, ReLU and dropout layers hold no weights.)
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from segjax.layers.conv import ConvBNAct
from segjax.layers.pooling import adaptive_avg_pool
from segjax.layers.resize import resize_bilinear


class PyramidPoolingModule(nn.Module):
  """PSPNet's pyramid pooling (mmseg `PPM`): per bin count, adaptive average
  pooling, a 1x1 conv-BN-ReLU to `channels` and bilinear upsampling back; the
  result is the input concatenated with all branches (C + len(bins) * channels)."""
  bins: Sequence[int] = (1, 2, 3, 6)
  channels: int = 512
  align_corners: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = x.astype(self.dtype)
    outs = [x]
    for i, bins in enumerate(self.bins):
      y = ConvBNAct(self.channels, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                    name=f"branch{i}")(adaptive_avg_pool(x, bins), train)
      outs.append(resize_bilinear(y, x.shape[1:3], self.align_corners))
    return jnp.concatenate(outs, axis=-1)


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling as torchvision's DeepLabV3 `ASPP`: a 1x1
  branch, a 3x3 branch per dilation rate, an image-pooling branch, concatenated
  and projected to `channels` by a 1x1 conv-BN-ReLU followed by dropout.

  Stride-1 "SAME" padding of a dilated 3x3 conv is `rate` on every side, which
  is PyTorch's `padding=rate`.
  """
  rates: Sequence[int] = (6, 12, 18)
  channels: int = 256
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    branches = [ConvBNAct(self.channels, (1, 1), name="branch0", **kw)(x, train)]
    for k, rate in enumerate(self.rates, start=1):
      branches.append(ConvBNAct(self.channels, (3, 3), dilation=rate, name=f"branch{k}",
                                **kw)(x, train))
    pooled = ConvBNAct(self.channels, (1, 1), name="pool_branch", **kw)(
        adaptive_avg_pool(x, 1), train)
    branches.append(resize_bilinear(pooled, x.shape[1:3], align_corners=False))
    y = ConvBNAct(self.channels, (1, 1), name="project", **kw)(
        jnp.concatenate(branches, axis=-1), train)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class SeparableConvBNAct(nn.Module):
  """Depthwise-separable conv as in DeepLabV3+'s decoder (mmseg
  `DepthwiseSeparableConvModule`): a dilated depthwise conv-BN-ReLU, then a 1x1
  conv-BN-ReLU to `features`. Stride 1, padding as PyTorch's `dilation * (k // 2)`
  for odd kernels."""
  features: int
  kernel_size: int = 3
  dilation: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = ConvBNAct(x.shape[-1], (self.kernel_size,) * 2, dilation=self.dilation,
                  feature_group_count=x.shape[-1], name="depthwise", **kw)(x, train)
    return ConvBNAct(self.features, (1, 1), name="pointwise", **kw)(x, train)
