"""Rematerialization of backbone blocks, with a jax checkpoint policy chosen by name.

Inside `rematerialization("nothing_saveable")` (the train step enters it with
`config.model.remat`), backbones wrap each block in `nn.remat`: its activations
are recomputed in the backward pass instead of stored, trading compute for
memory. The policy says what may still be saved (e.g. "dots_saveable" keeps
matmul/conv outputs). Parameter names do not change, so checkpoints are shared
with and without remat.
"""
from typing import ContextManager, Type

import flax.linen as nn
import jax

from segjax.layers.trace_settings import TraceSetting

POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}



def check_policy(name: str) -> None:
  if name and name not in POLICIES:
    raise ValueError(f"Unknown remat policy {name!r} (config.model.remat); use '' (off) or one "
                     f"of {sorted(POLICIES)}.")


_POLICY = TraceSetting("segjax_remat_policy", "", check_policy)


def rematerialization(policy: str) -> ContextManager[None]:
  """Backbone blocks traced inside are rematerialized with `policy` ('' = off)."""
  return _POLICY.scope(policy)


def block(cls: Type[nn.Module]) -> Type[nn.Module]:
  """`cls` (a block called as `block(x, train)`), rematerialized under the current
  policy, or unchanged when none is set."""
  policy = _POLICY.get()
  if not policy:
    return cls
  return nn.remat(cls, policy=POLICIES[policy], static_argnums=(2,))
