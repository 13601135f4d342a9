"""SAM's image encoder: a ViT (ViTDet-style) with windowed and global attention,
decomposed relative position bias, and a conv neck to the prompt dimension.

Layout is NHWC throughout. Parameter names follow segment_anything's
`ImageEncoderViT` (blocks_{i}/attn/qkv, neck_{j}, ...), so that the converter
(segjax/convert/sam.py) maps them by name.
"""
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from segjax.layers import Conv
from segjax.models.sam.common import MLPBlock, layer_norm, softmax


def _relative_index(size: int) -> np.ndarray:
  """[size, size] indices into a (2 * size - 1)-row table: query i, key j -> i - j + size - 1."""
  coords = np.arange(size)
  return coords[:, None] - coords[None, :] + size - 1


class Attention(nn.Module):
  """Multi-head self-attention over an [B, H, W, C] grid, with the decomposed relative
  position bias of MViTv2 (one table per axis, indexed by the query-key offset)."""
  num_heads: int
  input_size: Tuple[int, int]  # the grid the rel-pos tables are sized for
  qkv_bias: bool = True
  use_rel_pos: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    heads = self.num_heads
    hd = c // heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = nn.Dense(3 * c, use_bias=self.qkv_bias, name="qkv", **kw)(x)
    qkv = qkv.reshape(b, h * w, 3, heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [b, hw, heads, hd]
    logits = jnp.einsum("bqnd,bknd->bnqk", q * (hd ** -0.5), k)
    if self.use_rel_pos:
      ih, iw = self.input_size
      rel_pos_h = self.param("rel_pos_h", nn.initializers.zeros, (2 * ih - 1, hd),
                             self.param_dtype)
      rel_pos_w = self.param("rel_pos_w", nn.initializers.zeros, (2 * iw - 1, hd),
                             self.param_dtype)
      if (h, w) != (ih, iw):
        raise ValueError(f"Attention with relative positions sized for a {ih}x{iw} grid got "
                         f"{h}x{w} tokens; SAM's images must be padded to its image_size.")
      rh = rel_pos_h.astype(self.dtype)[_relative_index(h)]  # [h, h, hd]
      rw = rel_pos_w.astype(self.dtype)[_relative_index(w)]  # [w, w, hd]
      rq = q.reshape(b, h, w, heads, hd)  # the unscaled queries, as the reference
      rel_h = jnp.einsum("byxnd,ykd->bnyxk", rq, rh)
      rel_w = jnp.einsum("byxnd,xkd->bnyxk", rq, rw)
      logits = (logits.reshape(b, heads, h, w, h, w) + rel_h[..., :, None]
                + rel_w[..., None, :]).reshape(b, heads, h * w, h * w)
    attn = softmax(logits, self.dtype)
    out = jnp.einsum("bnqk,bknd->bqnd", attn, v).reshape(b, h, w, c)
    return nn.Dense(c, name="proj", **kw)(out)


def window_partition(x, window: int):
  """[B, H, W, C] -> ([B * nH * nW, window, window, C], padded (Hp, Wp)); zero-padded
  bottom-right to multiples of `window` (the padded tokens take part in attention, as in
  the reference)."""
  b, h, w, c = x.shape
  ph, pw = -h % window, -w % window
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  hp, wp = h + ph, w + pw
  x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows, window: int, padded: Tuple[int, int], size: Tuple[int, int]):
  """The inverse of `window_partition`, cropping the padding."""
  hp, wp = padded
  c = windows.shape[-1]
  b = windows.shape[0] // ((hp // window) * (wp // window))
  x = windows.reshape(b, hp // window, wp // window, window, window, c).transpose(
      0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
  return x[:, :size[0], :size[1]]


class Block(nn.Module):
  """Pre-norm transformer block; `window_size` > 0 attends within windows, 0 globally."""
  num_heads: int
  mlp_ratio: float
  window_size: int
  input_size: Tuple[int, int]
  qkv_bias: bool = True
  use_rel_pos: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    shortcut = x
    x = layer_norm(1e-6, name="norm1", **kw)(x)
    h, w = x.shape[1:3]
    ws = self.window_size
    if ws > 0:
      x, padded = window_partition(x, ws)
    x = Attention(self.num_heads, (ws, ws) if ws > 0 else tuple(self.input_size),
                  qkv_bias=self.qkv_bias, use_rel_pos=self.use_rel_pos, name="attn", **kw)(x)
    if ws > 0:
      x = window_unpartition(x, ws, padded, (h, w))
    x = shortcut + x
    y = layer_norm(1e-6, name="norm2", **kw)(x)
    return x + MLPBlock(int(x.shape[-1] * self.mlp_ratio), "gelu", name="mlp", **kw)(y)


class ImageEncoderViT(nn.Module):
  """[B, img_size, img_size, 3] normalized images -> [B, img_size / patch_size,
  img_size / patch_size, out_chans] embeddings (segment_anything's ImageEncoderViT
  with SAM's settings: LayerNorm eps 1e-6, rel-pos, absolute position embedding)."""
  img_size: int = 1024
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  out_chans: int = 256
  qkv_bias: bool = True
  use_abs_pos: bool = True
  use_rel_pos: bool = True
  window_size: int = 14
  global_attn_indexes: Sequence[int] = (2, 5, 8, 11)
  remat: bool = False  # recompute each block in the backward pass (encoder fine-tuning)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = self.patch_size
    grid = self.img_size // p
    b, h, w, c = x.shape
    if (h, w) != (self.img_size, self.img_size):
      raise ValueError(f"SAM's image encoder takes {self.img_size}x{self.img_size} images, got "
                       f"{h}x{w}; pad them (segjax.models.sam.transforms.preprocess).")
    x = PatchEmbed(p, self.embed_dim, name="patch_embed", **kw)(x)
    if self.use_abs_pos:
      pos = self.param("pos_embed", nn.initializers.zeros, (1, grid, grid, self.embed_dim),
                       self.param_dtype)
      x = x + pos.astype(self.dtype)
    block = nn.remat(Block) if self.remat else Block
    for i in range(self.depth):
      window = 0 if i in tuple(self.global_attn_indexes) else self.window_size
      x = block(self.num_heads, self.mlp_ratio, window, (grid, grid), qkv_bias=self.qkv_bias,
                use_rel_pos=self.use_rel_pos, name=f"blocks_{i}", **kw)(x)
    x = Conv(self.out_chans, (1, 1), use_bias=False, name="neck_0", **kw)(x)
    x = layer_norm(1e-6, name="neck_1", **kw)(x)
    x = Conv(self.out_chans, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                name="neck_2", **kw)(x)
    return layer_norm(1e-6, name="neck_3", **kw)(x)


class PatchEmbed(nn.Module):
  """A p x p stride-p convolution with bias (params proj/kernel HWIO, proj/bias), computed
  as one matmul over the non-overlapping patches."""
  patch_size: int
  embed_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    b, h, w, c = x.shape
    proj = ConvParams(p, c, self.embed_dim, self.param_dtype, name="proj")
    kernel, bias = (v.astype(self.dtype) for v in proj())
    patches = x.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
    return jnp.einsum("byixjc,ijco->byxo", patches, kernel) + bias


class ConvParams(nn.Module):
  """The kernel (HWIO) and bias of a square convolution, for layers that compute it
  themselves."""
  size: int
  in_features: int
  features: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.size, self.size, self.in_features, self.features),
                        self.param_dtype)
    return kernel, self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
