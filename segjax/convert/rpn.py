"""torchvision `RPNHead` -> variables of segjax's `RPNHead` (segjax/models/rpn.py)."""
import re
from typing import Any, Dict, Mapping

import numpy as np


def torch_rpn_head_to_flax(state_dict: Mapping[str, Any],
                           prefix: str = "rpn.head.") -> Dict[str, Any]:
  """Converts the RPN head of a torchvision detector state dict into {'params'} for `RPNHead`.

  Maps `{prefix}conv.{i}.0` -> `conv_{i}` (also the pre-v2 single `{prefix}conv`),
  `{prefix}cls_logits` -> `cls_logits`, `{prefix}bbox_pred` -> `bbox_pred`; conv weights
  OIHW -> HWIO. Keys outside `prefix` are ignored. Build the head as
  `RPNHead(num_anchors=params['cls_logits']['bias'].shape[0], conv_depth=<number of conv_*>)`.
  """
  head = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  if not head:
    raise ValueError(f"No key starts with {prefix!r}; pass a torchvision detector state dict "
                     "(or the head's own with prefix='').")
  modules = {}
  for key in head:
    m = re.fullmatch(r"(conv\.(\d+)\.0|conv|cls_logits|bbox_pred)\.(weight|bias)", key)
    if not m:
      raise ValueError(f"Unknown RPN head key {prefix}{key}; expected conv.<i>.0, cls_logits or "
                       "bbox_pred weights and biases.")
    name = "conv_0" if m[1] == "conv" else f"conv_{m[2]}" if m[2] else m[1]
    modules.setdefault(name, {})[m[3]] = key
  params = {}
  for name, keys in modules.items():
    if set(keys) != {"weight", "bias"}:
      raise ValueError(f"RPN head module {name} needs a weight and a bias, got {sorted(keys)}.")
    weight = np.asarray(head[keys["weight"]], dtype=np.float32)
    bias = np.asarray(head[keys["bias"]], dtype=np.float32)
    if weight.ndim != 4 or bias.shape != weight.shape[:1]:
      raise ValueError(f"{prefix}{keys['weight']} / bias have shapes {weight.shape} / "
                       f"{bias.shape}; expected an OIHW conv weight and a matching bias.")
    params[name] = {"kernel": weight.transpose(2, 3, 1, 0), "bias": bias}
  depth = sum(name.startswith("conv_") for name in params)
  expected = {f"conv_{i}" for i in range(depth)} | {"cls_logits", "bbox_pred"}
  if set(params) != expected:
    raise ValueError(f"RPN head modules {sorted(params)} are incomplete; expected "
                     f"{sorted(expected)}.")
  num_anchors = params["cls_logits"]["bias"].shape[0]
  if params["bbox_pred"]["bias"].shape[0] != 4 * num_anchors:
    raise ValueError(f"bbox_pred has {params['bbox_pred']['bias'].shape[0]} outputs; expected "
                     f"4 x {num_anchors} (the cls_logits outputs).")
  return {"params": params}
