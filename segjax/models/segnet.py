"""SegNet (Badrinarayanan et al., TPAMI 2017).

Encoder: VGG-16's 13 convolutions (conv-BN-ReLU) in 5 blocks, each ending in a
2x2/2 max pool that stores the position of each maximum. Decoder: the encoder
mirrored; each block first max-unpools with the indices of the matching encoder
block (values go back where their maxima came from, zeros elsewhere; no learned
upsampling), then densifies the sparse map with conv-BN-ReLU. Decoder conv k of
a block mirrors encoder conv k: encoder `c_in -> c_out` becomes `c_out -> c_in`,
so the mirror of the first conv (3 -> width) is the classifier, a 3x3 conv
(width -> classes) as in the paper's Caffe model.

Any input of at least 32x32 works: the encoder records each pre-pool size and
unpooling restores it, so the row or column that a pool drops at an odd size
comes back as zeros, which the following convs fill in.
"""
from typing import Any, List, Tuple

import flax.linen as nn
import jax.numpy as jnp

from segjax.layers import Conv, ConvBNAct, max_pool_with_indices, max_unpool
from segjax.models.registry import MODELS, check_images

# VGG-16's conv blocks: (convs, channels as a multiple of `width`).
VGG16_BLOCKS = ((2, 1), (2, 2), (3, 4), (3, 8), (3, 8))


def decoder_widths(width: int) -> List[List[int]]:
  """Output channels of the mirrored decoder's layers, per block (block 1 first):
  block b keeps its channels except in its last layer, which returns to the
  channels of block b-1 (`width` for block 1)."""
  widths, previous = [], width
  for convs, multiple in VGG16_BLOCKS:
    widths.append([width * multiple] * (convs - 1) + [previous])
    previous = width * multiple
  return widths


class VGGEncoder(nn.Module):
  """VGG-16's convolutions with BatchNorm; every block's 2x2/2 max pool keeps its
  indices. Returns the last pooled map and, per block, (indices, pre-pool (h, w))."""
  width: int = 64
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool) -> Tuple[Any, List[Tuple[Any, Tuple[int, int]]]]:
    pools = []
    for b, (convs, multiple) in enumerate(VGG16_BLOCKS, start=1):
      for c in range(1, convs + 1):
        x = ConvBNAct(self.width * multiple, name=f"block{b}_conv{c}", dtype=self.dtype,
                      param_dtype=self.param_dtype)(x, train)
      size = tuple(x.shape[1:3])
      x, indices = max_pool_with_indices(x, 2, 2)
      pools.append((indices, size))
    return x, pools


@MODELS.register("segnet")
class SegNet(nn.Module):
  """SegNet with `width` channels in the first block (64 in the paper)."""
  num_classes: int
  width: int = 64
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    check_images(images, "SegNet")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x, pools = VGGEncoder(self.width, name="encoder", **kw)(images.astype(self.dtype), train)
    widths = decoder_widths(self.width)
    for b in reversed(range(len(VGG16_BLOCKS))):
      indices, size = pools[b]
      x = max_unpool(x, indices, size)
      # Decoder convs are named after the encoder convs they mirror (last first).
      layers = widths[b][:-1] if b == 0 else widths[b]
      for i, features in enumerate(layers):
        x = ConvBNAct(features, name=f"decoder{b + 1}_conv{len(widths[b]) - i}", **kw)(x, train)
    logits = Conv(self.num_classes, (3, 3), padding="SAME", name="classifier", **kw)(x)
    return logits.astype(jnp.float32)
