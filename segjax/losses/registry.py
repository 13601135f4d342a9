"""The loss registry and `build_loss`, which turns a config spec into one loss function.

Every registered loss is called as
`fn(logits, labels, ignore_index, class_weights, [pixel_weights,] **options)`
with (..., C) logits and (...) integer labels. How each uses class weights:

* cross_entropy, ohem_cross_entropy, focal: weighted mean as PyTorch's
  `cross_entropy(weight=)`; binary_cross_entropy, sigmoid_focal: each class
  channel's elements weigh w_c (numerator and denominator).
* dice: sum_c w_c (1 - dice_c) / C (mmseg); lovasz_softmax: weighted class mean.

Only cross_entropy, focal, binary_cross_entropy and sigmoid_focal take per-pixel
weights (`pixel_weights`, e.g. a U-Net weight map); the others ignore them.
The sigmoid losses treat each of the C channels as a binary problem against the
one-hot labels (with C = 1: against the 0/1 labels themselves).
"""
import inspect
import numbers
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from segjax.losses import common
from segjax.losses.binary_cross_entropy import binary_cross_entropy_with_logits
from segjax.losses.cross_entropy import cross_entropy
from segjax.losses.dice import dice_loss
from segjax.losses.focal import sigmoid_focal_loss, softmax_focal_loss
from segjax.losses.lovasz import lovasz_softmax
from segjax.losses.ohem import ohem_cross_entropy
from segjax.registry import Registry

LOSSES: Registry = Registry("loss")

# Arguments `build_loss`'s function supplies itself; the rest of a registered
# function's keyword arguments are its config options.
_CALL_ARGUMENTS = ("logits", "labels", "ignore_index", "class_weights", "pixel_weights")

LossFn = Callable[..., Tuple[jax.Array, Dict[str, jax.Array]]]

LOSSES.register("cross_entropy")(cross_entropy)
LOSSES.register("ohem_cross_entropy")(ohem_cross_entropy)
LOSSES.register("dice")(dice_loss)
LOSSES.register("focal")(softmax_focal_loss)
LOSSES.register("lovasz_softmax")(lovasz_softmax)


def _sigmoid_inputs(logits, labels, ignore_index, class_weights, pixel_weights, loss):
  """Float targets and per-element weights of the per-channel sigmoid losses."""
  num_classes = common.num_classes_of(logits, labels, loss)
  valid, safe_labels = common.valid_and_safe(labels, ignore_index)
  weights = valid.astype(jnp.float32)
  pixel_w = common.pixel_weight_map(pixel_weights, labels, loss)
  if pixel_w is not None:
    weights = weights * pixel_w
  weights = jnp.broadcast_to(weights[..., None], logits.shape)
  class_w = common.class_weight_vector(class_weights, num_classes, loss)
  if class_w is not None:
    weights = weights * class_w
  return common.binary_targets(safe_labels, num_classes), weights


@LOSSES.register("binary_cross_entropy")
def _binary_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int,
                          class_weights: Optional[jax.Array] = None,
                          pixel_weights: Optional[jax.Array] = None,
                          pos_weight: Optional[Sequence[float]] = None) -> jax.Array:
  """Per-channel binary cross-entropy with logits, mean over labelled elements."""
  targets, weights = _sigmoid_inputs(logits, labels, ignore_index, class_weights,
                                     pixel_weights, "binary_cross_entropy")
  return binary_cross_entropy_with_logits(logits, targets, weights, pos_weight)


@LOSSES.register("sigmoid_focal")
def _sigmoid_focal(logits: jax.Array, labels: jax.Array, ignore_index: int,
                   class_weights: Optional[jax.Array] = None,
                   pixel_weights: Optional[jax.Array] = None, alpha: Optional[float] = 0.25,
                   gamma: float = 2.0) -> jax.Array:
  """Per-channel sigmoid focal loss, mean over labelled elements."""
  targets, weights = _sigmoid_inputs(logits, labels, ignore_index, class_weights,
                                     pixel_weights, "sigmoid_focal")
  return sigmoid_focal_loss(logits, targets, alpha, gamma, weights)


