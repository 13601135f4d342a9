"""BatchNorm whose batch statistics are global (synchronized), per device, or over
the valid examples only.

By default the statistics of a training step are means over the whole batch
axis of the global array. Under `jax.jit` with the batch sharded over a mesh,
XLA reduces across every device and process, so this is synchronized BatchNorm
(PyTorch's SyncBatchNorm) without an explicit `axis_name`.

`batch_statistics(groups=G)` makes them per-device instead: the batch is split
into G contiguous groups (the per-device shards when G is the size of the
batch axes), each normalized with its own statistics, as in plain data-parallel
PyTorch. `example_mask` (bool [batch]) leaves padded examples out of the
statistics, so per-device batches of different real sizes give exactly the
statistics of their real examples; the global statistics are then the
count-weighted ones, never a mean of per-device means.

The running averages are updated with the count-weighted mean of the group
means and of the group (biased) variances: the global statistics when G = 1.
Parameter and variable names are flax's `nn.BatchNorm`'s ("scale", "bias",
batch_stats "mean", "var"), so checkpoints and converted weights are shared.
"""
import dataclasses
from typing import Any, ContextManager, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.layers.trace_settings import TraceSetting


@dataclasses.dataclass(frozen=True)
class _Statistics:
  groups: int = 1
  example_mask: Optional[jax.Array] = None


def _check_statistics(settings: _Statistics) -> None:
  if settings.groups < 1:
    raise ValueError(f"BatchNorm statistics groups must be >= 1, got {settings.groups}.")


_SETTINGS = TraceSetting("segjax_batch_statistics", _Statistics(), _check_statistics)


def batch_statistics(groups: int = 1,
                     example_mask: Optional[jax.Array] = None) -> ContextManager[None]:
  """Within this context (while a model is traced), training-mode BatchNorm layers
  compute their statistics per `groups` contiguous slices of the batch, over the
  examples where `example_mask` is True."""
  return _SETTINGS.scope(_Statistics(groups, example_mask))


def grouped_moments(x: jax.Array, groups: int = 1, example_mask: Optional[jax.Array] = None):
  """Per-group mean and biased variance of `x` [batch, ..., C] over all axes but the
  last, in float32; returns (mean, var, count), each shaped [groups, 1, ..., 1, C]
  ([groups, 1, ..., 1, 1] for count)."""
  batch = x.shape[0]
  if batch % groups:
    raise ValueError(f"A batch of {batch} examples cannot be split into {groups} BatchNorm "
                     "statistics groups (one per device); make the batch size a multiple "
                     "of the number of devices.")
  xg = x.astype(jnp.float32).reshape((groups, batch // groups) + x.shape[1:])
  axes = tuple(range(1, xg.ndim - 1))
  if example_mask is None:
    weights = jnp.ones((groups, batch // groups) + (1,) * (x.ndim - 1), jnp.float32)
  else:
    if example_mask.shape != (batch,):
      raise ValueError(f"example_mask must have shape ({batch},), got {example_mask.shape}.")
    weights = example_mask.astype(jnp.float32).reshape(
        (groups, batch // groups) + (1,) * (x.ndim - 1))
  per_example = 1.0
  for d in x.shape[1:-1]:
    per_example *= d
  count = weights.sum(axes, keepdims=True) * per_example
  safe = jnp.maximum(count, 1.0)
  mean = (xg * weights).sum(axes, keepdims=True) / safe
  mean_sq = (jnp.square(xg) * weights).sum(axes, keepdims=True) / safe
  # E[x^2] - E[x]^2, clipped at 0 against round-off: flax's (fast) formula.
  var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
  return mean, var, count


class BatchNorm(nn.Module):
  """BatchNorm over the batch and spatial axes; see the module docstring for which
  examples the training statistics cover."""
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
      groups = 1
    else:
      settings = _SETTINGS.get()
      groups = settings.groups
      mean, var, count = grouped_moments(x, groups, settings.example_mask)
      if not self.is_initializing():
        total = jnp.maximum(count.sum(), 1.0)
        flat = lambda v: (v * count).reshape(-1, features).sum(0) / total
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * flat(mean)
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * flat(var)
    xg = x.astype(jnp.float32).reshape((groups, x.shape[0] // groups) + x.shape[1:])
    multiplier = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
    y = (xg - mean) * multiplier + bias.astype(jnp.float32)
    return y.reshape(x.shape).astype(self.dtype)
