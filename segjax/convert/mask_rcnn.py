"""torchvision Mask R-CNN / Faster R-CNN checkpoints -> segjax `MaskRCNN` variables.

A whole `maskrcnn_resnet50_fpn` (or, without mask keys, `fasterrcnn_resnet50_fpn`) state dict
becomes the variables of `MaskRCNN(**mask_rcnn_options(variables))`:

  backbone.*                        -> params/backbone, batch_stats/backbone  (convert/fpn.py)
  rpn.head.*                        -> params/rpn_head                   (convert/rpn.py)
  roi_heads.box_head/box_predictor  -> params/box_head                   (convert/roi_heads.py)
  roi_heads.mask_head/mask_predictor -> params/mask_head (Mask R-CNN only)

torchvision counts the background among its classes (91 for COCO); segjax's `num_classes` does
not (90), and label l of torchvision is segjax class l - 1. Keys outside these prefixes are
errors, as are missing or misshapen ones; `*.num_batches_tracked` is ignored.

  python -m segjax.convert --arch maskrcnn_resnet50_fpn --input model.pth --output model.npz
"""
from typing import Any, Dict, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

from segjax.backbones.resnet import ARCHS
from segjax.convert.common import CONVERTERS
from segjax.convert.fpn import torch_resnet_fpn_to_flax
from segjax.convert.roi_heads import roi_heads_config, torch_roi_heads_to_flax
from segjax.convert.rpn import torch_rpn_head_to_flax
from segjax.models.mask_rcnn import MaskRCNN

_PREFIXES = ("backbone.", "rpn.head.", "roi_heads.")


def torch_mask_rcnn_to_flax(state_dict: Mapping[str, Any],
                            backbone: str = "resnet50") -> Dict[str, Any]:
  """Converts a torchvision Mask R-CNN or Faster R-CNN state dict into {'params',
  'batch_stats'} for `MaskRCNN(**mask_rcnn_options(result))`.

  Args:
    state_dict: name -> array of a torchvision FPN detector (torch tensors are accepted).
    backbone: the segjax ResNet of its body ('resnet50' for torchvision's builders).

  Raises:
    ValueError naming unknown, missing or misshapen keys, or heads MaskRCNN cannot build.
  """
  unknown = sorted(k for k in state_dict if not k.startswith(_PREFIXES))
  if unknown:
    raise ValueError(f"Unknown keys {unknown} for a torchvision Mask R-CNN / Faster R-CNN "
                     f"state dict (expected only keys under {list(_PREFIXES)}); strip a wrapper "
                     "prefix with --prefix.")
  body = torch_resnet_fpn_to_flax(state_dict, backbone)
  channels = int(body["params"]["fpn"]["layer_0"]["kernel"].shape[-1])
  heads = torch_roi_heads_to_flax(state_dict, channels=channels)
  params = {"backbone": body["params"],
            "rpn_head": torch_rpn_head_to_flax(state_dict)["params"],
            **{name: tree["params"] for name, tree in heads.items()}}
  variables = {"params": params, "batch_stats": {"backbone": body["batch_stats"]}}
  options = mask_rcnn_options(variables)
  _check_fits(variables, MaskRCNN(**options), options)
  return variables


def mask_rcnn_options(converted: Mapping[str, Any]) -> Dict[str, Any]:
  """The `MaskRCNN` constructor options the converted weights imply.

  Returns num_classes (torchvision's classes - 1), mask, backbone (from the ResNet's block
  layout and stem), fpn_channels, representation_size and, with a mask head, mask_channels and
  mask_num_convs. Options the weights do not fix (anchors, thresholds, RoIAlign mode) keep
  MaskRCNN's defaults, which are torchvision's.
  """
  params = converted.get("params", {}) if isinstance(converted, Mapping) else {}
  missing = [name for name in ("backbone", "rpn_head", "box_head") if name not in params]
  if missing:
    raise ValueError(f"converted['params'] lacks {missing}; pass the output of "
                     "torch_mask_rcnn_to_flax.")
  heads = {name: {"params": params[name]} for name in ("box_head", "mask_head") if name in params}
  config = roi_heads_config(heads)
  return dict(num_classes=config.pop("num_classes"), mask="mask_head" in params,
              backbone=_backbone_name(params["backbone"]["backbone"]),
              fpn_channels=int(params["backbone"]["fpn"]["layer_0"]["kernel"].shape[-1]),
              **config)


def _backbone_name(resnet: Mapping[str, Any]) -> str:
  """'resnet{depth}' (or '_v1c' for the deep stem) from the ResNet's module names."""
  blocks = tuple(sum(name.startswith(f"stage{s}_block") for name in resnet) for s in range(1, 5))
  bottleneck = "conv3" in resnet.get("stage1_block0", {})
  depths = [d for d, arch in ARCHS.items() if arch == (bottleneck, blocks)]
  if not depths:
    raise ValueError(f"ResNet with {blocks} blocks per stage (bottleneck={bottleneck}) is none "
                     f"of segjax's depths {sorted(ARCHS)}.")
  return f"resnet{depths[0]}" + ("_v1c" if "stem_conv2" in resnet else "")


def _check_fits(variables, model: MaskRCNN, options) -> None:
  """Raises unless `variables` has exactly the names and shapes of `model`'s variables."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  want = {k: v.shape for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}
  got = {k: v.shape for k, v in traverse_util.flatten_dict(variables, sep="/").items()}
  problems = ([f"{k} missing" for k in sorted(set(want) - set(got))]
              + [f"{k} not in the model" for k in sorted(set(got) - set(want))]
              + [f"{k} is {got[k]}, the model needs {want[k]}"
                 for k in sorted(set(want) & set(got)) if got[k] != want[k]])
  if problems:
    raise ValueError(f"The converted weights do not fit MaskRCNN(**{options}): "
                     f"{'; '.join(problems[:8])}{' ...' if len(problems) > 8 else ''}. "
                     "Only torchvision's RPNHead with one conv and 3 anchors per position, "
                     "TwoMLPHead and MaskRCNNHeads without norm layers are supported.")


for _arch in ("maskrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn"):
  CONVERTERS.register(_arch)(torch_mask_rcnn_to_flax)
