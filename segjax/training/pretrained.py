"""`model.init_from` into a fresh train state: a whole converted model's modules, or
ImageNet encoder weights into the encoder. The value is a converted .npz, a PyTorch
checkpoint, a URL or a short name (resnet50_v1c, ...), resolved by
`segjax.convert.resolve_init_from` (downloaded once into $SEGJAX_CACHE, checksummed)."""
from typing import Any, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from segjax.convert import load_variables, resolve_init_from


def _subtree(tree, path):
  for key in path:
    tree = tree.get(key, {}) if isinstance(tree, Mapping) else {}
  return tree


def _replace_subtree(tree, path, value):
  if not path:
    return value
  tree = dict(tree)
  tree[path[0]] = _replace_subtree(tree[path[0]], path[1:], value)
  return tree


def load_pretrained(state: Any, tx, init_from: str, state_shardings,
                    encoder_path: Tuple[str, ...] = ("backbone",),
                    arch: Optional[str] = None) -> Any:
  """Loads the weights `init_from` names into the state (`arch`: the converter of a
  PyTorch file whose name does not say, e.g. the model's backbone).

  A file whose top-level modules are all modules of this model (a whole converted
  detector, e.g. torchvision's maskrcnn_resnet50_fpn) replaces those modules; any
  other file is encoder weights (e.g. ImageNet ResNet-50) for the subtree at
  `encoder_path` (the model's `pretrained_path`).
  """
  path = resolve_init_from(init_from, arch)
  pretrained = load_variables(path)
  ours = {"params": dict(state.params), "batch_stats": dict(state.batch_stats)}
  theirs = {k: dict(pretrained.get(k, {})) for k in ours}
  whole_model = bool(theirs["params"]) and set(theirs["params"]) <= set(ours["params"])
  if whole_model:
    places = [(col, (name,), tree) for col in ours for name, tree in theirs[col].items()]
  else:
    if not _subtree(ours["params"], encoder_path):
      raise ValueError(f"model.init_from loads encoder weights, but this model has no "
                       f"{'/'.join(encoder_path)} module.")
    places = [(col, encoder_path, theirs[col]) for col in ours if theirs[col]]
  for col, where, value in places:
    want = jax.tree.map(lambda x: x.shape, _subtree(ours[col], where))
    got = jax.tree.map(lambda x: x.shape, value)
    if want != got:
      part = "modules" if whole_model else "encoder"
      raise ValueError(f"{path} does not fit this model's {part}: its {col} for "
                       f"{'/'.join(where)} have other names or shapes (check the --arch it was "
                       "converted with and the model's backbone, width and number of classes).")
    ours[col] = _replace_subtree(ours[col], where, value)
  fresh = type(state).create(ours["params"], ours["batch_stats"], tx)
  return jax.device_put(jax.tree.map(jnp.asarray, fresh), state_shardings)
