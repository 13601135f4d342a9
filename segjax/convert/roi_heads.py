"""torchvision RoI heads (`TwoMLPHead` + `FastRCNNPredictor`, `MaskRCNNHeads` +
`MaskRCNNPredictor`) -> variables of segjax's `BoxHead` / `MaskHead`
(segjax/models/roi_heads.py), and the constructor arguments matching them."""
import math
import re
from typing import Any, Dict, Mapping, Tuple

import numpy as np


_KEY = re.compile(r"(box_head\.(?P<fc>fc6|fc7)"
                  r"|box_predictor\.(?P<pred>cls_score|bbox_pred)"
                  r"|mask_head\.(?:(?P<conv>\d+)\.0|mask_fcn(?P<legacy>\d+))"
                  r"|mask_predictor\.(?P<mpred>conv5_mask|mask_fcn_logits))"
                  r"\.(?P<kind>weight|bias)")


def _group_keys(heads: Mapping[str, Any], prefix: str) -> Dict[Tuple[str, str], Dict[str, str]]:
  """Maps (head, flax module) -> {'weight': key, 'bias': key} of the state dict."""
  modules = {}
  for key in heads:
    m = _KEY.fullmatch(key)
    if not m or (m["legacy"] is not None and int(m["legacy"]) < 1):
      raise ValueError(
          f"Unknown RoI heads key {prefix}{key}; expected box_head.fc6/fc7, "
          "box_predictor.cls_score/bbox_pred, mask_head.<i>.0 (or legacy mask_head.mask_fcn<i>), "
          "mask_predictor.conv5_mask/mask_fcn_logits weights and biases (TwoMLPHead and "
          "MaskRCNNHeads without norm layers; other heads are not supported).")
    if m["fc"] or m["pred"]:
      module = ("box_head", m["fc"] or m["pred"])
    elif m["mpred"]:
      module = ("mask_head", m["mpred"])
    else:
      index = int(m["conv"]) if m["conv"] is not None else int(m["legacy"]) - 1
      module = ("mask_head", f"mask_fcn_{index}")
    entry = modules.setdefault(module, {})
    if m["kind"] in entry:
      raise ValueError(f"{prefix}{entry[m['kind']]} and {prefix}{key} are the same parameter "
                       "(current and legacy names); keep one of them.")
    entry[m["kind"]] = key
  return modules


def _weight_bias(heads, keys, prefix, name, weight_ndim):
  if set(keys) != {"weight", "bias"}:
    raise ValueError(f"RoI heads module {name} needs a weight and a bias, got {sorted(keys)}.")
  weight = np.asarray(heads[keys["weight"]], dtype=np.float32)
  bias = np.asarray(heads[keys["bias"]], dtype=np.float32)
  out_axis = 1 if name == "conv5_mask" else 0  # ConvTranspose2d weights are (in, out, kh, kw)
  if weight.ndim != weight_ndim or bias.shape != (weight.shape[out_axis],):
    raise ValueError(f"{prefix}{keys['weight']} / bias have shapes {weight.shape} / {bias.shape}; "
                     f"expected a {weight_ndim}-D weight and a matching bias.")
  return weight, bias


def _check_complete(head, modules, expected):
  if set(modules) != expected:
    raise ValueError(f"RoI {head} modules {sorted(modules)} are incomplete or not contiguous; "
                     f"expected {sorted(expected)}.")


