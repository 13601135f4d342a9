"""SAM's prompt encoder: points (with labels), boxes and low-resolution masks ->
sparse tokens and a dense embedding, with random-Fourier positional encoding.

Static shapes: a batch of B images carries Q prompts each; every query has N
point slots, one optional box and one optional mask, each with a validity mask.
Invalid slots become tokens that the decoder's attention ignores (a key mask), so
a query gives exactly the reference's result for its valid prompts alone.

Point labels as in segment_anything: 1 foreground, 0 background, -1 "not a point"
(embedded as `not_a_point_embed` and attended, as the reference's padding point).
The reference appends one such padding point when points come without a box; here
that token is always present after the points, valid exactly for the queries with
at least one valid point and no valid box.
"""
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from segjax.layers import Conv
from segjax.models.sam.common import gelu, layer_norm


class PositionEmbeddingRandom(nn.Module):
  """Positional encoding with random spatial frequencies: [..., 2] coordinates in
  [0, 1] -> [..., 2 * num_pos_feats] (sin, cos of 2 pi (2 c - 1) @ G).

  The Gaussian matrix G is a parameter (the checkpoints hold it) kept in float32 and
  never trained (`Sam.frozen_params_mask`)."""
  num_pos_feats: int = 128
  scale: float = 1.0

  def setup(self):
    self.positional_encoding_gaussian_matrix = self.param(
        "positional_encoding_gaussian_matrix", nn.initializers.normal(stddev=self.scale),
        (2, self.num_pos_feats), jnp.float32)

  def encode(self, coords):
    coords = (2 * coords.astype(jnp.float32) - 1) @ self.positional_encoding_gaussian_matrix
    coords = 2 * np.pi * coords
    return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

  def dense(self, size: Tuple[int, int]):
    """[h, w, 2 * num_pos_feats] encoding of the cell centres of an h x w grid."""
    h, w = size
    y = (np.arange(h, dtype=np.float32) + 0.5) / h
    x = (np.arange(w, dtype=np.float32) + 0.5) / w
    grid = np.stack(np.broadcast_arrays(x[None, :], y[:, None]), axis=-1)
    return self.encode(jnp.asarray(grid))

  def with_coords(self, coords, image_size: Tuple[int, int]):
    """Encodes pixel coordinates (x, y) of an image of `image_size` (h, w)."""
    scale = jnp.asarray([1.0 / image_size[1], 1.0 / image_size[0]], jnp.float32)
    return self.encode(coords.astype(jnp.float32) * scale)


