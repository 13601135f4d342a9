"""U-Net (Ronneberger et al., 2015): "same"-padded with BatchNorm ("unet"), as
in the paper with unpadded convolutions ("unet_valid"), and on a ResNet encoder
("unet_resnet").

"unet": contracting path, per level two 3x3 conv-BN-ReLU, then 2x2 max pool.
Expanding path: 2x2 stride-2 transposed conv halving the channels,
concatenation with the encoder feature of the same resolution, two 3x3
conv-BN-ReLU. A final 1x1 conv maps to class logits at the input resolution.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from segjax.backbones import BACKBONES
from segjax.layers import Conv, ConvBNAct, Deconv2x2, resize_bilinear
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
      x = Deconv2x2(features, name=f"upsample{level}", **kw)(x)
      x = jnp.concatenate([skips[level], x], axis=-1)
      x = DoubleConv(features, name=f"up{level}", **kw)(x, train)
    logits = Conv(self.num_classes, (1, 1), name="classifier", **kw)(x)
    return logits.astype(jnp.float32)


def unet_valid_output_size(size: int, depth: int) -> int:
  """Logit map size of the unpadded U-Net for an input `size` (572 -> 388 at
  depth 4). Each level's two 3x3 convs take 4 pixels and must leave an even
  size for the 2x2 pool, and the expanding path must keep a positive size:
  with s = 2**depth, that holds exactly for sizes with (size + 4) divisible by
  s and size >= 12 * s - 4 (188 at depth 4); the output is size - 12 * s + 8."""
  step = 2 ** depth
  smallest = 12 * step - 4
  if size < smallest or (size + 4) % step:
    below = max(smallest, size - (size + 4) % step)
    raise ValueError(
        f"The unpadded U-Net of depth {depth} needs input sizes with (size + 4) divisible "
        f"by {step} and at least {smallest}, got {size}; nearest valid sizes: {below}, "
        f"{max(smallest, below + step)}.")
  return size - 12 * step + 8


class ValidDoubleConv(nn.Module):
  """Two unpadded 3x3 convs with bias and ReLU, He-initialised as in the paper."""
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = Conv(self.features, (3, 3), padding="VALID", dtype=self.dtype,
                  param_dtype=self.param_dtype, name=f"conv{i}",
                  kernel_init=nn.initializers.variance_scaling(2.0, "fan_in", "normal"))(x)
      x = nn.relu(x)
    return x


def center_crop(x, size):
  """The central `size` (height, width) window of NHWC `x`."""
  top, left = (x.shape[1] - size[0]) // 2, (x.shape[2] - size[1]) // 2
  return x[:, top:top + size[0], left:left + size[1]]


@MODELS.register("unet_valid")
class UNetValid(nn.Module):
  """The paper's U-Net: unpadded 3x3 convs with bias and ReLU and no BatchNorm
  (the paper has none), 2x2 max pools, 2x2 up-convs halving the channels, the
  centre crop of the encoder feature concatenated before each pair of up
  convs, and a 1x1 classifier. Dropout (`dropout_rate`) at the end of the
  contracting path, on the deepest level's output and the bottleneck's.

  The logits cover only the central `unet_valid_output_size` square of the
  input (572 -> 388 for depth 4, a 92-pixel border), so labels must be
  centre-cropped to match (or the input tiled with overlap, as in the paper);
  input sizes that do not give integer sizes at every level are rejected.
  """
  output_is_center_crop = True  # logits cover the central region: labels are cropped
  num_classes: int
  width: int = 64
  depth: int = 4
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    check_images(images, "unpadded U-Net")
    for size in images.shape[1:3]:
      unet_valid_output_size(size, self.depth)  # raises for sizes that do not fit
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
    x = images.astype(self.dtype)
    skips = []
    for level in range(self.depth):
      x = ValidDoubleConv(self.width * 2 ** level, name=f"down{level}", **kw)(x)
      if level == self.depth - 1:
        x = dropout(x)
      skips.append(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = dropout(ValidDoubleConv(self.width * 2 ** self.depth, name="bottleneck", **kw)(x))
    for level in reversed(range(self.depth)):
      features = self.width * 2 ** level
      x = Deconv2x2(features, name=f"upsample{level}", **kw)(x)
      x = jnp.concatenate([center_crop(skips[level], x.shape[1:3]), x], axis=-1)
      x = ValidDoubleConv(features, name=f"up{level}", **kw)(x)
    logits = Conv(self.num_classes, (1, 1), name="classifier", **kw)(x)
    return logits.astype(jnp.float32)


# Backbone features the ResNet U-Net decodes from, deepest (stride 16) first.
RESNET_SKIPS = ("stage3", "stage2", "stage1", "stem")


@MODELS.register("unet_resnet")
class UNetResNet(nn.Module):
  """U-Net with a ResNet encoder: from stage 4 (stride 32) up through stage 3,
  stage 2, stage 1 and the stem (stride 2), each level a 2x2 up-conv, the
  concatenation with the backbone feature and two 3x3 conv-BN-ReLU, with
  `decoder_width` channels at stride 16, halved at each finer level. A 1x1
  classifier and a 2x bilinear upsample give the logits at the input size (in
  that order: both are linear, so this equals upsampling first, at less cost).
  Inputs of any size are zero-padded at the bottom and right to a multiple of
  32, and the logits cropped back.
  """
  num_classes: int
  backbone: str = "resnet34"
  backbone_width: int = 64  # ResNet base width; smaller for scaled-down variants
  decoder_width: int = 256
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    check_images(images, "U-Net (ResNet)")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    height, width = images.shape[1:3]
    x = jnp.pad(images.astype(self.dtype),
                ((0, 0), (0, -height % 32), (0, -width % 32), (0, 0)))
    features = BACKBONES.get(self.backbone)(width=self.backbone_width, name="backbone",
                                            **kw)(x, train)
    x = features["stage4"]
    for level, skip in enumerate(RESNET_SKIPS):
      channels = self.decoder_width // 2 ** level
      x = Deconv2x2(channels, name=f"upsample_{skip}", **kw)(x)
      x = jnp.concatenate([features[skip], x], axis=-1)
      x = DoubleConv(channels, name=f"up_{skip}", **kw)(x, train)
    logits = Conv(self.num_classes, (1, 1), name="classifier", **kw)(x)
    logits = resize_bilinear(logits.astype(jnp.float32),
                             (2 * logits.shape[1], 2 * logits.shape[2]), align_corners=False)
    return logits[:, :height, :width]
