"""Conv -> BatchNorm -> activation, the unit every encoder and decoder is made of.

BatchNorm is `segjax.layers.norm.BatchNorm`: synchronized over the global batch
by default, per device within `norm.batch_statistics(groups=...)`.
"""
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from segjax.layers import conv_lowering
from segjax.layers.norm import BatchNorm

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype: Union[str, Any]) -> Any:
  """Maps a config dtype name ('float32', 'bfloat16', ...) to a jnp dtype."""
  if not isinstance(dtype, str):
    return dtype
  if dtype not in _DTYPES:
    raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}.")
  return _DTYPES[dtype]


def batch_norm(train: bool, dtype: Any, param_dtype: Any, name: Optional[str] = None,
               momentum: float = 0.9, epsilon: float = 1e-5) -> BatchNorm:
  """BatchNorm with PyTorch-like epsilon, batch statistics while training."""
  return BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                   dtype=dtype, param_dtype=param_dtype, name=name)


class Conv(nn.Conv):
  """`nn.Conv` (same parameters and outputs), lowered to what runs fast on the CPU
  (`segjax.layers.conv_lowering`)."""
  conv_general_dilated: Callable = conv_lowering.conv_general_dilated


class ConvBNAct(nn.Module):
  """A bias-free convolution followed by BatchNorm and an activation.

  Padding is PyTorch's symmetric `dilation * (k // 2)` per side, so strided and
  dilated convs line up with PyTorch models (and their converted weights);
  `feature_group_count` equal to the input channels makes it depthwise.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  dilation: int = 1
  feature_group_count: int = 1
  activation: Optional[Callable] = nn.relu
  kernel_init: Callable = nn.initializers.kaiming_normal()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    padding = [(self.dilation * (k // 2),) * 2 for k in self.kernel_size]
    x = Conv(self.features, tuple(self.kernel_size), strides=tuple(self.strides),
                kernel_dilation=(self.dilation, self.dilation), padding=padding,
                feature_group_count=self.feature_group_count, use_bias=False,
                dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                name="conv")(x)
    x = batch_norm(train, self.dtype, self.param_dtype, name="bn")(x)
    return self.activation(x) if self.activation is not None else x


class Deconv2x2(nn.Module):
  """A 2x2 stride-2 transposed convolution (no overlap between output cells).

  Same parameters ("kernel" (2, 2, in, out), "bias") and outputs as
  `nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding="VALID")`, i.e.
  out[2i + a, 2j + b] = x[i, j] @ kernel[1 - a, 1 - b] + bias, computed as one
  matmul and a depth-to-space reshape: XLA's CPU gradient of the dilated
  convolution behind ConvTranspose is over 10x slower.
  """
  features: int
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (2, 2, x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    x, kernel, bias = (v.astype(self.dtype) for v in (x, kernel, bias))
    y = jnp.einsum("nhwc,abco->nhawbo", x, kernel[::-1, ::-1])
    n, h, _, w, _, o = y.shape
    return y.reshape(n, 2 * h, 2 * w, o) + bias
