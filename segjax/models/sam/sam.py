"""Segment Anything (Kirillov et al., 2023): `model.name = "sam"`.

An image encoder (ViT-B/L/H, `variant`) embeds a padded, normalized 1024x1024 image
once into [64, 64, 256]; the prompt encoder and the light mask decoder then turn any
number of prompts per image into 3 (or 1) low-resolution mask logits [256, 256] and
their predicted IoUs. Shapes are static: B images carry Q queries of N point slots,
one box and one mask prompt each, every kind with a validity mask (see
prompt_encoder.py); a query's result is the reference's for its valid prompts.

  model = Sam(variant="vit_b")
  emb = model.apply(variables, images, method=Sam.embed_image)      # [B, 64, 64, 256]
  masks, iou = model.apply(variables, emb, point_coords, point_labels,
                           method=Sam.decode)        # [B, Q, 3, 256, 256], [B, Q, 3]

`__call__(images, **prompts)` is both together (what `model.init` traces); with no
prompts at initialization every parameter is still created. Images go through
segjax.models.sam.transforms (resize the longest side, normalize, pad) and masks back
through its `postprocess_masks`, as segment_anything's predictor does.
"""
from typing import Any, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.registry import MODELS
from segjax.models.sam.image_encoder import ImageEncoderViT
from segjax.models.sam.mask_decoder import MaskDecoder
from segjax.models.sam.prompt_encoder import PromptEncoder, check_prompts
from segjax.models.sam.transforms import PIXEL_MEAN, PIXEL_STD

# variant -> (embed_dim, depth, num_heads, global_attn_indexes), as segment_anything's
# build_sam_vit_{b,l,h}.
VARIANTS = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


