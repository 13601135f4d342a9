"""mmsegmentation segmentor checkpoints -> segjax variables, and loading a peer
checkpoint (mmseg, torchvision, or one already converted) into a built model.

An mmseg checkpoint ({"meta": ..., "state_dict": {...}}) of an EncoderDecoder
holds `backbone.*` (ResNetV1c: as in segjax/convert/resnet.py), `decode_head.*`
and `auxiliary_head.*`. Its modules map onto the segjax models that have
mmseg's layouts (conv weights OIHW -> HWIO; a ConvModule's `conv` / `bn` ->
`conv` / `bn`; BatchNorm running stats -> batch_stats):

  pspnet (PSPHead)
    decode_head.psp_modules.{i}.1.*           -> ppm/branch{i}/*
    decode_head.bottleneck.*                  -> bottleneck/*
    decode_head.conv_seg                      -> classifier
  deeplabv3_mmseg (ASPPHead), deeplabv3plus_mmseg (DepthwiseSeparableASPPHead)
    decode_head.image_pool.1.*                -> decode_head/image_pool/*
    decode_head.aspp_modules.{i}.*            -> decode_head/aspp{i}/*
      .{depthwise,pointwise}_conv.*           ->   /{depthwise,pointwise}/*   (separable)
    decode_head.bottleneck.*                  -> decode_head/bottleneck/*
    decode_head.c1_bottleneck.*               -> decode_head/c1_bottleneck/*   (v3+)
    decode_head.sep_bottleneck.{i}.{depthwise,pointwise}_conv.*
        -> decode_head/sep_bottleneck{i}/{depthwise,pointwise}/*
    decode_head.conv_seg                      -> decode_head/classifier
  fcn_mmseg (FCNHead, concat_input)
    decode_head.convs.{i}.*                   -> head/conv{i}/*
    decode_head.conv_cat.*                    -> head/conv_cat/*
    decode_head.conv_seg                      -> head/classifier
  every one, with an auxiliary FCNHead
    auxiliary_head.convs.{i}.*                -> aux_head/conv{i}/*
    auxiliary_head.conv_seg                   -> aux_head/classifier

`*.num_batches_tracked` is ignored; any other key the model lacks, any it needs
and the checkpoint lacks, and any of another shape is an error. The command line
converts with the full-size model of an mmseg config name, classes and
auxiliary head read from the checkpoint:

  python -m segjax.convert --arch pspnet_r50-d8 --input pspnet.pth --output pspnet.npz

`load_peer_checkpoint(path, model)` is the library form for a model you built
(a segjax `Sam` takes segment_anything checkpoints, segjax/convert/sam.py)
(any options): it reads .pth/.pt, .safetensors or an .npz, either converted
(variables) or a flat state dict, and returns {"params", "batch_stats"} checked
name by name and shape by shape against the model's own variables.
"""
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from segjax.backbones import BACKBONES
from segjax.convert.common import CONVERTERS, convert_state_dict, read_state_dict
from segjax.convert.resnet import _torch_module as _resnet_torch_module
from segjax.convert.resnet import torch_segmentation_to_flax
from segjax.models.deeplab import DeepLabV3, DeepLabV3MMSeg, DeepLabV3PlusMMSeg
from segjax.models.fcn import FCNMMSeg, FCNResNet
from segjax.models.pspnet import PSPNet

Rule = Tuple[str, Callable[[re.Match], str]]

_CONV_MODULE = r"(conv|bn)"  # an mmcv ConvModule's two weighted children
_SEPARABLE = {"depthwise": "depthwise_conv", "pointwise": "pointwise_conv"}


def _aspp_rules(prefix: str) -> List[Rule]:
  return [
      (rf"decode_head/image_pool/{_CONV_MODULE}", lambda m: f"{prefix}image_pool.1.{m[1]}"),
      (rf"decode_head/aspp(\d+)/{_CONV_MODULE}", lambda m: f"{prefix}aspp_modules.{m[1]}.{m[2]}"),
      (rf"decode_head/aspp(\d+)/(depthwise|pointwise)/{_CONV_MODULE}",
       lambda m: f"{prefix}aspp_modules.{m[1]}.{_SEPARABLE[m[2]]}.{m[3]}"),
      (rf"decode_head/(bottleneck|c1_bottleneck)/{_CONV_MODULE}",
       lambda m: f"{prefix}{m[1]}.{m[2]}"),
      (rf"decode_head/sep_bottleneck(\d)/(depthwise|pointwise)/{_CONV_MODULE}",
       lambda m: f"{prefix}sep_bottleneck.{m[1]}.{_SEPARABLE[m[2]]}.{m[3]}"),
      (r"decode_head/classifier", lambda m: f"{prefix}conv_seg"),
  ]


