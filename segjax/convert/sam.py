"""segment_anything checkpoints (sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth,
sam_vit_h_4b8939.pth, or any `Sam` state dict) -> segjax `Sam` variables.

segjax's parameter paths are segment_anything's module names, with list indices as
`_<i>` suffixes (image_encoder/blocks_3/attn/qkv <- image_encoder.blocks.3.attn.qkv,
mask_decoder/output_upscaling_0 <- mask_decoder.output_upscaling.0). Leaves:

  Linear weight (out, in)                -> kernel (in, out)
  Conv2d weight OIHW                     -> kernel HWIO
  ConvTranspose2d weight (in, out, 2, 2) -> kernel (2, 2, in, out), flipped spatially
                                            (segjax.layers.Deconv2x2)
  LayerNorm / LayerNorm2d weight, bias   -> scale, bias
  Embedding weight                       -> embedding
  pos_embed, rel_pos_h/w, positional_encoding_gaussian_matrix: as they are

The non-persistent buffers pixel_mean / pixel_std are ignored if present; any other
key the model lacks, any it needs and the checkpoint lacks, and any of another shape
are listed together in one error.

  python -m segjax.convert --arch sam_vit_b --input sam_vit_b_01ec64.pth --output sam_vit_b.npz

`load_peer_checkpoint` (segjax/convert/mmseg.py) converts these on the fly for a
config whose model is "sam" (predict.py / eval.py --checkpoint x.pth).
"""
import re
from typing import Any, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from segjax.convert.common import CONVERTERS
from segjax.models.sam import VARIANTS, Sam

_IGNORED = ("pixel_mean", "pixel_std")
_INDEXED = re.compile(r"^(.*)_(\d+)$")
_RENAMED_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def torch_name(path) -> str:
  """The segment_anything state-dict key of a segjax `Sam` parameter path."""
  *modules, leaf = path
  parts = []
  for module in modules:
    m = _INDEXED.match(module)
    parts.append(f"{m[1]}.{m[2]}" if m else module)
  return ".".join(parts + [_RENAMED_LEAVES.get(leaf, leaf)])


def _from_torch(path, value: np.ndarray) -> np.ndarray:
  """A torch tensor in the layout of segjax's leaf at `path`."""
  if path[-1] != "kernel":
    return value
  if value.ndim == 2:  # Linear
    return value.T
  if any(m.startswith("output_upscaling_") for m in path):  # ConvTranspose2d
    return value.transpose(2, 3, 0, 1)[::-1, ::-1]
  return value.transpose(2, 3, 1, 0)  # Conv2d OIHW -> HWIO


def _expected_params(model: Sam) -> Dict[tuple, Any]:
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(model.input_shape)))
  return traverse_util.flatten_dict(dict(shapes["params"]))


def check_shapes(shapes: Mapping[str, Sequence[int]], model: Sam,
                 expected: Optional[Dict[tuple, Any]] = None) -> None:
  """Raises one ValueError listing every key of a state dict's {name: shape} that is
  missing, unknown or misshapen for `model` (`expected`: its flat abstract params)."""
  expected = _expected_params(model) if expected is None else expected
  wanted = {torch_name(path): path for path in expected}
  missing = sorted(set(wanted) - set(shapes))
  unknown = sorted(k for k in shapes if k not in wanted and k not in _IGNORED)
  misshapen = []
  for key, path in wanted.items():
    if key in shapes:
      shape = tuple(_from_torch(path, np.empty(tuple(shapes[key]), np.bool_)).shape)
      if shape != tuple(expected[path].shape):
        misshapen.append(f"{key} {tuple(shapes[key])} (segjax {'/'.join(path)} needs "
                         f"{tuple(expected[path].shape)})")
  if missing or unknown or misshapen:
    raise ValueError(f"State dict does not fit SAM ({_describe(model)}): missing keys "
                     f"{missing or 'none'}; unknown keys {unknown or 'none'}; misshapen keys "
                     f"{misshapen or 'none'}.{_variant_hint(shapes, model)}")


def torch_sam_to_flax(state_dict: Mapping[str, Any], model: Optional[Sam] = None
                      ) -> Dict[str, Any]:
  """{"params": ...} for `model` (default `Sam()`, ViT-B) from a segment_anything `Sam`
  state dict (torch tensors or arrays); raises one ValueError that lists every missing,
  unknown and misshapen key."""
  model = Sam() if model is None else model
  expected = _expected_params(model)
  check_shapes({k: tuple(np.shape(v)) for k, v in state_dict.items()}, model, expected)
  flat = {}
  for path, leaf in expected.items():
    value = _from_torch(path, np.asarray(state_dict[torch_name(path)], dtype=np.float32))
    flat[path] = np.ascontiguousarray(value).astype(leaf.dtype)
  return {"params": traverse_util.unflatten_dict(flat)}


def _describe(model: Sam) -> str:
  dim, depth, heads, _ = model.encoder_settings()
  return (f"variant {model.variant}: encoder width {dim}, depth {depth}, {heads} heads, "
          f"image_size {model.image_size}")


def _variant_hint(shapes: Mapping[str, Sequence[int]], model: Sam) -> str:
  """A sentence naming the official variant the checkpoint's encoder looks like."""
  key = "image_encoder.patch_embed.proj.weight"
  if key not in shapes:
    return " It has no image encoder: is it a segment_anything Sam checkpoint?"
  dim = int(shapes[key][0])
  depth = len({k.split(".")[2] for k in shapes if k.startswith("image_encoder.blocks.")})
  for name, (v_dim, v_depth, _, _) in VARIANTS.items():
    if (dim, depth) == (v_dim, v_depth) and name != model.variant:
      return f" The checkpoint's encoder (width {dim}, depth {depth}) is SAM {name}; use that."
  return ""


def _register(variant: str) -> None:
  def convert(state_dict):
    return torch_sam_to_flax(state_dict, Sam(variant=variant))
  convert.__doc__ = f"segment_anything sam_{variant} -> segjax Sam(variant={variant!r})."
  CONVERTERS.register(f"sam_{variant}")(convert)


for _variant in VARIANTS:
  _register(_variant)
