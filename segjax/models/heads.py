"""Decode heads shared by several models."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from segjax.layers import Conv, ConvBNAct, resize_bilinear


class FCNHead(nn.Module):
  """`num_convs` 3x3 conv-BN-ReLU, dropout, and a 1x1 classifier.

  The FCN head on a dilated ResNet (torchvision `FCNHead`, mmseg `FCNHead` with
  concat_input=False) and the auxiliary head of PSPNet and DeepLabV3.
  """
  num_classes: int
  channels: int = 256
  num_convs: int = 1
  dropout: float = 0.1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(self.num_convs):
      x = ConvBNAct(self.channels, (3, 3), dtype=self.dtype, param_dtype=self.param_dtype,
                    name=f"conv{i}")(x, train)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return Conv(self.num_classes, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                   name="classifier")(x)


def outputs_at_input_size(logits, images, features, train: bool, num_classes: int,
                          aux_channels: int, dropout: float = 0.1, **kw):
  """The decode head's logits upsampled to the input (bilinear, align_corners=False);
  in training with `aux_channels` > 0, a dict that adds `aux_logits` from an FCN
  head (`aux_head`) on stage 3. Called inside a model's compact `__call__`."""
  size = images.shape[1:3]
  upsample = lambda y: resize_bilinear(y.astype(jnp.float32), size, align_corners=False)
  if not (train and aux_channels):
    return upsample(logits)
  aux = FCNHead(num_classes, aux_channels, dropout=dropout, name="aux_head", **kw)(
      features["stage3"], train)
  return {"logits": upsample(logits), "aux_logits": upsample(aux)}
