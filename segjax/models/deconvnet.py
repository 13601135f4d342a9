"""DeconvNet (Noh et al., ICCV 2015).

Encoder: VGG-16's convolutions with BatchNorm and index-storing 2x2/2 max pools
(shared with SegNet), then fc6 (7x7 conv, `fc_width` channels) and fc7 (1x1)
with BN+ReLU. Decoder: a 7x7 deconvolution (transposed conv) back to 8 * width
channels, then per block, deepest first, unpooling with the stored indices and
3x3 deconvolutions with BN+ReLU mirroring the block's convs (512, 512, 512 |
512, 512, 256 | 256, 256, 128 | 128, 64 | 64, 64 at width 64), and a 1x1
classifier.

fc6 and its deconvolution: the paper's 224x224 input gives a 7x7 pool5 map, which
fc6 ("valid") turns into 1x1 and the deconvolution ("full") back into 7x7. Here
an axis along which pool5 has at least 7 positions is padded the paper's way (a
larger input slides fc6 over pool5, as a fully convolutional network does); a
shorter axis is padded "same" (3 each side for both layers), so that small
inputs still work. Either way the decoder gets pool5's size back, and the
logits have the input's size for any input of at least 32x32.
"""
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from segjax.layers import Conv, batch_norm, max_unpool
from segjax.models.registry import MODELS, check_images
from segjax.models.segnet import VGG16_BLOCKS, VGGEncoder, decoder_widths

FC6_KERNEL = 7


class DeconvBNAct(nn.Module):
  """A bias-free transposed convolution followed by BatchNorm and ReLU."""
  features: int
  kernel_size: int = 3
  padding: Any = "SAME"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.ConvTranspose(self.features, (self.kernel_size,) * 2, padding=self.padding,
                         use_bias=False, kernel_init=nn.initializers.kaiming_normal(),
                         dtype=self.dtype, param_dtype=self.param_dtype, name="deconv")(x)
    x = batch_norm(train, self.dtype, self.param_dtype, name="bn")(x)
    return nn.relu(x)


def fc6_padding(size: Sequence[int]) -> Tuple[Tuple[Tuple[int, int], ...], ...]:
  """Explicit (fc6, its deconvolution) paddings for a pool5 map of `size`:
  "valid" / "full" along axes of at least 7 positions, "same" along shorter ones."""
  conv = [0 if s >= FC6_KERNEL else FC6_KERNEL // 2 for s in size]
  # A stride-1 transposed conv padded k - 1 - p inverts the size change of a conv padded p.
  return (tuple((p, p) for p in conv), tuple((FC6_KERNEL - 1 - p,) * 2 for p in conv))


@MODELS.register("deconvnet")
class DeconvNet(nn.Module):
  """DeconvNet with `width` channels in the first block and `fc_width` in fc6/fc7
  (64 and 4096 in the paper)."""
  num_classes: int
  width: int = 64
  fc_width: int = 4096
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    check_images(images, "DeconvNet")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    bn = lambda name: batch_norm(train, self.dtype, self.param_dtype, name=name)
    conv = lambda features, kernel, padding, name: Conv(
        features, (kernel, kernel), padding=padding, use_bias=False,
        kernel_init=nn.initializers.kaiming_normal(), name=name, **kw)
    x, pools = VGGEncoder(self.width, name="encoder", **kw)(images.astype(self.dtype), train)
    conv_padding, deconv_padding = fc6_padding(x.shape[1:3])
    x = nn.relu(bn("fc6_bn")(conv(self.fc_width, FC6_KERNEL, conv_padding, "fc6")(x)))
    x = nn.relu(bn("fc7_bn")(conv(self.fc_width, 1, "VALID", "fc7")(x)))
    x = DeconvBNAct(self.width * VGG16_BLOCKS[-1][1], FC6_KERNEL, deconv_padding,
                    name="deconv_fc6", **kw)(x, train)
    widths = decoder_widths(self.width)
    for b in reversed(range(len(VGG16_BLOCKS))):
      indices, size = pools[b]
      x = max_unpool(x, indices, size)
      for i, features in enumerate(widths[b], start=1):
        x = DeconvBNAct(features, name=f"deconv{b + 1}_{i}", **kw)(x, train)
    logits = Conv(self.num_classes, (1, 1), name="classifier", **kw)(x)
    return logits.astype(jnp.float32)
