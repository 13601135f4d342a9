"""torchvision VGG-16 weights -> segjax `VGG16` variables.

torchvision's `features` Sequential numbers its layers in order, pools
included, so conv{b}_{i} (and bn{b}_{i}) get the index of their place in it:

  vgg16:    conv1_1 -> features.0, conv1_2 -> features.2, [pool 4],
            conv2_1 -> features.5, ..., conv5_3 -> features.28
  vgg16_bn: conv1_1 -> features.0, bn1_1 -> features.1, conv1_2 -> features.3,
            bn1_2 -> features.4, [pool 6], conv2_1 -> features.7, ...,
            conv5_3 -> features.40, bn5_3 -> features.41

  features.N.{weight,bias}            -> params/conv{b}_{i}/{kernel,bias}
  features.N.{weight,bias}            -> params/bn{b}_{i}/{scale,bias}
  features.N.{running_mean,running_var} -> batch_stats/bn{b}_{i}/{mean,var}

`classifier.*` (the fully connected layers) and `*.num_batches_tracked` are
ignored; any other key the encoder lacks, or any key it needs and the state
dict lacks, is an error. `pad_first` and `ceil_mode` change no shapes, so the
result also fits an FCN's `backbone`.
"""
from typing import Any, Dict, Mapping

from segjax.backbones import VGG16
from segjax.backbones.vgg import BLOCKS
from segjax.convert.common import CONVERTERS, convert_state_dict


def _torch_modules(bn: bool) -> Dict[str, str]:
  """segjax module name -> torch module name, walking torchvision's `features`."""
  names, index = {}, 0
  for b, channels in enumerate(BLOCKS, start=1):
    for i in range(1, len(channels) + 1):
      names[f"conv{b}_{i}"] = f"features.{index}"
      if bn:
        names[f"bn{b}_{i}"] = f"features.{index + 1}"
      index += 3 if bn else 2  # conv, (BatchNorm,) ReLU
    index += 1  # max pool
  return names


def _ignored(key: str) -> bool:
  return key.startswith("classifier.") or key.endswith(".num_batches_tracked")


def torch_vgg_to_flax(state_dict: Mapping[str, Any], batch_norm: bool) -> Dict[str, Any]:
  """Converts a torchvision `vgg16` (or `vgg16_bn`) state dict into the variables
  of `VGG16(batch_norm=batch_norm)`; raises naming any missing or unknown key."""
  names = _torch_modules(batch_norm)
  return convert_state_dict(state_dict, VGG16(batch_norm=batch_norm), names.__getitem__,
                            _ignored, "vgg16_bn" if batch_norm else "vgg16")


CONVERTERS.register("vgg16")(lambda state_dict: torch_vgg_to_flax(state_dict, False))
CONVERTERS.register("vgg16_bn")(lambda state_dict: torch_vgg_to_flax(state_dict, True))
