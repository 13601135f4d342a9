"""ResNet and torchvision segmentation-model weights -> segjax variables.

Reads torchvision ResNet state dicts, mmseg ResNetV1c ones (deep stem), and
torchvision's deeplabv3_resnet* / fcn_resnet* segmentation models (backbone.*
as below; classifier.* and aux_classifier.* onto the ASPP / FCN heads, see
`_HEAD_MODULES`). The ResNet mapping, torch key -> segjax variable path (conv
weights OIHW -> HWIO):

  conv1.weight                      -> params/stem_conv1/kernel        (torchvision stem)
  bn1.{weight,bias}                 -> params/stem_bn1/{scale,bias}
  bn1.{running_mean,running_var}    -> batch_stats/stem_bn1/{mean,var}
  stem.{0,3,6}.weight               -> params/stem_conv{1,2,3}/kernel  (v1c stem)
  stem.{1,4,7}.*                    -> stem_bn{1,2,3}, as bn1 above
  layer{s}.{b}.conv{i}.weight       -> params/stage{s}_block{b}/conv{i}/kernel
  layer{s}.{b}.bn{i}.*              -> stage{s}_block{b}/bn{i}
  layer{s}.{b}.downsample.0.weight  -> params/stage{s}_block{b}/downsample_conv/kernel
  layer{s}.{b}.downsample.1.*       -> stage{s}_block{b}/downsample_bn

`*.num_batches_tracked` and the classifier `fc.*` are ignored; any other key
the architecture lacks, or any key it needs and the state dict lacks, is an
error. Output stride, dilation and multi-grid change no shapes, so one
converted file serves every setting.

Variables are stored as an .npz of arrays named by their '/'-joined paths.
Command line:
  python -m segjax.convert --arch resnet50 --input model.pth --output model.npz
"""
import re
from typing import Any, Dict, Mapping

from segjax.backbones import BACKBONES, ResNet
from segjax.convert.common import CONVERTERS, convert_state_dict
from segjax.models.deeplab import DeepLabV3
from segjax.models.fcn import FCNResNet


def _torch_module(module: str, stem: str) -> str:
  """Flax module path ('stage1_block0/downsample_bn') -> torch module ('layer1.0.downsample.1')."""
  m = re.fullmatch(r"stem_(conv|bn)(\d)", module)
  if m:
    kind, i = m.group(1), int(m.group(2))
    if stem == "torchvision":
      return f"{kind}1"
    return f"stem.{3 * (i - 1) + (kind == 'bn')}"
  m = re.fullmatch(r"stage(\d)_block(\d+)/(\w+)", module)
  if not m:
    raise ValueError(f"No PyTorch name for segjax module {module!r}.")
  layer = m.group(3)
  layer = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(layer, layer)
  return f"layer{m.group(1)}.{m.group(2)}.{layer}"


def _ignored(key: str) -> bool:
  return key.endswith(".num_batches_tracked") or key.startswith("fc.")


def torch_resnet_to_flax(state_dict: Mapping[str, Any], depth: int,
                         stem: str = "torchvision") -> Dict[str, Any]:
  """Converts a torchvision / mmseg ResNet state dict into {'params', 'batch_stats'}
  for `ResNet(depth=depth, stem=stem)`; raises naming any missing or unknown key."""
  return convert_state_dict(state_dict, ResNet(depth=depth, stem=stem),
                  lambda module: _torch_module(module, stem), _ignored,
                  f"ResNet-{depth} ({stem} stem)")


# torchvision segmentation heads: segjax module path -> torch module name.
_HEAD_MODULES = {
    "deeplabv3": [(r"aspp/branch(\d)/(conv|bn)",
                   lambda m: f"classifier.0.convs.{m[1]}.{_cb(m[2])}"),
                  (r"aspp/pool_branch/(conv|bn)",
                   lambda m: f"classifier.0.convs.4.{1 + (m[1] == 'bn')}"),
                  (r"aspp/project/(conv|bn)", lambda m: f"classifier.0.project.{_cb(m[1])}"),
                  (r"head_conv/(conv|bn)", lambda m: f"classifier.{1 + (m[1] == 'bn')}"),
                  (r"classifier", lambda m: "classifier.4")],
    "fcn_resnet": [(r"head/conv0/(conv|bn)", lambda m: f"classifier.{_cb(m[1])}"),
                   (r"head/classifier", lambda m: "classifier.4")],
}
_AUX_MODULES = [(r"aux_head/conv0/(conv|bn)", lambda m: f"aux_classifier.{_cb(m[1])}"),
                (r"aux_head/classifier", lambda m: "aux_classifier.4")]


def _cb(kind: str) -> int:
  """Index of a conv (0) or its BatchNorm (1) in a torch Sequential."""
  return int(kind == "bn")


def torch_segmentation_to_flax(state_dict: Mapping[str, Any], model) -> Dict[str, Any]:
  """Converts torchvision's `deeplabv3_resnet*` / `fcn_resnet*` state dicts for the
  segjax `DeepLabV3` / `FCNResNet` module `model` (with `aux_channels=256` when the
  state dict has `aux_classifier.*`)."""
  kind = {"DeepLabV3": "deeplabv3", "FCNResNet": "fcn_resnet"}.get(type(model).__name__)
  if kind is None:
    raise ValueError(f"No torchvision layout for {type(model).__name__}; use DeepLabV3 or "
                     "FCNResNet.")
  rules = _HEAD_MODULES[kind] + _AUX_MODULES

  def torch_module(module: str) -> str:
    if module.startswith("backbone/"):
      return "backbone." + _torch_module(module[len("backbone/"):], "torchvision")
    for pattern, name in rules:
      m = re.fullmatch(pattern, module)
      if m:
        return name(m)
    raise ValueError(f"No PyTorch name for segjax module {module!r}.")

  return convert_state_dict(state_dict, model, torch_module,
                  lambda k: k.endswith(".num_batches_tracked"), f"torchvision {kind}")


def _register_backbone(name: str) -> None:
  def convert(state_dict):
    model = BACKBONES.get(name)()
    return torch_resnet_to_flax(state_dict, model.depth, model.stem)
  CONVERTERS.register(name)(convert)


def _register_segmentation(name: str, model_cls, backbone: str) -> None:
  def convert(state_dict):
    num_classes = state_dict["classifier.4.weight"].shape[0]
    aux = 256 if any(k.startswith("aux_classifier.") for k in state_dict) else 0
    return torch_segmentation_to_flax(
        state_dict, model_cls(num_classes=num_classes, backbone=backbone, aux_channels=aux))
  CONVERTERS.register(name)(convert)


for _name in BACKBONES.names():
  if _name.startswith("resnet"):
    _register_backbone(_name)
for _depth in (50, 101):
  _register_segmentation(f"deeplabv3_resnet{_depth}", DeepLabV3, f"resnet{_depth}")
  _register_segmentation(f"fcn_resnet{_depth}", FCNResNet, f"resnet{_depth}")
