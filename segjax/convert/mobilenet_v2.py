"""torchvision MobileNetV2 weights -> segjax `MobileNetV2` variables.

torch module (`mobilenet_v2().features`) -> segjax module, each a conv and its
BatchNorm (`.0`/`.1` -> `/conv`, `/bn`; conv weights OIHW -> HWIO):

  features.0.{0,1}               -> stem/{conv,bn}
  features.{i}.conv.0.{0,1}      -> block{i}/expand/{conv,bn}     (blocks with t > 1)
  features.{i}.conv.{j}.{0,1}    -> block{i}/depthwise/{conv,bn}  (j = 1 if t > 1 else 0)
  features.{i}.conv.{j+1}        -> block{i}/project/conv
  features.{i}.conv.{j+2}        -> block{i}/project/bn
  features.18.{0,1}              -> last_conv/{conv,bn}           (include_last_conv only)

`classifier.*` and `*.num_batches_tracked` are ignored, and so is
`features.18.*` when the model leaves the last conv out. Output stride and
dilation change no shapes, so one converted file serves every setting.
"""
import re
from typing import Any, Dict, Mapping

from segjax.backbones import MobileNetV2
from segjax.backbones.mobilenet_v2 import INVERTED_RESIDUAL_SETTING
from segjax.convert.common import CONVERTERS, convert_state_dict

# Expansion ratios of features.1 ... features.17, in order.
_RATIOS = [t for t, c, n, s in INVERTED_RESIDUAL_SETTING for _ in range(n)]
_LAST = len(_RATIOS) + 1  # features index of the final 1x1 conv


def _torch_module(module: str) -> str:
  """Flax module path ('block2/depthwise/bn') -> torch module ('features.2.conv.1.1')."""
  m = re.fullmatch(r"(stem|last_conv)/(conv|bn)", module)
  if m:
    return f"features.{0 if m[1] == 'stem' else _LAST}.{int(m[2] == 'bn')}"
  m = re.fullmatch(r"block(\d+)/(expand|depthwise|project)/(conv|bn)", module)
  if not m:
    raise ValueError(f"No PyTorch name for segjax module {module!r}.")
  index, layer, is_bn = int(m[1]), m[2], int(m[3] == "bn")
  depthwise = int(_RATIOS[index - 1] > 1)  # position of the depthwise unit in `conv`
  if layer == "project":  # a bare Conv2d and BatchNorm2d after the depthwise unit
    return f"features.{index}.conv.{depthwise + 1 + is_bn}"
  position = 0 if layer == "expand" else depthwise
  return f"features.{index}.conv.{position}.{is_bn}"


@CONVERTERS.register("mobilenet_v2")
def torch_mobilenet_v2_to_flax(state_dict: Mapping[str, Any], width_mult: float = 1.0,
                               include_last_conv: bool = False) -> Dict[str, Any]:
  """Converts a torchvision `mobilenet_v2(width_mult=...)` state dict into
  {'params', 'batch_stats'} for `MobileNetV2(width_mult, include_last_conv=...)`;
  raises naming any missing or unknown key."""
  model = MobileNetV2(width_mult=width_mult, include_last_conv=include_last_conv)

  def ignored(key: str) -> bool:
    return (key.endswith(".num_batches_tracked") or key.startswith("classifier.")
            or (not include_last_conv and key.startswith(f"features.{_LAST}.")))

  return convert_state_dict(state_dict, model, _torch_module, ignored,
                            f"MobileNetV2 (width_mult {width_mult})")