# segjax model class -> (mmseg decode head rules, what to call it in errors).
_HEADS: Dict[type, Tuple[List[Rule], str]] = {
    PSPNet: ([(rf"ppm/branch(\d+)/{_CONV_MODULE}",
               lambda m: f"decode_head.psp_modules.{m[1]}.1.{m[2]}"),
              (rf"bottleneck/{_CONV_MODULE}", lambda m: f"decode_head.bottleneck.{m[1]}"),
              (r"classifier", lambda m: "decode_head.conv_seg")], "mmseg PSPNet"),
    DeepLabV3MMSeg: (_aspp_rules("decode_head."), "mmseg DeepLabV3"),
    DeepLabV3PlusMMSeg: (_aspp_rules("decode_head."), "mmseg DeepLabV3+"),
    FCNMMSeg: ([(rf"head/conv(\d+)/{_CONV_MODULE}", lambda m: f"decode_head.convs.{m[1]}.{m[2]}"),
                (rf"head/conv_cat/{_CONV_MODULE}", lambda m: f"decode_head.conv_cat.{m[1]}"),
                (r"head/classifier", lambda m: "decode_head.conv_seg")], "mmseg FCN"),
}
_AUX_RULES: List[Rule] = [
    (rf"aux_head/conv(\d+)/{_CONV_MODULE}", lambda m: f"auxiliary_head.convs.{m[1]}.{m[2]}"),
    (r"aux_head/classifier", lambda m: "auxiliary_head.conv_seg"),
]


def mmseg_to_flax(state_dict: Mapping[str, Any], model) -> Dict[str, Any]:
  """Converts an mmseg EncoderDecoder state dict for the segjax model `model`
  (PSPNet, DeepLabV3MMSeg, DeepLabV3PlusMMSeg or FCNMMSeg, with `aux_channels` > 0
  when the checkpoint has `auxiliary_head.*`); raises naming any missing, unknown
  or misshapen key."""
  if type(model) not in _HEADS:
    raise ValueError(f"No mmseg layout for {type(model).__name__}; use one of "
                     f"{sorted(c.__name__ for c in _HEADS)} (model names pspnet, "
                     "deeplabv3_mmseg, deeplabv3plus_mmseg, fcn_mmseg).")
  head_rules, what = _HEADS[type(model)]
  stem = BACKBONES.get(model.backbone)().stem

  def torch_module(module: str) -> str:
    if module.startswith("backbone/"):
      return "backbone." + _resnet_torch_module(module[len("backbone/"):], stem)
    for pattern, name in head_rules + _AUX_RULES:
      m = re.fullmatch(pattern, module)
      if m:
        return name(m)
    raise ValueError(f"No mmseg name for segjax module {module!r}.")

  return convert_state_dict(state_dict, model, torch_module,
                            lambda k: k.endswith(".num_batches_tracked"), what)


# mmseg config name prefixes -> segjax model class.
_ARCHS = {"pspnet": PSPNet, "deeplabv3": DeepLabV3MMSeg, "deeplabv3plus": DeepLabV3PlusMMSeg,
          "fcn": FCNMMSeg}


def _register(arch: str, model_cls, depth: int) -> None:
  def convert(state_dict):
    key = "decode_head.conv_seg.weight"
    if key not in state_dict:
      raise ValueError(f"Not an mmseg {arch}_r{depth}-d8 checkpoint: it has no {key}.")
    num_classes = int(state_dict[key].shape[0])
    aux = 256 if any(k.startswith("auxiliary_head.") for k in state_dict) else 0
    model = model_cls(num_classes=num_classes, backbone=f"resnet{depth}_v1c", aux_channels=aux)
    return mmseg_to_flax(state_dict, model)
  convert.__doc__ = f"mmseg {arch}_r{depth}-d8 (output stride 8) -> segjax {model_cls.__name__}."
  CONVERTERS.register(f"{arch}_r{depth}-d8")(convert)


