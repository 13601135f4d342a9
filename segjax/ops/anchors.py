"""FPN anchors with torchvision's AnchorGenerator semantics, computed at trace time.

Per level: cell anchors `round([-w, -h, w, h] / 2)` with `h = size * sqrt(r)`,
`w = size / sqrt(r)` (r = height / width), ordered ratio-major then size; the
grid has `ceil(image / stride)` cells (the feature size of stride-2 convolutions
and pools with "same" padding); shifts are `arange(cells) * (image // cells)`,
torchvision's stride rule, which equals `stride` when the image size is a
multiple of it. Output order: positions row-major (outer), cell anchors (inner).
"""
import math

import jax.numpy as jnp
import numpy as np


def cell_anchors(sizes, aspect_ratios):
  """Zero-centred anchors [len(aspect_ratios) * len(sizes), 4] in float32."""
  scales = np.asarray(sizes, np.float32).reshape(-1)
  ratios = np.asarray(aspect_ratios, np.float32).reshape(-1)
  h_ratios = np.sqrt(ratios)
  w_ratios = np.float32(1) / h_ratios
  ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
  hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
  return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2))


def generate_anchors(image_size, strides=(4, 8, 16, 32, 64), sizes=(32, 64, 128, 256, 512),
                     aspect_ratios=(0.5, 1.0, 2.0), feature_sizes=None):
  """Anchors of each FPN level as a list of float32 arrays [Hl * Wl * A, 4].

  Args:
    image_size: static (height, width) of the (padded) input batch.
    strides: stride of each level; sets the grid size ceil(image / stride).
    sizes: per level, one anchor size or a tuple of sizes.
    aspect_ratios: height / width ratios, shared by all levels.
    feature_sizes: optional per-level (Hl, Wl) overriding the grid sizes, for
      backbones whose feature maps are not ceil(image / stride).
  """
  h, w = (int(v) for v in image_size)
  if h < 1 or w < 1:
    raise ValueError(f"image_size must be two positive ints (height, width), got {image_size}.")
  if len(strides) != len(sizes):
    raise ValueError(f"strides ({len(strides)}) and sizes ({len(sizes)}) must have one entry per "
                     "level.")
  if feature_sizes is None:
    feature_sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in strides]
  elif len(feature_sizes) != len(sizes):
    raise ValueError(f"feature_sizes needs one (Hl, Wl) per level ({len(sizes)}), got "
                     f"{len(feature_sizes)}.")
  out = []
  for (gh, gw), size in zip(feature_sizes, sizes):
    base = cell_anchors(size, aspect_ratios)
    shift_x = np.arange(gw, dtype=np.int64) * (w // gw)
    shift_y = np.arange(gh, dtype=np.int64) * (h // gh)
    sy, sx = np.meshgrid(shift_y, shift_x, indexing="ij")
    shifts = np.stack([sx, sy, sx, sy], axis=-1).reshape(-1, 1, 4).astype(np.float32)
    out.append(jnp.asarray((shifts + base[None]).reshape(-1, 4)))
  return out
