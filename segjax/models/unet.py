"""U-Net (Ronneberger et al., 2015) with "same" padding.

Contracting path: per level two 3x3 conv-BN-ReLU, then 2x2 max pool. Expanding
path: 2x2 stride-2 transposed conv halving the channels, concatenation with the
encoder feature of the same resolution, two 3x3 conv-BN-ReLU. A final 1x1 conv
maps to class logits at the input resolution.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from segjax.layers import ConvBNAct
from segjax.models.registry import MODELS, check_images


class DoubleConv(nn.Module):
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(2):
      x = ConvBNAct(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                    name=f"conv{i}")(x, train)
    return x


@MODELS.register("unet")
class UNet(nn.Module):
  """U-Net; `width` channels at full resolution, doubled at each of `depth` levels."""
  num_classes: int
  width: int = 64
  depth: int = 4
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    check_images(images, f"U-Net of depth {self.depth}", 2 ** self.depth)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = images.astype(self.dtype)
    skips = []
    for level in range(self.depth):
      x = DoubleConv(self.width * 2 ** level, name=f"down{level}", **kw)(x, train)
      skips.append(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = DoubleConv(self.width * 2 ** self.depth, name="bottleneck", **kw)(x, train)
    for level in reversed(range(self.depth)):
      features = self.width * 2 ** level
      x = nn.ConvTranspose(features, (2, 2), strides=(2, 2), name=f"upsample{level}", **kw)(x)
      x = jnp.concatenate([skips[level], x], axis=-1)
      x = DoubleConv(features, name=f"up{level}", **kw)(x, train)
    logits = nn.Conv(self.num_classes, (1, 1), name="classifier", **kw)(x)
    return logits.astype(jnp.float32)