@MODELS.register("sam")
class Sam(nn.Module):
  """SAM with the official ViT-B/L/H settings by `variant`; every size may be overridden
  (the encoder_* options replace the variant's), e.g. for small tests.

  num_classes is unused (SAM's masks have no class); it is there for `build_model`.
  freeze_image_encoder / freeze_prompt_encoder mark those parameters frozen for
  fine-tuning (`frozen_params_mask`); the positional encoding's Gaussian matrix is
  always frozen (a buffer in the reference).
  """
  task = "promptable"  # the segjax task that trains and runs it (segjax/tasks)
  num_classes: int = 0
  variant: str = "vit_b"
  image_size: int = 1024
  patch_size: int = 16
  encoder_embed_dim: Optional[int] = None
  encoder_depth: Optional[int] = None
  encoder_num_heads: Optional[int] = None
  encoder_global_attn_indexes: Optional[Sequence[int]] = None
  window_size: int = 14
  mlp_ratio: float = 4.0
  prompt_embed_dim: int = 256
  mask_in_chans: int = 16
  decoder_depth: int = 2
  decoder_num_heads: int = 8
  decoder_mlp_dim: int = 2048
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256
  freeze_image_encoder: bool = True
  freeze_prompt_encoder: bool = False
  remat: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def encoder_settings(self) -> Tuple[int, int, int, Tuple[int, ...]]:
    """(embed_dim, depth, num_heads, global_attn_indexes) of the image encoder."""
    if self.variant not in VARIANTS:
      raise ValueError(f"Unknown SAM variant {self.variant!r}; use one of {sorted(VARIANTS)}.")
    defaults = VARIANTS[self.variant]
    given = (self.encoder_embed_dim, self.encoder_depth, self.encoder_num_heads,
             None if self.encoder_global_attn_indexes is None
             else tuple(int(i) for i in self.encoder_global_attn_indexes))
    dim, depth, heads, glob = (d if g is None else g for g, d in zip(given, defaults))
    if dim % heads:
      raise ValueError(f"SAM's encoder_embed_dim {dim} is not divisible by its "
                       f"encoder_num_heads {heads}.")
    if any(not 0 <= i < depth for i in glob):
      raise ValueError(f"SAM's encoder_global_attn_indexes {glob} must be block indices "
                       f"below encoder_depth {depth}.")
    if self.image_size % self.patch_size:
      raise ValueError(f"SAM's image_size {self.image_size} is not a multiple of its "
                       f"patch_size {self.patch_size}.")
    c = self.prompt_embed_dim
    if c % 8 or (c // 2) % self.decoder_num_heads or self.mask_in_chans % 4:
      raise ValueError(f"SAM needs prompt_embed_dim ({c}) divisible by 8 and its half by "
                       f"decoder_num_heads ({self.decoder_num_heads}), and mask_in_chans "
                       f"({self.mask_in_chans}) divisible by 4.")
    return dim, depth, heads, glob

  @property
  def image_embedding_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def mask_input_size(self) -> int:
    """Side of the low-resolution masks (mask prompts and decoder outputs)."""
    return 4 * self.image_embedding_size

  @property
  def input_shape(self) -> Tuple[int, int, int, int]:
    """The image batch shape to initialize the model with."""
    return (1, self.image_size, self.image_size, 3)

  @property
  def pixel_mean(self) -> Tuple[float, float, float]:
    return PIXEL_MEAN

  @property
  def pixel_std(self) -> Tuple[float, float, float]:
    return PIXEL_STD

  def setup(self):
    dim, depth, heads, glob = self.encoder_settings()
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    grid = self.image_embedding_size
    self.image_encoder = ImageEncoderViT(
        img_size=self.image_size, patch_size=self.patch_size, embed_dim=dim, depth=depth,
        num_heads=heads, mlp_ratio=self.mlp_ratio, out_chans=self.prompt_embed_dim,
        window_size=self.window_size, global_attn_indexes=glob, remat=self.remat, **kw)
    self.prompt_encoder = PromptEncoder(
        embed_dim=self.prompt_embed_dim, image_embedding_size=(grid, grid),
        input_image_size=(self.image_size, self.image_size), mask_in_chans=self.mask_in_chans,
        **kw)
    self.mask_decoder = MaskDecoder(
        transformer_dim=self.prompt_embed_dim, num_multimask_outputs=self.num_multimask_outputs,
        iou_head_depth=self.iou_head_depth, iou_head_hidden_dim=self.iou_head_hidden_dim,
        transformer_depth=self.decoder_depth, transformer_num_heads=self.decoder_num_heads,
        transformer_mlp_dim=self.decoder_mlp_dim, **kw)

  def embed_image(self, images):
    """[B, h, w, 3] normalized images, h and w at most image_size (zero-padded
    bottom-right to it, as the reference's preprocess) -> [B, g, g, prompt_embed_dim],
    g = image_size / patch_size."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"SAM expects a batch of RGB images shaped (batch, height, width, 3), "
                       f"got shape {tuple(images.shape)}.")
    if images.dtype.kind != "f":
      raise ValueError(f"SAM expects normalized floating-point images, got dtype "
                       f"{images.dtype}; normalize them (segjax.models.sam.transforms).")
    h, w = images.shape[1:3]
    s = self.image_size
    if h > s or w > s:
      raise ValueError(f"SAM with image_size {s} got {h}x{w} images; resize their longest "
                       f"side to {s} (segjax.models.sam.transforms.preprocess).")
    if (h, w) != (s, s):
      images = jnp.pad(images, ((0, 0), (0, s - h), (0, s - w), (0, 0)))
    return self.image_encoder(images).astype(jnp.float32)

  def decode(self, image_embeddings, point_coords=None, point_labels=None, boxes=None,
             box_valid=None, mask_inputs=None, mask_valid=None, point_valid=None,
             multimask_output: bool = True):
    """Masks for Q queries per image.

    Args:
      image_embeddings: [B, g, g, C] from `embed_image`.
      point_coords: [B, Q, N, 2] (x, y) in the padded input frame (after
        `transforms.apply_coords`); point_labels [B, Q, N]: 1 foreground, 0 background,
        -1 not-a-point; point_valid [B, Q, N] (default all): False drops the point.
      boxes: [B, Q, 4] (x0, y0, x1, y1) in the input frame; box_valid [B, Q] (default all).
      mask_inputs: [B, Q, 4g, 4g, 1] low-resolution mask logits (a previous output);
        mask_valid [B, Q] (default all).
      multimask_output: 3 masks per query (the multimask tokens) or 1 (the single-mask token).

    Returns:
      (low_res_masks [B, Q, M, 4g, 4g] logits, iou_predictions [B, Q, M]), float32.
    """
    b = image_embeddings.shape[0]
    q = next((x.shape[1] for x in (point_coords, boxes, mask_inputs) if x is not None), 1)
    grid = self.image_embedding_size
    expected = (b, grid, grid, self.prompt_embed_dim)
    if tuple(image_embeddings.shape) != expected:
      raise ValueError(f"SAM's image_embeddings must have shape {expected} (from "
                       f"embed_image), got {tuple(image_embeddings.shape)}.")
    prompts = dict(point_coords=point_coords, point_labels=point_labels,
                   point_valid=point_valid, boxes=boxes, box_valid=box_valid,
                   mask_inputs=mask_inputs, mask_valid=mask_valid)
    check_prompts((b, q), (self.mask_input_size,) * 2, **prompts)
    sparse, valid, dense = self.prompt_encoder((b, q), **prompts)
    return self.mask_decoder(image_embeddings, self.prompt_encoder.get_dense_pe(), sparse,
                             valid, dense, multimask_output)

  def __call__(self, images, point_coords=None, point_labels=None, boxes=None, box_valid=None,
               mask_inputs=None, mask_valid=None, point_valid=None,
               multimask_output: bool = True, train: bool = False):
    """`decode(embed_image(images), ...)`; `train` is unused (no dropout, no BatchNorm)."""
    del train
    prompts = (point_coords, boxes, mask_inputs)
    if self.is_initializing() and all(p is None for p in prompts):
      # One query with every kind of prompt, so that every parameter is created.
      b = images.shape[0]
      g = self.mask_input_size
      point_coords, point_labels = jnp.zeros((b, 1, 1, 2)), jnp.ones((b, 1, 1), jnp.int32)
      boxes, box_valid = jnp.zeros((b, 1, 4)), jnp.zeros((b, 1), bool)
      mask_inputs, mask_valid = jnp.zeros((b, 1, g, g, 1)), jnp.zeros((b, 1), bool)
    return self.decode(self.embed_image(images), point_coords, point_labels, boxes, box_valid,
                       mask_inputs, mask_valid, point_valid, multimask_output)

  def frozen_params_mask(self, params: Mapping[str, Any]) -> Any:
    """True for the parameters fine-tuning leaves alone (see the class docstring)."""
    def frozen(path, _):
      names = [getattr(k, "key", str(k)) for k in path]
      top = names[0] if names else ""
      return ("positional_encoding_gaussian_matrix" in names
              or (top == "image_encoder" and self.freeze_image_encoder)
              or (top == "prompt_encoder" and self.freeze_prompt_encoder))
    return jax.tree_util.tree_map_with_path(frozen, dict(params))
