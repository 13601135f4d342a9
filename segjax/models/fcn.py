"""FCN (Long et al., 2015): FCN-32s, FCN-16s and FCN-8s on VGG-16, and the FCN
head on a dilated ResNet, in torchvision's layout (`fcn_resnet`) and in
mmsegmentation's (`fcn_mmseg`: two convs and the input concatenated).

FCN-VGG: fc6 (7x7) and fc7 (1x1) as convolutions, each with ReLU and dropout
0.5; 1x1 class scores on fc7 (`score_fr`) and, for 16s / 8s, on pool4 and then
pool3; each coarser score map is upsampled 2x by a learned transposed conv
(bilinear-initialised, no bias) and added to the finer one; a last learned
upsampling by 32, 16 or 8 returns to the input. All score layers start at
zero, as in the paper. (The paper keeps the last upsampling fixed at bilinear;
here it is learned, like the others.)

Two ways give logits of the input's size for any input size:

* Paper mode (`pad_first=100`, the caffe reference models): conv1_1 pads by
  100, pools round up (caffe), fc6 and the transposed convs do not pad, and the
  larger map of each sum, and the output, are cropped at fixed offsets. Index u
  of a map is centred on input pixel x(u): conv1_1 gives x = u - 99, a 2x2/2
  pool u -> 2u + 0.5, the unpadded 7x7 fc6 u -> u + 3, a transposed conv with
  kernel k, stride s u -> (u - (k - 1) / 2) / s. So pool3, pool4 and fc6 sit at
  x = 8u - 95.5, 16u - 91.5 and 32u + 12.5; after upscore2 (k 4, s 2) x =
  16u - 11.5, hence score_pool4 is cropped at 5; after upscore_pool4 x =
  8u - 23.5, hence score_pool3 is cropped at 9; and the output, x = u - 19
  (FCN-32s, k 64), u - 27 (FCN-16s, k 32) or u - 31 (FCN-8s, k 16), is cropped
  at 19, 27 or 31. With the 100 px padding and rounded-up pools every cropped
  map is large enough whatever the input size.
* "Same" mode (`pad_first=0`): the input is zero-padded at the bottom and right
  to a multiple of 32, convs keep sizes (fc6 pads by 3), pools halve exactly,
  and a transposed conv by f (kernel 2f) pads by f / 2 (PyTorch's sense), so it
  multiplies sizes by exactly f and keeps every map aligned (x = s * u +
  (s - 1) / 2 at stride s); the output is cropped back to the input at the top
  left.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from segjax.layers import Conv
from segjax.backbones import BACKBONES
from segjax.models.heads import FCNHead, outputs_at_input_size
from segjax.models.registry import MODELS, check_images

PAPER_PAD = 100
# Paper-mode crop offsets (see above): of the skip scores, and of the output.
_SKIP_CROPS = {"pool4": 5, "pool3": 9}
_OUTPUT_CROPS = {32: 19, 16: 27, 8: 31}


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


def learned_upsampling(features: int, factor: int, padding: int = 0, name=None,
                       **kw) -> nn.ConvTranspose:
  """Upsampling by `factor`: a bias-free transposed conv with kernel 2 * factor,
  bilinear-initialised. `padding` is PyTorch's ConvTranspose2d padding, so sizes
  go from n to (n - 1) * factor - 2 * padding + 2 * factor."""
  k = 2 * factor
  pad = k - 1 - padding  # lax pads the stride-dilated input; PyTorch's p is k - 1 - that
  return nn.ConvTranspose(features, (k, k), strides=(factor, factor),
                          padding=((pad, pad), (pad, pad)), use_bias=False,
                          kernel_init=bilinear_kernel_init, name=name, **kw)


def _crop(x, offset: int, size):
  """x[:, offset:offset + height, offset:offset + width] for size (height, width)."""
  return x[:, offset:offset + size[0], offset:offset + size[1]]


class _FCNVGG(nn.Module):
  """FCN on VGG-16 fusing the scores of `skips` (coarse to fine); see above.

  Defaults are the paper's: VGG-16 without BatchNorm at width 64, 4096-wide
  fc6 / fc7, paper-mode padding. `width` and `fc_width` scale the network down.
  """
  num_classes: int
  backbone: str = "vgg16"
  width: int = 64
  fc_width: int = 4096
  pad_first: int = PAPER_PAD
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  skips = ()
  title = "FCN"

  def __post_init__(self):
    if self.backbone not in ("vgg16", "vgg16_bn"):
      raise ValueError(f"{self.title} needs backbone 'vgg16' or 'vgg16_bn', got "
                       f"{self.backbone!r}.")
    if self.pad_first not in (0, PAPER_PAD):
      raise ValueError(f"{self.title} needs pad_first 0 ('same' mode) or {PAPER_PAD} (the "
                       f"paper's), got {self.pad_first}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, images, train: bool = False):
    check_images(images, self.title)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    paper = self.pad_first == PAPER_PAD
    h, w = images.shape[1:3]
    x = images.astype(self.dtype)
    if not paper:
      x = jnp.pad(x, ((0, 0), (0, -h % 32), (0, -w % 32), (0, 0)))
    features = BACKBONES.get(self.backbone)(width=self.width, pad_first=self.pad_first,
                                            ceil_mode=paper, name="backbone", **kw)(x, train)
    y = features["pool5"]
    for name, k, pad in (("fc6", 7, 0 if paper else 3), ("fc7", 1, 0)):
      y = Conv(self.fc_width, (k, k), padding=((pad, pad), (pad, pad)), name=name, **kw)(y)
      y = nn.Dropout(0.5, deterministic=not train)(nn.relu(y))
    score = lambda name: Conv(self.num_classes, (1, 1), kernel_init=nn.initializers.zeros,
                                 name=name, **kw)
    y = score("score_fr")(y)
    for up_name, pool in zip(("upscore2", "upscore_pool4"), self.skips):
      y = learned_upsampling(self.num_classes, 2, 0 if paper else 1, up_name, **kw)(y)
      skip = score(f"score_{pool}")(features[pool])
      y = y + (_crop(skip, _SKIP_CROPS[pool], y.shape[1:3]) if paper else skip)
    factor = 32 >> len(self.skips)
    y = learned_upsampling(self.num_classes, factor, 0 if paper else factor // 2,
                           f"upscore{factor}", **kw)(y)
    return _crop(y, _OUTPUT_CROPS[factor] if paper else 0, (h, w)).astype(jnp.float32)


@MODELS.register("fcn32s")
class FCN32s(_FCNVGG):
  """FCN-32s: fc7 scores upsampled 32x."""
  title = "FCN-32s"


@MODELS.register("fcn16s")
class FCN16s(_FCNVGG):
  """FCN-16s: fc7 scores 2x up plus pool4 scores, upsampled 16x."""
  skips = ("pool4",)
  title = "FCN-16s"


@MODELS.register("fcn8s")
class FCN8s(_FCNVGG):
  """FCN-8s: FCN-16s's fused scores 2x up plus pool3 scores, upsampled 8x."""
  skips = ("pool4", "pool3")
  title = "FCN-8s"


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
    return outputs_at_input_size(x, images, features, train, self.num_classes,
                                 self.aux_channels, **kw)


