"""SAM's two-way transformer: prompt tokens and image embedding attend to each other.

Each block: token self-attention, tokens -> image cross-attention, token MLP, image ->
tokens cross-attention (segment_anything.modeling.transformer). Tokens may carry a
validity mask: invalid tokens are never attended to (their own outputs are unused).
"""
import math
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from segjax.models.sam.common import MLPBlock, layer_norm, softmax


class Attention(nn.Module):
  """Multi-head attention whose q/k/v projections may shrink the width by
  `downsample_rate`; `key_valid` [B, K] masks keys out."""
  embedding_dim: int
  num_heads: int
  downsample_rate: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q, k, v, key_valid: Optional[jnp.ndarray] = None):
    internal = self.embedding_dim // self.downsample_rate
    heads = self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    split = lambda x: x.reshape(x.shape[:-1] + (heads, internal // heads))
    q = split(nn.Dense(internal, name="q_proj", **kw)(q))
    k = split(nn.Dense(internal, name="k_proj", **kw)(k))
    v = split(nn.Dense(internal, name="v_proj", **kw)(v))
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(internal // heads)
    if key_valid is not None:
      logits = jnp.where(key_valid[:, None, None, :], logits.astype(jnp.float32), -jnp.inf)
    attn = softmax(logits, self.dtype)
    out = jnp.einsum("bnqk,bknd->bqnd", attn, v)
    out = out.reshape(out.shape[:-2] + (internal,))
    return nn.Dense(self.embedding_dim, name="out_proj", **kw)(out)


class TwoWayAttentionBlock(nn.Module):
  embedding_dim: int
  num_heads: int
  mlp_dim: int = 2048
  attention_downsample_rate: int = 2
  skip_first_layer_pe: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries, keys, query_pe, key_pe, token_valid=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dim, heads, rate = self.embedding_dim, self.num_heads, self.attention_downsample_rate
    self_attn = Attention(dim, heads, name="self_attn", **kw)
    if self.skip_first_layer_pe:  # no residual here, as the reference
      queries = self_attn(queries, queries, queries, token_valid)
    else:
      q = queries + query_pe
      queries = queries + self_attn(q, q, queries, token_valid)
    queries = layer_norm(1e-5, name="norm1", **kw)(queries)

    q = queries + query_pe
    k = keys + key_pe
    queries = queries + Attention(dim, heads, rate, name="cross_attn_token_to_image", **kw)(
        q, k, keys)
    queries = layer_norm(1e-5, name="norm2", **kw)(queries)

    queries = queries + MLPBlock(self.mlp_dim, "relu", name="mlp", **kw)(queries)
    queries = layer_norm(1e-5, name="norm3", **kw)(queries)

    q = queries + query_pe
    k = keys + key_pe
    keys = keys + Attention(dim, heads, rate, name="cross_attn_image_to_token", **kw)(
        k, q, queries, token_valid)
    keys = layer_norm(1e-5, name="norm4", **kw)(keys)
    return queries, keys


class TwoWayTransformer(nn.Module):
  """(image [B, HW, C], image_pe [HW, C] or [B, HW, C], tokens [B, T, C], token_valid
  [B, T] or None) -> (tokens [B, T, C], image [B, HW, C])."""
  depth: int = 2
  embedding_dim: int = 256
  num_heads: int = 8
  mlp_dim: int = 2048
  attention_downsample_rate: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image_embedding, image_pe, point_embedding, token_valid=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    queries, keys = point_embedding, image_embedding
    for i in range(self.depth):
      queries, keys = TwoWayAttentionBlock(
          self.embedding_dim, self.num_heads, self.mlp_dim, self.attention_downsample_rate,
          skip_first_layer_pe=i == 0, name=f"layers_{i}", **kw)(
              queries, keys, point_embedding, image_pe, token_valid)
    q = queries + point_embedding
    k = keys + image_pe
    queries = queries + Attention(self.embedding_dim, self.num_heads,
                                  self.attention_downsample_rate,
                                  name="final_attn_token_to_image", **kw)(q, k, keys)
    return layer_norm(1e-5, name="norm_final_attn", **kw)(queries), keys
