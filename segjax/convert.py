"""PyTorch ResNet weights -> segjax variables, and variables <-> .npz files.

Reads torchvision ResNet state dicts and mmseg ResNetV1c ones (deep stem). The
mapping, torch key -> segjax variable path (conv weights OIHW -> HWIO):

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


def torch_resnet_to_flax(state_dict: Mapping[str, Any], depth: int,
                         stem: str = "torchvision") -> Dict[str, Any]:
  """Converts a torchvision / mmseg ResNet state dict into {'params', 'batch_stats'}
  for `ResNet(depth=depth, stem=stem)`; raises naming any missing or unknown key."""
  model = ResNet(depth=depth, stem=stem)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  expected = traverse_util.flatten_dict(shapes)
  sources = {}
  for path in expected:
    collection, *modules, leaf = path
    prefix = _torch_module("/".join(modules), stem)
    attr = "weight" if leaf == "kernel" else _BN_LEAVES[(collection, leaf)]
    sources[path] = f"{prefix}.{attr}"

  missing = sorted(set(sources.values()) - set(state_dict))
  unknown = sorted(k for k in set(state_dict) - set(sources.values()) if not _ignored(k))
  if missing or unknown:
    raise ValueError(f"State dict does not fit ResNet-{depth} ({stem} stem): missing keys "
                     f"{missing or 'none'}; unknown keys {unknown or 'none'}.")
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