@MODELS.register("fcn_mmseg")
class FCNMMSeg(nn.Module):
  """mmseg's fcn_r50-d8: its `FCNHead` decode head on a dilated ResNet's stage 4
  (`num_convs` 3x3 conv-BN-ReLUs to `channels`, the input concatenated with their
  output and fused by a 3x3 conv-BN-ReLU (`conv_cat`), Dropout2d 0.1, 1x1
  classifier; `head`), upsampled bilinearly to the input, and in training the FCN
  auxiliary head on stage 3. The same parameters and computation as mmseg's, so
  `segjax.convert.mmseg` loads its checkpoints."""
  num_classes: int
  backbone: str = "resnet50_v1c"
  output_stride: int = 8
  contract_dilation: bool = True
  backbone_width: int = 64  # ResNet base width; smaller for scaled-down variants
  channels: int = 512
  num_convs: int = 2
  concat_input: bool = True
  dropout: float = 0.1
  aux_channels: int = 256  # 0 = none
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    check_images(images, "FCN")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    features = BACKBONES.get(self.backbone)(
        output_stride=self.output_stride, contract_dilation=self.contract_dilation,
        width=self.backbone_width, name="backbone", **kw)(images.astype(self.dtype), train)
    x = FCNHead(self.num_classes, self.channels, self.num_convs, self.concat_input,
                self.dropout, channel_dropout=True, name="head", **kw)(features["stage4"], train)
    return outputs_at_input_size(x, images, features, train, self.num_classes,
                                 self.aux_channels, dropout=self.dropout,
                                 channel_dropout=True, **kw)