def torch_roi_heads_to_flax(state_dict: Mapping[str, Any], prefix: str = "roi_heads.",
                            channels: int = 256) -> Dict[str, Any]:
  """Converts the RoI heads of a torchvision detector state dict into `BoxHead`/`MaskHead` vars.

  Maps `{prefix}box_head.fc6/fc7` and `{prefix}box_predictor.cls_score/bbox_pred` to the
  `BoxHead` modules of the same names, `{prefix}mask_head.{i}.0` (or the legacy
  `mask_head.mask_fcn{i+1}`) to `mask_fcn_{i}`, and `{prefix}mask_predictor.conv5_mask /
  mask_fcn_logits` to the `MaskHead` modules of the same names. Linear weights are transposed,
  conv weights OIHW -> HWIO, the ConvTranspose2d weight (in, out, kh, kw) -> (kh, kw, in, out)
  flipped spatially (flax's ConvTranspose correlates the dilated input with the kernel, torch
  scatters with it). torch flattens the pooled features as (C, P, P) before fc6, `BoxHead` as
  (P, P, C): the fc6 kernel rows are permuted with P = sqrt(fc6 inputs / channels). Keys
  outside `prefix` are ignored.

  Args:
    state_dict: name -> array (torch tensors are converted with np.asarray).
    prefix: the RoI heads' key prefix ('' for a bare RoIHeads state dict).
    channels: C, channels of the pooled box features (torchvision's FPN: 256).

  Returns:
    {'box_head': {'params': ...}} plus 'mask_head' when the state dict has mask keys; build the
    modules from `roi_heads_config` of it.
  """
  heads = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  if not heads:
    raise ValueError(f"No key starts with {prefix!r}; pass a torchvision detector state dict "
                     "(or the RoI heads' own with prefix='').")
  if not isinstance(channels, int) or channels < 1:
    raise ValueError(f"channels must be a positive int (the pooled feature channels), got "
                     f"{channels!r}.")
  modules = _group_keys(heads, prefix)
  box = {name: keys for (head, name), keys in modules.items() if head == "box_head"}
  mask = {name: keys for (head, name), keys in modules.items() if head == "mask_head"}
  _check_complete("box head", box, {"fc6", "fc7", "cls_score", "bbox_pred"})

  params = {}
  for name, keys in box.items():
    weight, bias = _weight_bias(heads, keys, prefix, name, 2)
    params[name] = {"kernel": weight.T, "bias": bias}
  rep, fc6_in = params["fc6"]["kernel"].shape[::-1]
  size = math.isqrt(fc6_in // channels)
  if size * size * channels != fc6_in:
    raise ValueError(f"fc6 takes {fc6_in} inputs, not channels x P x P for channels={channels}; "
                     "pass the channel count of the pooled box features as `channels`.")
  params["fc6"]["kernel"] = (params["fc6"]["kernel"].reshape(channels, size, size, rep)
                             .transpose(1, 2, 0, 3).reshape(fc6_in, rep))
  num_outputs = params["cls_score"]["bias"].shape[0]
  if (params["fc7"]["kernel"].shape != (rep, rep)
      or params["cls_score"]["kernel"].shape[0] != rep
      or params["bbox_pred"]["kernel"].shape != (rep, 4 * num_outputs)):
    raise ValueError(f"Box head shapes disagree: fc6 {(fc6_in, rep)}, fc7 "
                     f"{params['fc7']['kernel'].shape}, cls_score "
                     f"{params['cls_score']['kernel'].shape}, bbox_pred "
                     f"{params['bbox_pred']['kernel'].shape} (in, out); expected fc7 (R, R), "
                     "cls_score (R, K + 1) and bbox_pred (R, 4 (K + 1)).")
  if num_outputs < 2:
    raise ValueError(f"cls_score has {num_outputs} output; expected K + 1 >= 2 (background "
                     "first).")
  converted = {"box_head": {"params": params}}
  if not mask:
    return converted

  num_convs = sum(name.startswith("mask_fcn_") and name != "mask_fcn_logits" for name in mask)
  _check_complete("mask head", mask, {f"mask_fcn_{i}" for i in range(num_convs)}
                  | {"conv5_mask", "mask_fcn_logits"})
  params = {}
  for name, keys in mask.items():
    weight, bias = _weight_bias(heads, keys, prefix, name, 4)
    if name == "conv5_mask":
      params[name] = {"kernel": weight.transpose(2, 3, 0, 1)[::-1, ::-1].copy(), "bias": bias}
    else:
      params[name] = {"kernel": weight.transpose(2, 3, 1, 0), "bias": bias}
  layers = [f"mask_fcn_{i}" for i in range(num_convs)] + ["conv5_mask"]
  width = params["conv5_mask"]["kernel"].shape[-1]
  shapes = [params[name]["kernel"].shape for name in layers + ["mask_fcn_logits"]]
  consistent = (all(params[name]["kernel"].shape[-1] == width for name in layers)
                and all(params[name]["kernel"].shape[:2] == (3, 3) for name in layers[:-1])
                and params["conv5_mask"]["kernel"].shape[:2] == (2, 2)
                and all(params[b]["kernel"].shape[2] == width
                        for b in layers[1:] + ["mask_fcn_logits"])
                and params["mask_fcn_logits"]["kernel"].shape[:2] == (1, 1))
  if not consistent:
    raise ValueError(f"Mask head kernels (kh, kw, in, out) {shapes} for {layers} and "
                     "mask_fcn_logits do not form MaskHead: 3x3 convs and a 2x2 deconv of one "
                     "width, then a 1x1 conv.")
  if params["mask_fcn_logits"]["bias"].shape[0] != num_outputs:
    raise ValueError(f"mask_fcn_logits has {params['mask_fcn_logits']['bias'].shape[0]} outputs "
                     f"but cls_score {num_outputs}; both must be K + 1.")
  converted["mask_head"] = {"params": params}
  return converted


def roi_heads_config(converted: Mapping[str, Any]) -> Dict[str, int]:
  """Constructor arguments matching `torch_roi_heads_to_flax` output.

  Returns dict(num_classes=K, representation_size=...) for `BoxHead` and, when a mask head was
  converted, mask_channels and mask_num_convs: `MaskHead(num_classes,
  channels=mask_channels, num_convs=mask_num_convs)` (the dilation is not in the weights;
  torchvision's is 1).
  """
  if "box_head" not in converted:
    raise ValueError("converted has no 'box_head'; pass the output of torch_roi_heads_to_flax.")
  box = converted["box_head"]["params"]
  config = dict(num_classes=int(box["cls_score"]["bias"].shape[0]) - 1,
                representation_size=int(box["fc6"]["kernel"].shape[1]))
  if "mask_head" in converted:
    mask = converted["mask_head"]["params"]
    config["mask_channels"] = int(mask["conv5_mask"]["kernel"].shape[-1])
    config["mask_num_convs"] = sum(name.startswith("mask_fcn_") and name != "mask_fcn_logits"
                                   for name in mask)
  return config
