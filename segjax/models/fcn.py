"""FCN (Long et al., 2015): a small FCN-8s whose VGG-style encoder's class
scores at strides 32, 16 and 8 are fused by learned 2x upsampling (transposed
convs initialised to bilinear interpolation), and the FCN head on a dilated
ResNet."""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from segjax.backbones import BACKBONES
from segjax.layers import ConvBNAct, resize_bilinear
from segjax.models.heads import FCNHead
from segjax.models.registry import MODELS, check_images


def bilinear_kernel_init(key, shape, dtype=jnp.float32):
  """Per-channel bilinear upsampling kernel (kh, kw, in, out) for ConvTranspose."""
  del key
  kh, kw, cin, cout = shape
  def taps(k):
    factor = (k + 1) // 2
    center = factor - 1 if k % 2 == 1 else factor - 0.5
    return 1 - np.abs(np.arange(k) - center) / factor
  kernel = np.zeros(shape, np.float32)
  kernel[:, :, np.arange(min(cin, cout)), np.arange(min(cin, cout))] = (
      np.outer(taps(kh), taps(kw))[:, :, None])
  return jnp.asarray(kernel, dtype)


@MODELS.register("fcn8s")
class FCN8s(nn.Module):
  """FCN-8s with 5 conv stages (`stage_widths`) each ending in a 2x2 max pool."""
  num_classes: int
  stage_widths: Sequence[int] = (32, 64, 128, 256, 256)
  convs_per_stage: int = 2
  head_width: int = 512
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    if len(self.stage_widths) != 5:
      raise ValueError("FCN-8s needs exactly 5 stage widths (strides 2..32).")
    check_images(images, "FCN-8s", 32)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = images.astype(self.dtype)
    pools = []
    for s, width in enumerate(self.stage_widths):
      for c in range(self.convs_per_stage):
        x = ConvBNAct(width, name=f"stage{s}_conv{c}", **kw)(x, train)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
      pools.append(x)
    # "fc6"/"fc7" as convolutions, as in the FCN paper.
    x = ConvBNAct(self.head_width, (3, 3), name="fc6", **kw)(x, train)
    x = ConvBNAct(self.head_width, (1, 1), name="fc7", **kw)(x, train)
    x = nn.Dropout(0.1, deterministic=not train)(x)
    score = nn.Conv(self.num_classes, (1, 1), name="score32", **kw)(x)
    up = lambda y, name, factor: nn.ConvTranspose(
        self.num_classes, (2 * factor, 2 * factor), strides=(factor, factor), padding="SAME",
        use_bias=False, kernel_init=bilinear_kernel_init, name=name, **kw)(y)
    score = up(score, "up32", 2) + nn.Conv(self.num_classes, (1, 1), name="score16",
                                           kernel_init=nn.initializers.zeros, **kw)(pools[3])
    score = up(score, "up16", 2) + nn.Conv(self.num_classes, (1, 1), name="score8",
                                           kernel_init=nn.initializers.zeros, **kw)(pools[2])
    logits = up(score, "up8", 8)
    return logits.astype(jnp.float32)


@MODELS.register("fcn_resnet")
class FCNResNet(nn.Module):
  """FCN on a dilated ResNet, torchvision's `fcn_resnet50` layout: an FCN head
  (3x3 conv to `channels`, dropout 0.1, 1x1 classifier) on stage 4, upsampled
  bilinearly to the input, and an optional auxiliary FCN head on stage 3."""
  num_classes: int
  backbone: str = "resnet50"
  output_stride: int = 8
  contract_dilation: bool = True
  backbone_width: int = 64  # ResNet base width; smaller for scaled-down variants
  channels: int = 512
  aux_channels: int = 0  # torchvision's aux head uses 256; 0 = none
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    check_images(images, "FCN-ResNet")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    features = BACKBONES.get(self.backbone)(
        output_stride=self.output_stride, contract_dilation=self.contract_dilation,
        width=self.backbone_width, name="backbone", **kw)(images.astype(self.dtype), train)
    x = FCNHead(self.num_classes, self.channels, name="head", **kw)(features["stage4"], train)
    size = images.shape[1:3]
    logits = resize_bilinear(x.astype(jnp.float32), size, align_corners=False)
    if not (train and self.aux_channels):
      return logits
    aux = FCNHead(self.num_classes, self.aux_channels, name="aux_head", **kw)(
        features["stage3"], train)
    return {"logits": logits,
            "aux_logits": resize_bilinear(aux.astype(jnp.float32), size, align_corners=False)}
