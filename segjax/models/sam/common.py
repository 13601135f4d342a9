"""Layers SAM's encoder and decoder share: PyTorch-exact LayerNorm and GELU, the
two-layer MLP block, the n-layer ReLU MLP and multi-head softmax in float32."""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


def layer_norm(epsilon: float, dtype: Any, param_dtype: Any, name: Optional[str] = None):
  """`torch.nn.LayerNorm` over the last axis (variance as the mean of squared
  deviations, not E[x^2] - E[x]^2); SAM's LayerNorm2d is this over channels in NHWC."""
  return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, dtype=dtype,
                      param_dtype=param_dtype, name=name)


def gelu(x):
  """`torch.nn.GELU()`: the exact erf form (flax's default is the tanh approximation)."""
  return nn.gelu(x, approximate=False)


def softmax(logits, dtype: Any):
  """Softmax over the last axis computed in float32, returned in `dtype`."""
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)


class MLPBlock(nn.Module):
  """lin1 -> activation -> lin2 (segment_anything.modeling.common.MLPBlock)."""
  mlp_dim: int
  activation: str = "gelu"  # "gelu" (image encoder) or "relu" (two-way transformer)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act = gelu if self.activation == "gelu" else nn.relu
    y = act(nn.Dense(self.mlp_dim, name="lin1", **kw)(x))
    return nn.Dense(x.shape[-1], name="lin2", **kw)(y)


class MLP(nn.Module):
  """`num_layers` Dense layers with ReLU between them (the mask decoder's MLP)."""
  hidden_dim: int
  output_dim: int
  num_layers: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = nn.Dense(self.output_dim if last else self.hidden_dim, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=f"layers_{i}")(x)
      if not last:
        x = nn.relu(x)
    return x