class PromptEncoder(nn.Module):
  """Prompts -> (sparse [B, Q, T, C], their validity [B, Q, T] or None when all are
  valid, dense [B, Q, h, w, C]). T = N + 1 with points (+ the padding token), + 2 with
  boxes (the corners)."""
  embed_dim: int = 256
  image_embedding_size: Tuple[int, int] = (64, 64)
  input_image_size: Tuple[int, int] = (1024, 1024)
  mask_in_chans: int = 16
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c = self.embed_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.pe_layer = PositionEmbeddingRandom(c // 2)
    embed = lambda rows, name: nn.Embed(rows, c, name=name, **kw)
    # 0/1: background/foreground point, 2/3: box top-left/bottom-right corner.
    self.point_embeddings = [embed(1, f"point_embeddings_{i}") for i in range(4)]
    self.not_a_point_embed = embed(1, "not_a_point_embed")
    self.no_mask_embed = embed(1, "no_mask_embed")
    m = self.mask_in_chans
    self.mask_downscaling = [
        Conv(m // 4, (2, 2), strides=(2, 2), padding="VALID", name="mask_downscaling_0", **kw),
        layer_norm(1e-6, name="mask_downscaling_1", **kw),
        Conv(m, (2, 2), strides=(2, 2), padding="VALID", name="mask_downscaling_3", **kw),
        layer_norm(1e-6, name="mask_downscaling_4", **kw),
        Conv(c, (1, 1), name="mask_downscaling_6", **kw)]

  @property
  def mask_input_size(self) -> Tuple[int, int]:
    return (4 * self.image_embedding_size[0], 4 * self.image_embedding_size[1])

  def _weight(self, embed: nn.Embed):
    return embed.embedding[0].astype(jnp.float32)

  def get_dense_pe(self):
    """[h, w, C] positional encoding of the image embedding's grid."""
    return self.pe_layer.dense(self.image_embedding_size).astype(self.dtype)

  def embed_points(self, coords, labels):
    """[..., N, 2] pixel coordinates (x, y) in the padded input frame, [..., N] labels ->
    [..., N, C]."""
    pe = self.pe_layer.with_coords(coords + 0.5, self.input_image_size)  # pixel centres
    labels = labels[..., None]
    out = jnp.where(labels == -1, self._weight(self.not_a_point_embed), pe)
    out = out + jnp.where(labels == 0, self._weight(self.point_embeddings[0]), 0.0)
    return out + jnp.where(labels == 1, self._weight(self.point_embeddings[1]), 0.0)

  def embed_boxes(self, boxes):
    """[..., 4] boxes (x0, y0, x1, y1) -> [..., 2, C] corner tokens."""
    corners = (boxes + 0.5).reshape(boxes.shape[:-1] + (2, 2))
    pe = self.pe_layer.with_coords(corners, self.input_image_size)
    corner = jnp.stack([self._weight(self.point_embeddings[2]),
                        self._weight(self.point_embeddings[3])])
    return pe + corner

  def embed_masks(self, masks):
    """[..., 4h, 4w, 1] mask logits -> [..., h, w, C]."""
    lead = masks.shape[:-3]
    x = masks.reshape((-1,) + masks.shape[-3:]).astype(self.dtype)
    d = self.mask_downscaling
    x = gelu(d[1](d[0](x)))
    x = gelu(d[3](d[2](x)))
    x = d[4](x)
    return x.reshape(lead + x.shape[1:])

  def __call__(self, batch_shape: Tuple[int, int], point_coords=None, point_labels=None,
               point_valid=None, boxes=None, box_valid=None, mask_inputs=None,
               mask_valid=None):
    sparse, valid = [], []
    any_masked = False
    if point_coords is not None:
      sparse.append(self.embed_points(point_coords, point_labels))
      valid.append(jnp.ones(point_labels.shape, bool) if point_valid is None else point_valid)
      any_masked |= point_valid is not None
      # The reference's padding point, there when a query has points but no box.
      pad = jnp.broadcast_to(self._weight(self.not_a_point_embed), batch_shape + (1,
                                                                                   self.embed_dim))
      sparse.append(pad)
      has_points = (jnp.ones(batch_shape, bool) if point_valid is None
                    else jnp.any(point_valid, axis=-1))
      has_box = (jnp.zeros(batch_shape, bool) if boxes is None
                 else jnp.ones(batch_shape, bool) if box_valid is None else box_valid)
      valid.append((has_points & ~has_box)[..., None])
      any_masked |= boxes is not None
    if boxes is not None:
      sparse.append(self.embed_boxes(boxes))
      has_box = jnp.ones(batch_shape, bool) if box_valid is None else box_valid
      valid.append(jnp.repeat(has_box[..., None], 2, axis=-1))
      any_masked |= box_valid is not None
    if sparse:
      sparse = jnp.concatenate(sparse, axis=-2).astype(self.dtype)
      valid = jnp.concatenate(valid, axis=-1) if any_masked else None
    else:
      sparse = jnp.zeros(batch_shape + (0, self.embed_dim), self.dtype)
      valid = None

    h, w = self.image_embedding_size
    no_mask = jnp.broadcast_to(self.no_mask_embed.embedding[0].astype(self.dtype),
                               batch_shape + (h, w, self.embed_dim))
    if mask_inputs is None:
      dense = no_mask
    else:
      dense = self.embed_masks(mask_inputs)
      if mask_valid is not None:
        dense = jnp.where(mask_valid[..., None, None, None], dense, no_mask)
    return sparse, valid, dense


def check_prompts(batch_shape: Tuple[int, int], mask_input_size: Tuple[int, int],
                  point_coords=None, point_labels=None, point_valid=None, boxes=None,
                  box_valid=None, mask_inputs=None, mask_valid=None) -> None:
  """Raises a ValueError naming the first prompt array whose shape does not fit
  `batch_shape` (B, Q)."""
  b, q = batch_shape

  def expect(name, value, shape: Optional[Tuple[int, ...]]):
    if value is not None and tuple(value.shape) != shape:
      raise ValueError(f"SAM's {name} must have shape {shape} for {b} image(s) with {q} "
                       f"prompt(s) each, got {tuple(value.shape)}.")

  if (point_coords is None) != (point_labels is None):
    raise ValueError("SAM needs point_coords and point_labels together (or neither).")
  if point_coords is not None:
    if point_coords.ndim != 4:
      raise ValueError(f"SAM's point_coords must be [batch, queries, points, 2], got shape "
                       f"{tuple(point_coords.shape)}.")
    n = point_coords.shape[2]
    expect("point_coords", point_coords, (b, q, n, 2))
    expect("point_labels", point_labels, (b, q, n))
    expect("point_valid", point_valid, (b, q, n))
  elif point_valid is not None:
    raise ValueError("SAM got point_valid without point_coords.")
  if boxes is None and box_valid is not None:
    raise ValueError("SAM got box_valid without boxes.")
  expect("boxes", boxes, (b, q, 4))
  expect("box_valid", box_valid, (b, q))
  if mask_inputs is None and mask_valid is not None:
    raise ValueError("SAM got mask_valid without mask_inputs.")
  expect("mask_inputs", mask_inputs, (b, q) + tuple(mask_input_size) + (1,))
  expect("mask_valid", mask_valid, (b, q))
