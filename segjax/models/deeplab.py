"""DeepLabV3 (Chen et al., 2017) in torchvision's `deeplabv3_resnet50` layout.

A dilated ResNet (output stride 8 or 16), ASPP (1x1, three 3x3 atrous branches
and image pooling, projected to 256 channels), a 3x3 conv-BN-ReLU and a 1x1
classifier, upsampled bilinearly to the input. ASPP rates are given at output
stride 8 (torchvision: 12, 24, 36) and halved at 16 unless set explicitly. An
optional auxiliary FCN head on stage 3 is used in training.

DeepLabV3+ (Chen et al., 2018), `DeepLabV3Plus`, adds a decoder at stride 4.

`deeplabv3_mmseg` and `deeplabv3plus_mmseg` are mmsegmentation's layouts
exactly (`ASPPHead` / `DepthwiseSeparableASPPHead`, see
`segjax.models.heads.ASPPHead`, plus the FCN auxiliary head): same parameters
and the same forward computation, so `segjax.convert.mmseg` loads mmseg's
checkpoints of deeplabv3_r50-d8 and deeplabv3plus_r50-d8 into them.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from segjax.backbones import BACKBONES
from segjax.layers import ASPP, Conv, ConvBNAct, SeparableConvBNAct, resize_bilinear
from segjax.models.heads import ASPPHead, outputs_at_input_size
from segjax.models.registry import MODELS, check_images


@MODELS.register("deeplabv3")
class DeepLabV3(nn.Module):
  num_classes: int
  backbone: str = "resnet50"
  output_stride: int = 8
  contract_dilation: bool = True
  backbone_width: int = 64  # ResNet base width; smaller for scaled-down variants
  aspp_rates: Optional[Sequence[int]] = None  # None: (12, 24, 36) at OS 8, (6, 12, 18) at 16
  channels: int = 256
  aux_channels: int = 0  # torchvision's aux head uses 256; 0 = none
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    check_images(images, "DeepLabV3")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    features = BACKBONES.get(self.backbone)(
        output_stride=self.output_stride, contract_dilation=self.contract_dilation,
        width=self.backbone_width, name="backbone", **kw)(images.astype(self.dtype), train)
    rates = self.aspp_rates or tuple(r * 8 // self.output_stride for r in (12, 24, 36))
    x = ASPP(tuple(rates), self.channels, name="aspp", **kw)(features["stage4"], train)
    x = ConvBNAct(self.channels, (3, 3), name="head_conv", **kw)(x, train)
    x = Conv(self.num_classes, (1, 1), name="classifier", **kw)(x)
    return outputs_at_input_size(x, images, features, train, self.num_classes,
                                 self.aux_channels, **kw)


@MODELS.register("deeplabv3plus")
class DeepLabV3Plus(nn.Module):
  """DeepLabV3+: ASPP on the last backbone features, and a decoder that joins
  them with the stride-4 features to sharpen object boundaries.

  ASPP (torchvision's layout, 256 channels) runs on "stage4"; rates (6, 12, 18)
  at output stride 16, scaled by 16 / output_stride otherwise. Its dropout is
  0.1, as after the ASPP projection of the paper's TensorFlow implementation
  (mmseg puts its 0.1 before the classifier instead). The decoder projects
  "stage1" by a 1x1 conv-BN-ReLU to `low_level_channels` (48), concatenates the
  ASPP output upsampled to that size, applies two 3x3 depthwise-separable
  conv-BN-ReLUs (`channels`) and a 1x1 classifier, upsampled to the input.
  Resizing is bilinear with align_corners=False throughout (mmseg, PyTorch).
  """
  num_classes: int
  backbone: str = "resnet50"
  output_stride: int = 16
  backbone_width: int = 64  # base width (64 = full); MobileNetV2 uses width_mult = width / 64
  aspp_rates: Optional[Sequence[int]] = None  # None: (6, 12, 18) at OS 16, (12, 24, 36) at 8
  channels: int = 256
  low_level_channels: int = 48
  aux_channels: int = 0  # FCN aux head on stage 3 in training; 0 = none
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    check_images(images, "DeepLabV3+")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    features = BACKBONES.get(self.backbone)(
        output_stride=self.output_stride, width=self.backbone_width, name="backbone",
        **kw)(images.astype(self.dtype), train)
    rates = self.aspp_rates or tuple(r * 16 // self.output_stride for r in (6, 12, 18))
    x = ASPP(tuple(rates), self.channels, dropout_rate=0.1, name="aspp", **kw)(
        features["stage4"], train)
    low = ConvBNAct(self.low_level_channels, (1, 1), name="low_level_project", **kw)(
        features["stage1"], train)
    x = resize_bilinear(x, low.shape[1:3], align_corners=False)
    x = jnp.concatenate([x, low], axis=-1)
    for i in range(2):
      x = SeparableConvBNAct(self.channels, name=f"decoder_conv{i}", **kw)(x, train)
    x = Conv(self.num_classes, (1, 1), name="classifier", **kw)(x)
    return outputs_at_input_size(x, images, features, train, self.num_classes,
                                 self.aux_channels, **kw)


class _MMSegASPP(nn.Module):
  """mmseg's EncoderDecoder with an ASPP decode head (see `ASPPHead`) on a dilated
  ResNet's stage 4 and, in training with `aux_channels` > 0, mmseg's FCN auxiliary
  head on stage 3 (`aux_logits`)."""
  num_classes: int
  backbone: str = "resnet50_v1c"
  output_stride: int = 8
  contract_dilation: bool = True
  backbone_width: int = 64  # ResNet base width; smaller for scaled-down variants
  dilations: Sequence[int] = (1, 12, 24, 36)
  channels: int = 512
  dropout: float = 0.1
  aux_channels: int = 256  # 0 = no auxiliary head
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  title = "DeepLabV3"
  separable = False  # class attributes: fixed by each registered layout
  c1_channels = 0

  @nn.compact
  def __call__(self, images, train: bool = False):
    check_images(images, self.title)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    features = BACKBONES.get(self.backbone)(
        output_stride=self.output_stride, contract_dilation=self.contract_dilation,
        width=self.backbone_width, name="backbone", **kw)(images.astype(self.dtype), train)
    x = ASPPHead(self.num_classes, self.channels, tuple(self.dilations), self.separable,
                 self.c1_channels, self.dropout, name="decode_head", **kw)(
                     features["stage4"], train, c1=features["stage1"])
    return outputs_at_input_size(x, images, features, train, self.num_classes,
                                 self.aux_channels, dropout=self.dropout,
                                 channel_dropout=True, **kw)


@MODELS.register("deeplabv3_mmseg")
class DeepLabV3MMSeg(_MMSegASPP):
  """mmseg's deeplabv3_r50-d8: `ASPPHead` (image pooling, 1x1 and 3x3 atrous
  branches at rates 12/24/36, 512 channels, 3x3 bottleneck, Dropout2d 0.1,
  classifier) and the FCN auxiliary head (256 channels) on a ResNet-50 v1c at
  output stride 8."""


@MODELS.register("deeplabv3plus_mmseg")
class DeepLabV3PlusMMSeg(_MMSegASPP):
  """mmseg's deeplabv3plus_r50-d8: `DepthwiseSeparableASPPHead` (ASPP with
  depthwise-separable atrous branches, 512 channels, 3x3 bottleneck; decoder
  on stage 1 with a 48-channel 1x1 projection and two separable 3x3 convs) and
  the FCN auxiliary head on a ResNet-50 v1c at output stride 8."""
  c1_channels: int = 48  # the stride-4 projection of the decoder

  title = "DeepLabV3+"
  separable = True
