"""Predictions at each image's original resolution, with static shapes.

Test-time pipelines resize an image (e.g. keeping its ratio to (2048, 512)) and
pad it to a fixed size, while its label stays at the original size, padded to
another fixed size (`resize(resize_labels=False)|pad(size=..., label_size=...)`).
mmsegmentation scores a prediction by resizing the logits of the resized image
bilinearly (align_corners=False) to the original size and taking the argmax.
Here the valid sizes differ per image but are traced values, so the resize is
written as a gather with per-image source coordinates, done in blocks of rows
so that the full-resolution logits (classes x original pixels, 150 x 2048 x
2048 floats for ADE20K) never exist at once.
"""
import jax
import jax.numpy as jnp

_ROWS_PER_BLOCK = 32


def bilinear_source_index(num_out: int, in_size: jax.Array, out_size: jax.Array):
  """PyTorch's bilinear source indices and weights (align_corners=False) for
  `num_out` outputs, of which the first `out_size` map onto `in_size` inputs."""
  scale = in_size.astype(jnp.float32) / jnp.maximum(out_size, 1).astype(jnp.float32)
  src = jnp.maximum((jnp.arange(num_out, dtype=jnp.float32) + 0.5) * scale - 0.5, 0.0)
  last = jnp.maximum(in_size - 1, 0)
  low = jnp.minimum(jnp.floor(src).astype(jnp.int32), last)
  high = jnp.minimum(low + 1, last)
  return low, high, src - low


def _one_image(logits, resized_size, original_size, output_shape):
  """(h, w, C) padded logits -> (H, W) int32 predictions."""
  out_h, out_w = output_shape
  col_lo, col_hi, col_w = bilinear_source_index(out_w, resized_size[1], original_size[1])
  num_blocks = -(-out_h // _ROWS_PER_BLOCK)
  row_lo, row_hi, row_w = bilinear_source_index(num_blocks * _ROWS_PER_BLOCK,
                                                resized_size[0], original_size[0])

  def block(i):
    rows = jax.lax.dynamic_slice_in_dim(jnp.arange(num_blocks * _ROWS_PER_BLOCK),
                                        i * _ROWS_PER_BLOCK, _ROWS_PER_BLOCK)
    wy = row_w[rows][:, None, None]
    blended = logits[row_lo[rows]] * (1 - wy) + logits[row_hi[rows]] * wy
    wx = col_w[None, :, None]
    blended = blended[:, col_lo] * (1 - wx) + blended[:, col_hi] * wx
    return jnp.argmax(blended, axis=-1).astype(jnp.int32)

  blocks = jax.lax.map(block, jnp.arange(num_blocks))
  return blocks.reshape(num_blocks * _ROWS_PER_BLOCK, out_w)[:out_h]


def predict_at_original_size(logits: jax.Array, resized_size: jax.Array,
                             original_size: jax.Array, output_shape) -> jax.Array:
  """Class predictions at the original resolution.

  Args:
    logits: (B, h, w, C) logits of resized images padded bottom/right; only the
      top-left `resized_size` of each is the image.
    resized_size: (B, 2) int, the (height, width) the image was resized to.
    original_size: (B, 2) int, the image's (height, width) before resizing.
    output_shape: static (H, W) >= every original size, the padded label shape.

  Returns:
    (B, H, W) int32: the argmax of the logits resized bilinearly (PyTorch's
    align_corners=False) from `resized_size` to `original_size`, in the top-left
    `original_size` of each map; what lies beyond is meaningless and must be
    ignored by the padded labels.
  """
  fn = lambda x, r, o: _one_image(x, r, o, tuple(output_shape))
  return jax.vmap(fn)(logits, resized_size.astype(jnp.int32), original_size.astype(jnp.int32))
