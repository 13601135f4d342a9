"""Convolution whose filter gradient is a matmul of image patches (im2col).

XLA's CPU backend computes a convolution's filter gradient 3-5x slower than
the forward convolution (the transposed convolution has a huge "kernel", the
output gradient), and that gradient dominates a ResNet train step there. The
same gradient is one matrix product: the [M, kh*kw*C] patches of the input
against the [M, O] output gradient (M = batch x output pixels), which XLA's
CPU matmul does at forward-convolution speed. The forward pass and the input
gradient stay XLA's own; results equal XLA's up to float summation order.

`conv_general_dilated` has `lax.conv_general_dilated`'s signature, so flax's
`nn.Conv(conv_general_dilated=...)` takes it (`segjax.layers.Conv` does). The
patch gradient is used where it applies (NHWC/HWIO, no input dilation, one
feature group) and when `filter_gradient(mode)` says so at trace time: "auto"
(the default) on the CPU backend only, "im2col" always, "xla" never. Patches
larger than `PATCH_BYTES` are not materialised: each kernel tap is its own
matmul instead, which needs no more memory than the input.
"""
import contextlib
import contextvars
import functools
from typing import Iterator, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

MODES = ("auto", "im2col", "xla")
PATCH_BYTES = 256 * 2**20
_NHWC = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))
_MODE = contextvars.ContextVar("segjax_conv_filter_gradient", default="auto")


def check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"Unknown convolution filter-gradient mode {mode!r} "
                     f"(config.model.conv_filter_gradient); use one of {MODES}.")


@contextlib.contextmanager
def filter_gradient(mode: str) -> Iterator[None]:
  """Convolutions traced inside take their filter gradient as `mode` says."""
  check_mode(mode)
  token = _MODE.set(mode)
  try:
    yield
  finally:
    _MODE.reset(token)


def _uses_patches() -> bool:
  mode = _MODE.get()
  return mode == "im2col" or (mode == "auto" and jax.default_backend() == "cpu")


def _explicit_padding(padding, lhs_shape, rhs_shape, strides, dilation):
  """`padding` (a string or pairs) as ((lo, hi), (lo, hi)) for the two spatial dims."""
  if not isinstance(padding, str):
    return tuple(tuple(int(p) for p in pair) for pair in padding)
  window = [(k - 1) * d + 1 for k, d in zip(rhs_shape[:2], dilation)]
  return tuple(lax.padtype_to_pads(lhs_shape[1:3], window, strides, padding))


def _patch_filter_gradient(x, g, kernel_shape, strides, padding, dilation, dtype):
  """d(loss)/d(kernel) [kh, kw, C, O] from the NHWC input `x` and output gradient `g`."""
  kh, kw, channels, features = kernel_shape
  x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in padding)
              + ((0, 0, 0),))
  out_h, out_w = g.shape[1:3]
  rows = g.shape[0] * out_h * out_w

  def tap(i, j):
    top, left = i * dilation[0], j * dilation[1]
    return lax.slice(x, (0, top, left, 0),
                     (x.shape[0], top + (out_h - 1) * strides[0] + 1,
                      left + (out_w - 1) * strides[1] + 1, channels),
                     (1, strides[0], strides[1], 1))

  g = g.reshape(rows, features)
  matmul = functools.partial(lax.dot_general, dimension_numbers=(((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
  taps = [tap(i, j) for i in range(kh) for j in range(kw)]
  if rows * kh * kw * channels * x.dtype.itemsize <= PATCH_BYTES:
    patches = jnp.concatenate(taps, axis=-1).reshape(rows, kh * kw * channels)
    grad = matmul(patches, g)
  else:
    grad = jnp.stack([matmul(t.reshape(rows, channels), g) for t in taps])
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
  rhs_grad = _patch_filter_gradient(lhs, g.astype(lhs.dtype), rhs.shape, strides, padding,
                                    dilation, rhs.dtype)
  return lhs_grad, rhs_grad


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding,
                         lhs_dilation: Optional[Sequence[int]] = None,
                         rhs_dilation: Optional[Sequence[int]] = None,
                         dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None) -> jax.Array:
  """`lax.conv_general_dilated`, with the patch-matmul filter gradient where it applies."""
  numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  strides: Tuple[int, ...] = tuple(window_strides)
  dilation = tuple(rhs_dilation or (1,) * (lhs.ndim - 2))
  plain = (lhs.ndim != 4 or numbers != _NHWC or feature_group_count != 1
           or batch_group_count != 1 or any(d != 1 for d in (lhs_dilation or ()))
           or not _uses_patches())
  if plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    batch_group_count, precision, preferred_element_type)
  pads = _explicit_padding(padding, lhs.shape, rhs.shape, strides, dilation)
  return _conv(lhs, rhs, strides, pads, dilation, precision, preferred_element_type)
