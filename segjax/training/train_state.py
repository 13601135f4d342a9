"""The training state: a pytree of arrays, nothing else, so it can be sharded,
donated to the step and checkpointed; and its initialisation into its shardings."""
from typing import Any, Tuple

import flax.struct
import jax
import jax.numpy as jnp

from segjax.training import pretrained, sharding


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @classmethod
  def create(cls, params, batch_stats, tx) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
               opt_state=tx.init(params))


def _initializer(model, tx, input_shape: Tuple[int, ...]):
  def init(rng):
    variables = model.init({"params": rng, "dropout": rng}, jnp.zeros(input_shape, jnp.float32),
                           train=True)
    return TrainState.create(variables["params"], variables.get("batch_stats", {}), tx)
  return init


def create_train_state(model, tx, rng: jax.Array, input_shape: Tuple[int, ...], mesh,
                       param_rules, init_from: str = "") -> Tuple[TrainState, Any]:
  """Initialises the state directly into its shardings; returns (state, shardings).

  Initialised in training mode so that train-only parts (auxiliary heads) get their
  parameters too; `init_from` loads converted weights (`pretrained.load_pretrained`).
  """
  init = _initializer(model, tx, input_shape)
  state_shardings = sharding.tree_shardings(jax.eval_shape(init, rng), mesh, param_rules)
  state = jax.jit(init, out_shardings=state_shardings)(rng)
  if init_from:
    state = pretrained.load_pretrained(state, tx, init_from, state_shardings,
                                       getattr(model, "pretrained_path", ("backbone",)),
                                       arch=getattr(model, "backbone", None))
  return state, state_shardings


def abstract_train_state(model, tx, input_shape: Tuple[int, ...], mesh,
                         param_rules) -> Tuple[Any, Any]:
  """Shapes, dtypes and shardings of the train state, without computing it (to
  restore a checkpoint into); returns (abstract state, shardings)."""
  abstract = jax.eval_shape(_initializer(model, tx, input_shape), jax.random.key(0))
  shardings = sharding.tree_shardings(abstract, mesh, param_rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings), shardings
