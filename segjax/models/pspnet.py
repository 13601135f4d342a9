"""PSPNet (Zhao et al., 2017) as in mmsegmentation's pspnet_r50-d8.

A dilated ResNet (output stride 8) feeds the Pyramid Pooling Module (average
pooling to 1, 2, 3 and 6 bins, a 1x1 conv-BN-ReLU per bin, bilinear upsampling,
concatenation with the input), a 3x3 bottleneck conv-BN-ReLU, dropout and a 1x1
classifier; logits are upsampled bilinearly to the input. During training an
auxiliary FCN head on stage 3 adds a second output (`aux_logits`), weighted by
`loss.aux_weight` in the loss. Dropout drops whole channels (mmseg's Dropout2d).

mmseg's PSPHead layout exactly: `segjax.convert.mmseg` reads its checkpoints
(PSPHead + FCNHead auxiliary head), and with the default options the model has
mmseg's parameter count (49,076,364 with 150 classes).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from segjax.backbones import BACKBONES
from segjax.layers import Conv, ConvBNAct, PyramidPoolingModule
from segjax.models.heads import head_dropout, outputs_at_input_size
from segjax.models.registry import MODELS, check_images


@MODELS.register("pspnet")
class PSPNet(nn.Module):
  num_classes: int
  backbone: str = "resnet50_v1c"
  output_stride: int = 8
  contract_dilation: bool = True
  backbone_width: int = 64  # ResNet base width; smaller for scaled-down variants
  pool_bins: Sequence[int] = (1, 2, 3, 6)
  head_channels: int = 512
  dropout: float = 0.1
  aux_channels: int = 256  # 0 = no auxiliary head
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    check_images(images, "PSPNet")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    features = BACKBONES.get(self.backbone)(
        output_stride=self.output_stride, contract_dilation=self.contract_dilation,
        width=self.backbone_width, name="backbone", **kw)(images.astype(self.dtype), train)
    x = PyramidPoolingModule(self.pool_bins, self.head_channels, name="ppm", **kw)(
        features["stage4"], train)
    x = ConvBNAct(self.head_channels, (3, 3), name="bottleneck", **kw)(x, train)
    x = head_dropout(self.dropout, train, channel_dropout=True)(x)
    x = Conv(self.num_classes, (1, 1), name="classifier", **kw)(x)
    return outputs_at_input_size(x, images, features, train, self.num_classes,
                                 self.aux_channels, dropout=self.dropout,
                                 channel_dropout=True, **kw)
