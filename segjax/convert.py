"""PyTorch weights -> segjax variables, and variables <-> .npz files.

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
import argparse
import re
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from segjax.backbones import BACKBONES, ResNet

# (collection, flax leaf) -> torch BatchNorm attribute.
_BN_LEAVES = {("params", "scale"): "weight", ("params", "bias"): "bias",
              ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


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


def _convert(state_dict: Mapping[str, Any], model, torch_module, ignored, what: str
             ) -> Dict[str, Any]:
  """Fills `model`'s variables from `state_dict`; `torch_module` maps a flax module
  path to the torch module name. Missing, unknown or misshapen keys are errors."""
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0),
                                              "dropout": jax.random.key(0)},
                                             jnp.zeros((1, 32, 32, 3)), train=True))
  expected = traverse_util.flatten_dict(shapes)
  sources = {}
  for path in expected:
    collection, *modules, leaf = path
    attr = "weight" if leaf == "kernel" else _BN_LEAVES[(collection, leaf)]
    sources[path] = f"{torch_module('/'.join(modules))}.{attr}"

  missing = sorted(set(sources.values()) - set(state_dict))
  unknown = sorted(k for k in set(state_dict) - set(sources.values()) if not ignored(k))
  if missing or unknown:
    raise ValueError(f"State dict does not fit {what}: missing keys {missing or 'none'}; "
                     f"unknown keys {unknown or 'none'}.")
  flat = {}
  for path, key in sources.items():
    value = np.asarray(state_dict[key], dtype=np.float32)
    if path[-1] == "kernel":
      value = value.transpose(2, 3, 1, 0)
    if value.shape != expected[path].shape:
      raise ValueError(f"{key} has shape {value.shape} (after OIHW -> HWIO); "
                       f"{'/'.join(path)} needs {expected[path].shape}.")
    flat[path] = value
  return traverse_util.unflatten_dict(flat)


def torch_resnet_to_flax(state_dict: Mapping[str, Any], depth: int,
                         stem: str = "torchvision") -> Dict[str, Any]:
  """Converts a torchvision / mmseg ResNet state dict into {'params', 'batch_stats'}
  for `ResNet(depth=depth, stem=stem)`; raises naming any missing or unknown key."""
  return _convert(state_dict, ResNet(depth=depth, stem=stem),
                  lambda module: _torch_module(module, stem), _ignored,
                  f"ResNet-{depth} ({stem} stem)")


# torchvision segmentation heads: segjax module path -> torch module name.
_HEAD_MODULES = {
    "deeplabv3": [(r"aspp/branch(\d)/(conv|bn)", lambda m: f"classifier.0.convs.{m[1]}.{_cb(m[2])}"),
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

  return _convert(state_dict, model, torch_module,
                  lambda k: k.endswith(".num_batches_tracked"), f"torchvision {kind}")


def save_variables(variables: Mapping[str, Any], path: str) -> None:
  """Writes nested variables as an .npz of '/'-joined paths."""
  flat = traverse_util.flatten_dict(dict(variables), sep="/")
  with open(path, "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})


def load_variables(path: str) -> Dict[str, Any]:
  """Reads an .npz written by `save_variables` back into nested variables."""
  with np.load(path) as data:
    return traverse_util.unflatten_dict({k: data[k] for k in data.files}, sep="/")


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads a flat name -> array dict from .npz, .safetensors or a torch checkpoint.

  A checkpoint that wraps its weights (mmcv's {'state_dict': ...}, {'model': ...})
  is unwrapped.
  """
  suffix = Path(path).suffix
  if suffix == ".npz":
    with np.load(path) as data:
      return {k: data[k] for k in data.files}
  if suffix == ".safetensors":
    try:
      from safetensors.numpy import load_file
    except ImportError as e:
      raise ImportError("Reading .safetensors needs the 'safetensors' package.") from e
    return load_file(path)
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"Reading {path} needs PyTorch; or convert it to .npz or "
                      ".safetensors first.") from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  for key in ("state_dict", "model"):
    if isinstance(obj.get(key), Mapping):
      obj = obj[key]
      break
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in obj.items()}


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m segjax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--arch", required=True, choices=BACKBONES.names())
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
    model = BACKBONES.get(args.arch)()
    variables = torch_resnet_to_flax(state, model.depth, model.stem)
    save_variables(variables, args.output)
  except (OSError, ImportError, ValueError) as e:
    sys.exit(f"error: {e}")
  count = sum(v.size for v in jax.tree.leaves(variables["params"]))
  print(f"Wrote {args.arch} ({count:,} parameters) to {args.output}.")


if __name__ == "__main__":
  main()
