"""VGG-16 encoders (Simonyan & Zisserman, 2015) for dense prediction, NHWC.

The layout is torchvision's `vgg16` / `vgg16_bn` `features`: five blocks of
2, 2, 3, 3, 3 3x3 convs with bias (each followed by BatchNorm in the _bn
variant) and ReLU, each block ending in a 2x2/2 max pool. Convs pad explicitly
by 1 on every side, as PyTorch does, so converted weights give the same numbers.

Two options serve the FCN of Long et al.: `pad_first` replaces the padding of
the first conv (their caffe model pads it by 100 so that small inputs survive
the unpadded 7x7 fc6), and `ceil_mode` rounds pooled sizes up as caffe does
(torchvision rounds down), which the paper's crop offsets rely on.
"""
from typing import Any, Dict

import flax.linen as nn
import jax.numpy as jnp

from segjax.layers import Conv, batch_norm

# Output channels of each conv, per block, at width 64.
BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

# torchvision's init: He normal with fan_out, zero bias.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def max_pool_2x2(x, ceil_mode: bool):
  """2x2/2 max pool; `ceil_mode` keeps a last partial window (caffe, torch ceil_mode)."""
  pad = [(0, n % 2 if ceil_mode else 0) for n in x.shape[1:3]]
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding=pad)


class VGG16(nn.Module):
  """A VGG-16 encoder returning each block's last ReLU output and its pooled map.

  Returns {"conv1".."conv5": block b's last ReLU output (stride 2**(b-1)),
  "pool1".."pool5": the same after its max pool (stride 2**b)}. `width` scales
  every block (64 gives 64, 128, 256, 512, 512 channels). `pad_first` = 0 keeps
  VGG's padding of 1 for conv1_1; any other value replaces it.
  """
  batch_norm: bool = False
  width: int = 64
  pad_first: int = 0
  ceil_mode: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False) -> Dict[str, Any]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = images.astype(self.dtype)
    features = {}
    for b, channels in enumerate(BLOCKS, start=1):
      for i, c in enumerate(channels, start=1):
        pad = self.pad_first if (b, i) == (1, 1) and self.pad_first else 1
        x = Conv(c * self.width // 64, (3, 3), padding=((pad, pad), (pad, pad)),
                    kernel_init=_conv_init, name=f"conv{b}_{i}", **kw)(x)
        if self.batch_norm:
          x = batch_norm(train, self.dtype, self.param_dtype, name=f"bn{b}_{i}")(x)
        x = nn.relu(x)
      features[f"conv{b}"] = x
      x = features[f"pool{b}"] = max_pool_2x2(x, self.ceil_mode)
    return features