for _arch, _cls in _ARCHS.items():
  for _depth in (50, 101):
    _register(_arch, _cls, _depth)


def _expected_variables(model) -> Dict[tuple, Any]:
  """Flat {(collection, *path): ShapeDtypeStruct} of `model`'s variables, initialised in
  training mode so that train-only parts (the auxiliary head) are included."""
  shape = getattr(model, "input_shape", (1, 32, 32, 3))  # SAM's fixed input size
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0),
                                              "dropout": jax.random.key(0)},
                                             jnp.zeros(shape), train=True))
  return traverse_util.flatten_dict(dict(shapes))


def _check_variables(variables: Mapping[str, Any], model, path: str) -> Dict[str, Any]:
  """`variables` ({"params", "batch_stats"}) cast to the model's dtypes, after checking
  that their names and shapes are exactly the model's."""
  expected = _expected_variables(model)
  flat = traverse_util.flatten_dict({k: v for k, v in dict(variables).items()
                                     if k in ("params", "batch_stats")})
  join = lambda keys: "/".join(str(k) for k in keys)
  missing = sorted(join(k) for k in set(expected) - set(flat))
  unknown = sorted(join(k) for k in set(flat) - set(expected))
  misshapen = sorted(f"{join(k)} {tuple(np.shape(flat[k]))} (needs {expected[k].shape})"
                     for k in set(flat) & set(expected)
                     if tuple(np.shape(flat[k])) != tuple(expected[k].shape))
  if missing or unknown or misshapen:
    raise ValueError(f"{path} does not fit {type(model).__name__}: missing "
                     f"{missing or 'none'}; unknown {unknown or 'none'}; misshapen "
                     f"{misshapen or 'none'}.")
  variables = traverse_util.unflatten_dict(
      {k: np.asarray(flat[k], dtype=expected[k].dtype) for k in expected})
  variables.setdefault("batch_stats", {})  # models without BatchNorm (SAM) have none
  return variables


def _peer_converter(model) -> Callable[[Mapping[str, Any]], Dict[str, Any]]:
  from segjax.convert.sam import torch_sam_to_flax
  from segjax.models.sam import Sam
  if isinstance(model, Sam):
    return lambda state: torch_sam_to_flax(state, model)
  if type(model) in _HEADS:
    return lambda state: mmseg_to_flax(state, model)
  if isinstance(model, (DeepLabV3, FCNResNet)):
    return lambda state: torch_segmentation_to_flax(state, model)
  raise ValueError(f"No peer checkpoint layout for {type(model).__name__}; mmseg's fit "
                   f"{sorted(c.__name__ for c in _HEADS)}, torchvision's DeepLabV3 and "
                   "FCNResNet, segment_anything's Sam. Convert other weights with `python -m "
                   "segjax.convert`.")


def load_peer_checkpoint(path: str, model) -> Dict[str, Any]:
  """{"params", "batch_stats"} for the built segjax model `model` from an mmseg
  segmentor checkpoint (or a torchvision deeplabv3/fcn one, for those layouts).

  `path` is a .pth/.pt (needs torch), a .safetensors, or an .npz: either variables
  written by `python -m segjax.convert` or a flat state dict. The result has exactly
  the names, shapes and dtypes of `model`'s variables (auxiliary head included, as
  the model builds it in training); anything missing, unknown or misshapen raises a
  ValueError that names it.
  """
  if not Path(path).is_file():
    raise ValueError(f"Checkpoint {path} does not exist.")
  if Path(path).suffix == ".npz":
    with np.load(path) as data:
      names = list(data.files)
      if names and all(n.split("/", 1)[0] in ("params", "batch_stats") for n in names):
        variables = traverse_util.unflatten_dict({n: data[n] for n in names}, sep="/")
        return _check_variables(variables, model, path)
  if Path(path).suffix not in (".npz", ".safetensors", ".pth", ".pt", ".ckpt", ".bin"):
    raise ValueError(f"Checkpoint {path}: expected a .pth/.pt, .safetensors or .npz file.")
  state = read_state_dict(path)
  try:
    variables = _peer_converter(model)(state)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  return _check_variables(variables, model, path)
