"""Convolutions lowered to what XLA's CPU backend runs fast.

Two convolution cases are slow on XLA's CPU backend and weigh on train steps:
- a 1x1 convolution's filter gradient takes 1.8-2.4x (Eigen kernels) to 4x
  (YNNPACK) the forward convolution's time, yet it is one matrix product: the
  [M, C] input against the [M, O] output gradient (M = batch x output pixels).
  The forward pass and the input gradient stay XLA's own. (For larger kernels
  the same product needs the input's kh*kw shifted copies, and with the Eigen
  kernels train.py selects, XLA's own gradient is faster: measured per layer
  on the project's 2-core CPU.)
- a depthwise convolution (one filter per channel) runs ~30x slower than its
  arithmetic needs, and its gradients ~15x. As kh*kw shifted multiply-adds it is
  elementwise work that XLA fuses, forward and backward.
Results equal XLA's up to float summation order.

`conv_general_dilated` has `lax.conv_general_dilated`'s signature, so flax's
`nn.Conv(conv_general_dilated=...)` takes it (`segjax.layers.Conv` does). The
rewrites apply to NHWC/HWIO convolutions without input dilation, when
`lowering(mode)` says so at trace time: "auto" (the default) on the CPU backend
only, "patches" always, "xla" never.
"""
import functools
from typing import ContextManager, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from segjax.layers.trace_settings import TraceSetting

MODES = ("auto", "patches", "xla")
_NHWC = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))


def check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"Unknown convolution lowering {mode!r} (config.model.conv_lowering); use "
                     f"one of {MODES}.")


_MODE = TraceSetting("segjax_conv_lowering", "auto", check_mode)


def lowering(mode: str) -> ContextManager[None]:
  """Convolutions traced inside are lowered as `mode` says."""
  return _MODE.scope(mode)


def _rewrites_apply() -> bool:
  mode = _MODE.get()
  return mode == "patches" or (mode == "auto" and jax.default_backend() == "cpu")


def _explicit_padding(padding, lhs_shape, rhs_shape, strides, dilation):
  """`padding` (a string or pairs) as ((lo, hi), (lo, hi)) for the two spatial dims."""
  if not isinstance(padding, str):
    return tuple(tuple(int(p) for p in pair) for pair in padding)
  window = [(k - 1) * d + 1 for k, d in zip(rhs_shape[:2], dilation)]
  return tuple(lax.padtype_to_pads(lhs_shape[1:3], window, strides, padding))


def _taps(x, kernel_hw, out_hw, strides, padding, dilation):
  """The kh*kw shifted, strided views of the padded NHWC `x`, each [N, out_h, out_w, C], in
  kernel order (row-major over the kernel's taps)."""
  x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in padding)
              + ((0, 0, 0),))
  (out_h, out_w), views = out_hw, []
  for i in range(kernel_hw[0]):
    for j in range(kernel_hw[1]):
      top, left = i * dilation[0], j * dilation[1]
      views.append(lax.slice(x, (0, top, left, 0),
                             (x.shape[0], top + (out_h - 1) * strides[0] + 1,
                              left + (out_w - 1) * strides[1] + 1, x.shape[3]),
                             (1, strides[0], strides[1], 1)))
  return views


def _matmul_filter_gradient(x, g, kernel_shape, strides, padding, dtype):
  """d(loss)/d(kernel) [1, 1, C, O] of a 1x1 convolution from its NHWC input `x` and output
  gradient `g`: the input pixels the kernel saw, as rows, against `g`'s rows."""
  (seen,) = _taps(x, (1, 1), g.shape[1:3], strides, padding, (1, 1))
  rows = g.shape[0] * g.shape[1] * g.shape[2]
  grad = lax.dot_general(seen.reshape(rows, kernel_shape[2]), g.reshape(rows, kernel_shape[3]),
                         (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return grad.reshape(kernel_shape).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _conv(lhs, rhs, strides, padding, dilation, precision, preferred):
  return lax.conv_general_dilated(lhs, rhs, strides, padding, rhs_dilation=dilation,
                                  dimension_numbers=_NHWC, precision=precision,
                                  preferred_element_type=preferred)


def _conv_fwd(lhs, rhs, strides, padding, dilation, precision, preferred):
  return _conv(lhs, rhs, strides, padding, dilation, precision, preferred), (lhs, rhs)


def _conv_bwd(strides, padding, dilation, precision, preferred, residuals, g):
  lhs, rhs = residuals
  _, input_vjp = jax.vjp(
      lambda x: lax.conv_general_dilated(x, rhs, strides, padding, rhs_dilation=dilation,
                                         dimension_numbers=_NHWC, precision=precision,
                                         preferred_element_type=preferred), lhs)
  (lhs_grad,) = input_vjp(g)
  rhs_grad = _matmul_filter_gradient(lhs, g.astype(lhs.dtype), rhs.shape, strides, padding,
                                     rhs.dtype)
  return lhs_grad, rhs_grad


_conv.defvjp(_conv_fwd, _conv_bwd)


def _depthwise(lhs, rhs, strides, padding, dilation, preferred):
  """A depthwise convolution (kernel [kh, kw, 1, C]) as a sum of shifted, scaled views,
  accumulated in float32."""
  kh, kw = rhs.shape[:2]
  out_hw = [(lhs.shape[1 + a] + sum(padding[a]) - (rhs.shape[a] - 1) * dilation[a] - 1)
            // strides[a] + 1 for a in range(2)]
  taps = _taps(lhs, (kh, kw), out_hw, strides, padding, dilation)
  out = sum(t.astype(jnp.float32) * rhs[i // kw, i % kw, 0].astype(jnp.float32)
            for i, t in enumerate(taps))
  return out.astype(preferred or jnp.result_type(lhs, rhs))


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding,
                         lhs_dilation: Optional[Sequence[int]] = None,
                         rhs_dilation: Optional[Sequence[int]] = None,
                         dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None) -> jax.Array:
  """`lax.conv_general_dilated`, with the CPU rewrites where they apply."""
  numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  strides = tuple(window_strides)
  dilation = tuple(rhs_dilation or (1,) * (lhs.ndim - 2))
  channels = lhs.shape[-1]
  pointwise = feature_group_count == 1 and rhs.shape[:2] == (1, 1)
  depthwise = (feature_group_count == channels > 1 and rhs.shape[2:] == (1, channels))
  if (lhs.ndim == 4 and numbers == _NHWC and batch_group_count == 1
      and (pointwise or depthwise) and all(d == 1 for d in (lhs_dilation or ()))
      and _rewrites_apply()):
    pads = _explicit_padding(padding, lhs.shape, rhs.shape, strides, dilation)
    if depthwise:
      return _depthwise(lhs, rhs, strides, pads, dilation, preferred_element_type)
    return _conv(lhs, rhs, strides, pads, dilation, precision, preferred_element_type)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                  rhs_dilation, dimension_numbers, feature_group_count,
                                  batch_group_count, precision, preferred_element_type)