class _Term(NamedTuple):
  key: str
  fn: Callable
  weight: float
  options: Dict[str, Any]
  takes_pixel_weights: bool


def _options_of(fn: Callable) -> Tuple[str, ...]:
  return tuple(name for name in inspect.signature(fn).parameters if name not in _CALL_ARGUMENTS)


def _takes_pixel_weights(fn: Callable) -> bool:
  return "pixel_weights" in inspect.signature(fn).parameters


def build_loss(spec: Sequence[Mapping[str, Any]]) -> LossFn:
  """A loss function from a list of weighted terms.

  Args:
    spec: e.g. `[{"name": "cross_entropy", "weight": 1.0, "label_smoothing": 0.1},
      {"name": "dice", "weight": 0.5}]`: each entry names a registered loss,
      an optional `weight` (default 1.0) and that loss's options.
  Returns:
    `loss_fn(logits, labels, ignore_index, class_weights=None, pixel_weights=None)
    -> (total, {key: value})`: total = sum of weight * value; the values are the
    unweighted terms, keyed by loss name (`name_2`, `name_3`, ... for repeats).
    `pixel_weights` (shaped like the labels) go to the terms that take them and
    must be None when none does.
  Raises:
    ValueError: for an empty spec, an unknown loss name or option, or a
      non-numeric weight.
  """
  if isinstance(spec, (str, Mapping)) or not isinstance(spec, Sequence) or not spec:
    raise ValueError(f"build_loss expects a non-empty list of loss entries like "
                     f"[{{'name': 'cross_entropy', 'weight': 1.0}}], got {spec!r}.")
  terms, repeats = [], {}
  for entry in spec:
    entry = entry.to_dict() if hasattr(entry, "to_dict") else entry
    if not isinstance(entry, Mapping) or "name" not in entry:
      raise ValueError(f"Each loss entry must be a dict with a 'name'; known losses: "
                       f"{', '.join(LOSSES.names())}. Got {entry!r}.")
    options = dict(entry)
    name = options.pop("name")
    if name not in LOSSES:
      raise ValueError(f"Unknown loss {name!r}; known losses: {', '.join(LOSSES.names())}.")
    weight = options.pop("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
      raise ValueError(f"Loss {name!r}: weight must be a number, got {weight!r}.")
    fn = LOSSES.get(name)
    known = _options_of(fn)
    unknown = sorted(set(options) - set(known))
    if unknown:
      raise ValueError(f"Loss {name!r} has no option(s) {unknown}; its options are "
                       f"{sorted(known)}.")
    repeats[name] = repeats.get(name, 0) + 1
    key = name if repeats[name] == 1 else f"{name}_{repeats[name]}"
    terms.append(_Term(key, fn, float(weight), options, _takes_pixel_weights(fn)))

  def loss_fn(logits: jax.Array, labels: jax.Array, ignore_index: int,
              class_weights: Optional[jax.Array] = None,
              pixel_weights: Optional[jax.Array] = None
              ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    if pixel_weights is not None and not any(term.takes_pixel_weights for term in terms):
      takers = [n for n in LOSSES.names() if _takes_pixel_weights(LOSSES.get(n))]
      raise ValueError(f"pixel_weights were given but none of the losses "
                       f"{[term.key for term in terms]} takes them; add one of {takers}.")
    values = {}
    total = jnp.zeros((), jnp.float32)
    for term in terms:
      extra = {"pixel_weights": pixel_weights} if term.takes_pixel_weights else {}
      values[term.key] = term.fn(logits, labels, ignore_index, class_weights, **extra,
                                 **term.options)
      total = total + term.weight * values[term.key]
    return total, values

  return loss_fn
