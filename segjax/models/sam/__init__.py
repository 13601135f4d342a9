"""Segment Anything in Flax: image encoder, prompt encoder, two-way transformer and
mask decoder (one module each), the assembled `Sam` ("sam" in the model registry),
and the reference's pre/post-processing (transforms.py)."""
from segjax.models.sam.image_encoder import ImageEncoderViT
from segjax.models.sam.mask_decoder import MaskDecoder
from segjax.models.sam.prompt_encoder import PositionEmbeddingRandom, PromptEncoder
from segjax.models.sam.sam import VARIANTS, Sam
from segjax.models.sam.transformer import TwoWayTransformer

__all__ = ["ImageEncoderViT", "MaskDecoder", "PositionEmbeddingRandom", "PromptEncoder", "Sam",
           "TwoWayTransformer", "VARIANTS"]
