"""SAM's mask decoder: output tokens (IoU + 1 single-mask + `num_multimask_outputs`
mask tokens) run through the two-way transformer with the prompt tokens; the image
embedding is upscaled 4x by two 2x2 transposed convolutions and each mask token's
hypernetwork MLP gives the weights of its mask; an MLP head predicts each mask's IoU.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from segjax.layers import Deconv2x2
from segjax.models.sam.common import MLP, gelu, layer_norm
from segjax.models.sam.transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
  transformer_dim: int = 256
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256
  transformer_depth: int = 2
  transformer_num_heads: int = 8
  transformer_mlp_dim: int = 2048
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image_embeddings, image_pe, sparse, token_valid, dense,
               multimask_output: bool):
    """image_embeddings [B, h, w, C] (one per image), image_pe [h, w, C], sparse prompt
    tokens [B, Q, T, C] (validity [B, Q, T] or None), dense prompt embeddings
    [B, Q, h, w, C] -> (masks [B, Q, M, 4h, 4w], iou [B, Q, M]) with M =
    num_multimask_outputs if multimask_output else 1."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = self.transformer_dim
    b, q, t = sparse.shape[:3]
    h, w = image_embeddings.shape[1:3]
    num_mask_tokens = self.num_multimask_outputs + 1
    iou_token = nn.Embed(1, c, name="iou_token", **kw)(jnp.arange(1))
    mask_tokens = nn.Embed(num_mask_tokens, c, name="mask_tokens", **kw)(
        jnp.arange(num_mask_tokens))
    output_tokens = jnp.concatenate([iou_token, mask_tokens]).astype(self.dtype)
    n = b * q
    tokens = jnp.concatenate([jnp.broadcast_to(output_tokens, (n,) + output_tokens.shape),
                              sparse.reshape(n, t, c).astype(self.dtype)], axis=1)
    valid = None
    if token_valid is not None:
      valid = jnp.concatenate([jnp.ones((n, 1 + num_mask_tokens), bool),
                               token_valid.reshape(n, t)], axis=1)

    # Each query gets its own copy of its image's embedding (the transformer updates it).
    src = (image_embeddings.astype(self.dtype)[:, None] + dense.astype(self.dtype))
    src = src.reshape(n, h * w, c)
    pos = image_pe.astype(self.dtype).reshape(1, h * w, c)
    hs, src = TwoWayTransformer(self.transformer_depth, c, self.transformer_num_heads,
                                self.transformer_mlp_dim, name="transformer", **kw)(
                                    src, pos, tokens, valid)
    iou_token_out = hs[:, 0]
    mask_tokens_out = hs[:, 1:1 + num_mask_tokens]

    x = Deconv2x2(c // 4, name="output_upscaling_0", **kw)(src.reshape(n, h, w, c))
    x = gelu(layer_norm(1e-6, name="output_upscaling_1", **kw)(x))
    upscaled = gelu(Deconv2x2(c // 8, name="output_upscaling_3", **kw)(x))
    hyper_in = jnp.stack([
        MLP(c, c // 8, 3, name=f"output_hypernetworks_mlps_{i}", **kw)(mask_tokens_out[:, i])
        for i in range(num_mask_tokens)], axis=1)  # [n, num_mask_tokens, c / 8]
    iou_pred = MLP(self.iou_head_hidden_dim, num_mask_tokens, self.iou_head_depth,
                   name="iou_prediction_head", **kw)(iou_token_out)

    chosen = slice(1, None) if multimask_output else slice(0, 1)
    masks = jnp.einsum("nmc,nyxc->nmyx", hyper_in[:, chosen], upscaled)
    m = masks.shape[1]
    return (masks.reshape(b, q, m, 4 * h, 4 * w).astype(jnp.float32),
            iou_pred[:, chosen].reshape(b, q, m).astype(jnp.float32))
