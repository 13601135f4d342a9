"""A trained model back from its checkpoint: config, task, classes, model and variables.

A segjax checkpoint records what inference needs (task, the run's config, the
dataset's classes, the input shape; segjax/training/checkpointing.py), so no dataset
and no optimizer are needed: only the parameters and BatchNorm statistics are read.
Checkpoints written before that record existed restore through the config's dataset,
as they always did, with a one-line notice. A peer's weights file (.pth, .safetensors,
or a converted .npz) loads into the config's architecture.
"""
import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from segjax import paths
from segjax.data import pipeline
from segjax.data.sources import DatasetSpec, dataset_classes, get_dataset
from segjax.tasks import Task, get_task
from segjax.training import checkpointing, sharding

WEIGHT_FILE_EXTENSIONS = (".pth", ".pt", ".safetensors", ".npz")
# The input a peer weights file's model is traced with (its parameter shapes only).
_PEER_INPUT_SHAPE = (1, 512, 512, 3)


@dataclasses.dataclass
class Restored:
  config: ml_collections.ConfigDict
  task: Task
  dataset: DatasetSpec  # with splits only when the dataset was opened
  model: Any
  variables: Any  # {"params", "batch_stats"}
  step: int
  mesh: Any
  variable_shardings: Any


def _tuples(value):
  """JSON lists back to the tuples configs use."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def saved_config(record) -> ml_collections.ConfigDict:
  """The training run's config kept in a checkpoint's record."""
  return ml_collections.ConfigDict(_tuples(record["config"]))


def _edited(config, edit):
  config = config.copy_and_resolve_references()
  with config.unlocked():
    edit(config)
  return config


def _abstract_variables(model, input_shape, mesh, config):
  shapes = jax.eval_shape(
      lambda rng: model.init({"params": rng, "dropout": rng}, jnp.zeros(input_shape),
                             train=True), jax.random.key(0))
  abstract = {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}
  shardings = sharding.tree_shardings(abstract, mesh, sharding.param_rules(config.mesh))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings), shardings


def _model(config, dataset, for_prediction: bool):
  """(config, task, mesh, model): the config checked by its task (with the task's
  single-image settings `for_prediction`) and its model for the dataset's classes."""
  task = get_task(config)
  if for_prediction:
    config = task.prediction_config(config)
  task.validate(config)
  return config, task, sharding.create_mesh(config.mesh.axes), task.build_model(config, dataset)


def restore(checkpoint: str, config: Optional[ml_collections.ConfigDict] = None, *,
            open_dataset: bool = False,
            edit: Optional[Callable[[ml_collections.ConfigDict], None]] = None,
            for_prediction: bool = False) -> Restored:
  """The model of `checkpoint` (a segjax workdir, checkpoints folder, step folder, or a
  peer weights file for `config`'s architecture).

  `config` overrides the checkpoint's own (e.g. other inference settings; its model must
  be the checkpoint's); `edit(config)` changes a copy of the config used before it is
  checked; `open_dataset` opens the config's dataset (to read a split);
  `for_prediction` takes the task's settings for labelling single images.
  """
  if config is not None and edit is not None:
    config = _edited(config, edit)
  if checkpoint.endswith(WEIGHT_FILE_EXTENSIONS) and paths.path(checkpoint).is_file():
    return _restore_weights_file(checkpoint, config, open_dataset, for_prediction)
  record, step = checkpointing.read_record(checkpoint)
  if "config" in record and "dataset" in record:
    config = config or (_edited(saved_config(record), edit) if edit else saved_config(record))
    dataset = (get_dataset(config.data.name, config.data.data_dir, config.data.manual_dir)
               if open_dataset else DatasetSpec.from_record(record["dataset"]))
    input_shape = tuple(record["input_shape"])
  else:
    if config is None:
      raise ValueError(f"The checkpoint {checkpoint} predates checkpoints that record their "
                       "model; pass the --config it was trained with.")
    logging.warning("%s predates checkpoints that record their model: its classes and "
                    "input shape come from dataset %r.", checkpoint, config.data.name)
    dataset = get_dataset(config.data.name, config.data.data_dir, config.data.manual_dir)
    task = get_task(config)
    example = pipeline.example_shapes(
        dataset.source(config.data.train_split),
        task.data_ops(config, config.data.train_ops, dataset), ("image",))
    input_shape = (1,) + example["image"]
  config, task, mesh, model = _model(config, dataset, for_prediction)
  abstract, shardings = _abstract_variables(model, input_shape, mesh, config)
  expected = checkpointing.model_record(config.model.name, model.num_classes,
                                        abstract["params"])
  checkpointing.check_record(
      record, expected, checkpoint, subject=f"The checkpoints at {checkpoint}",
      fix="pass the --config it was trained with (predict.py: or no --config, to use the "
          "checkpoint's own)")
  variables = checkpointing.restore_variables(checkpoint, step, abstract)
  return Restored(config, task, dataset, model, variables, step, mesh, shardings)


def _restore_weights_file(path: str, config, open_dataset: bool,
                          for_prediction: bool) -> Restored:
  """A peer's (or a converted) weights file, loaded into the config's model."""
  from segjax.convert import load_peer_checkpoint
  if config is None:
    raise ValueError(f"{path} is a weights file, not a segjax checkpoint; pass the --config "
                     "of its architecture (e.g. configs/pspnet_ade20k.py).")
  dataset = (get_dataset(config.data.name, config.data.data_dir, config.data.manual_dir)
             if open_dataset else dataset_classes(config.data.name))
  config, task, mesh, model = _model(config, dataset, for_prediction)
  input_shape = getattr(model, "input_shape", _PEER_INPUT_SHAPE)  # SAM's is fixed
  _, shardings = _abstract_variables(model, input_shape, mesh, config)
  with paths.local_copy(path) as local:  # a gs:// file is read from a temporary copy
    variables = jax.device_put(load_peer_checkpoint(local, model), shardings)
  return Restored(config, task, dataset, model, variables, 0, mesh, shardings)
