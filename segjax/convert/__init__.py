"""PyTorch weights -> segjax variables, and the command line for it:

  python -m segjax.convert --arch resnet50 --input resnet50.pth --output resnet50.npz

Reads .pth/.pt (with `torch.load` where PyTorch is installed, else by
torch_pickle.py), .safetensors or .npz; writes an .npz of
'/'-joined variable paths that `load_variables` reads back. Each converter
module registers its architectures in `CONVERTERS`; whole mmsegmentation
segmentors go by their config names (`--arch pspnet_r50-d8`, deeplabv3_r50-d8,
deeplabv3plus_r50-d8, fcn_r50-d8 and the r101-d8 ones; segjax/convert/mmseg.py), Segment
Anything's official checkpoints by sam_vit_b, sam_vit_l, sam_vit_h (segjax/convert/sam.py).
`load_peer_checkpoint(path, model)` loads such a checkpoint into a model you built.
`resolve_init_from` (pretrained.py) does this by itself for short names (resnet50_v1c,
...) and URLs, downloading and converting once into a cache.
"""
import argparse
import sys
from typing import Optional, Sequence

import jax

from segjax.convert.common import (CONVERTERS, convert_state_dict, load_variables,
                                   read_state_dict, save_variables)
from segjax.convert.fpn import torch_resnet_fpn_to_flax
from segjax.convert.pretrained import PretrainedWeightsError, resolve_init_from
from segjax.convert.resnet import torch_resnet_to_flax, torch_segmentation_to_flax
import segjax.convert.mask_rcnn  # noqa: F401
from segjax.convert.mmseg import load_peer_checkpoint, mmseg_to_flax
import segjax.convert.mobilenet_v2  # noqa: F401
import segjax.convert.sam  # noqa: F401
import segjax.convert.vgg  # noqa: F401

__all__ = ["CONVERTERS", "PretrainedWeightsError", "convert_state_dict", "load_peer_checkpoint",
           "load_variables", "main", "mmseg_to_flax", "read_state_dict", "resolve_init_from",
           "save_variables", "torch_resnet_fpn_to_flax", "torch_resnet_to_flax",
           "torch_segmentation_to_flax"]


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m segjax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--arch", required=True, choices=CONVERTERS.names())
  parser.add_argument("--input", required=True, help=".pth/.pt, .safetensors or .npz")
  parser.add_argument("--output", required=True, help="the .npz to write")
  parser.add_argument("--prefix", default="",
                      help="take only keys under this prefix and strip it, e.g. 'backbone.' "
                           "for a whole mmseg segmentor checkpoint")
  args = parser.parse_args(argv)
  try:
    state = read_state_dict(args.input)
    if args.prefix:
      state = {k[len(args.prefix):]: v for k, v in state.items() if k.startswith(args.prefix)}
    variables = CONVERTERS.get(args.arch)(state)
    save_variables(variables, args.output)
  except (OSError, ImportError, ValueError) as e:
    sys.exit(f"error: {e}")
  count = sum(v.size for v in jax.tree.leaves(variables["params"]))
  print(f"Wrote {args.arch} ({count:,} parameters) to {args.output}.")
