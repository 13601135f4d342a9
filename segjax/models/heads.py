"""Decode heads shared by several models."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from segjax.layers import ConvBNAct


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
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                   name="classifier")(x)
