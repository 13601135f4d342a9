"""torchvision ResNet-FPN detection backbones -> segjax `ResNetFPN` variables.

Reads the backbone of torchvision's `maskrcnn_resnet50_fpn` /
`fasterrcnn_resnet50_fpn` state dicts (or, with `prefix=""`, a bare
`resnet_fpn_backbone` one):

  backbone.body.<ResNet key>                      -> backbone/<as in convert/resnet.py>
  backbone.fpn.inner_blocks.{i}.0.{weight,bias}   -> params/fpn/inner_{i}/{kernel,bias}
  backbone.fpn.layer_blocks.{i}.0.{weight,bias}   -> params/fpn/layer_{i}/{kernel,bias}

FrozenBatchNorm2d and BatchNorm2d give the same keys (weight, bias, running
stats). Keys outside `prefix` (the detector's rpn.* and roi_heads.*) and
`*.num_batches_tracked` are ignored; any other key the architecture lacks, or
any it needs and the state dict lacks, is an error.
"""
import re
from typing import Any, Dict, Mapping

from segjax.convert.common import convert_state_dict
from segjax.convert.resnet import _torch_module as _resnet_torch_module
from segjax.models.fpn import ResNetFPN


def torch_resnet_fpn_to_flax(state_dict: Mapping[str, Any], backbone: str = "resnet50",
                             prefix: str = "backbone.") -> Dict[str, Any]:
  """Converts a torchvision detection state dict into {'params', 'batch_stats'} for
  `ResNetFPN(backbone=backbone)`; raises naming any missing or unknown key."""
  model = ResNetFPN(backbone=backbone)
  _, stem = model.resnet_arch()

  def torch_module(module: str) -> str:
    if module.startswith("backbone/"):
      return f"{prefix}body.{_resnet_torch_module(module[len('backbone/'):], stem)}"
    m = re.fullmatch(r"fpn/(inner|layer)_(\d+)", module)
    if not m:
      raise ValueError(f"No PyTorch name for segjax module {module!r}.")
    return f"{prefix}fpn.{m[1]}_blocks.{m[2]}.0"

  def ignored(key: str) -> bool:
    return key.endswith(".num_batches_tracked") or not key.startswith(prefix)

  return convert_state_dict(state_dict, model, torch_module, ignored,
                            f"torchvision {backbone} FPN backbone")
