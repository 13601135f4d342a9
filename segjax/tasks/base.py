"""What every task provides, and the one evaluator interface.

A task (semantic, instance, panoptic) owns everything that differs between
kinds of segmentation: building its model from the config and the dataset's
classes, its data ops and batch keys, its training objective, its evaluator,
its single-image predictor and what predict.py writes. The trainer, eval.py and
predict.py only talk to this interface, so none of them branches on the task.

The task of a config is its `task` key, or else the `task` attribute of the
model's class ("semantic" when it has none).
"""
import abc
import functools
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segjax.data import device, transforms
from segjax.data.sources import DatasetSpec
from segjax.layers import conv_lowering
from segjax.models import MODELS, build_model
from segjax.registry import Registry

TASKS: Registry = Registry("task")
INFERENCE_MODES = ("batched", "whole", "slide")

Variables = Dict[str, Any]  # {"params": ..., "batch_stats": ...}


class Objective(NamedTuple):
  """A task's training loss, for the generic train step (segjax/training/steps.py).

  `fn(params, batch_stats, micro_batch, rng)` returns (loss, (sums, new_batch_stats)),
  `sums` a dict of additive quantities; micro-batches are weighted by `sums[weight_key]`
  (equal weights when None); `summarize(sums, micro_batches)` turns the sums into the
  step's logged scalars.
  """
  fn: Callable
  weight_key: Optional[str]
  summarize: Callable[[Dict[str, Any], int], Dict[str, Any]]


class Evaluator(abc.ABC):
  """Scores a model on a dataset split, one batch at a time (detectron2's
  DatasetEvaluator, big_vision's evaluators).

  `evaluate(variables)` runs the loop: `reset()`, then for each of `inputs()`
  `update(inputs, predict(variables, to_device(inputs)))`, then `result()`, putting each
  item on the devices (`to_device`) while the one before it runs. `table(result)` is
  what the console shows, `scalars(result)` what TensorBoard logs, `panel()` an
  image of the first batch's predictions (or None).
  """

  table_tag = "metrics"  # TensorBoard's tag of `table`

  def __init__(self, conv_lowering_mode: str = "auto"):
    self.conv_lowering_mode = conv_lowering_mode

  @abc.abstractmethod
  def reset(self) -> None:
    """Forgets everything seen."""

  @abc.abstractmethod
  def inputs(self) -> Iterable[Any]:
    """The split's batches (or images), this process's share."""

  def to_device(self, inputs: Any) -> Any:
    """What `predict` gets for one item of `inputs()`: the item itself by default; batched
    evaluators start its transfer to the devices here, one item ahead of `predict`."""
    return inputs

  @abc.abstractmethod
  def predict(self, variables: Variables, inputs: Any) -> Any:
    """The model's outputs for `to_device(item)` of one item of `inputs()`."""

  @abc.abstractmethod
  def update(self, inputs: Any, outputs: Any) -> None:
    """Adds one batch's predictions."""

  @abc.abstractmethod
  def result(self) -> Dict[str, Any]:
    """The metrics of everything added since `reset()`."""

  @abc.abstractmethod
  def table(self, result: Dict[str, Any]) -> str:
    """The metrics as a console table."""

  @abc.abstractmethod
  def scalars(self, result: Dict[str, Any]) -> Dict[str, float]:
    """The finite scalar metrics, for TensorBoard and metrics.jsonl."""

  def panel(self) -> Optional[np.ndarray]:
    """An RGB image of the first batch's predictions, or None."""
    return None

  def evaluate(self, variables: Variables) -> Dict[str, Any]:
    """Runs the whole split through the model and returns `result()`."""
    self.reset()
    with conv_lowering.lowering(self.conv_lowering_mode):  # read when the steps trace
      items = device.prefetch_to_device(self.inputs(), 2, lambda x: (x, self.to_device(x)))
      for inputs, on_device in items:
        self.update(inputs, self.predict(variables, on_device))
    return self.result()


class PredictionWriter(abc.ABC):
  """Writes predict.py's files: `write` per image, `close` for files about them all."""

  def __init__(self, output_dir: str, dataset: DatasetSpec):
    self.output_dir, self.dataset = output_dir, dataset

  @abc.abstractmethod
  def write(self, prediction: Any, image: np.ndarray, stem: str) -> List[str]:
    """Writes one image's files; returns their paths."""

  def close(self) -> List[str]:
    """Writes the files that cover every image written (none by default); returns them."""
    return []


class Task(abc.ABC):
  """One kind of segmentation; subclasses register themselves in `TASKS`."""
  name: str = ""
  # Batch keys the train step needs, and those it uses when the data has them.
  train_keys: Tuple[str, ...] = ()
  optional_train_keys: Tuple[str, ...] = ()

  def num_classes(self, dataset: DatasetSpec) -> int:
    """The model's number of output classes for `dataset`."""
    return dataset.num_classes

  def model_options(self, config: ml_collections.ConfigDict,
                    dataset: DatasetSpec) -> Dict[str, Any]:
    """Constructor arguments of the model beyond config.model.options."""
    del config, dataset
    return {}

  def build_model(self, config: ml_collections.ConfigDict, dataset: DatasetSpec):
    """The config's model for `dataset`'s classes."""
    options = {**dict(config.model.options), **self.model_options(config, dataset)}
    return build_model(config.model.name, self.num_classes(dataset), options,
                       config.model.dtype, config.model.param_dtype)

  def extra_ops(self, config: ml_collections.ConfigDict, dataset: DatasetSpec) -> Tuple[
      List[Any], List[Any]]:
    """(ops before the configured ones, ops after them) that this task adds, as
    op objects (`transforms.resize(...)`)."""
    del config, dataset
    return [], []

  def data_ops(self, config: ml_collections.ConfigDict, ops: str,
               dataset: DatasetSpec) -> transforms.Pipeline:
    """The pipeline of a split: input checks, the task's own ops, the configured `ops`.

    Images stay uint8 (labels keep the dtype they are stored in, uint8 for every
    builder here; a label map of more than 256 ids must be stored wider, and stays so):
    the jitted steps normalize them on the device with config.data.mean / std
    (`segjax.data.device.normalize`), bit for bit as the `normalize` op did on the host.
    """
    before, after = self.extra_ops(config, dataset)
    return transforms.compose(
        transforms.squeeze_labels(), transforms.check_image(), *before, ops, *after)

  def validate(self, config: ml_collections.ConfigDict) -> None:
    """Raises ValueError (one sentence) for settings this task cannot honour."""
    if config.inference.mode not in INFERENCE_MODES:
      raise ValueError(f"Unknown inference.mode {config.inference.mode!r}; use one of "
                       f"{', '.join(INFERENCE_MODES)}.")
    ignored = self.ignored_settings(config)
    if ignored:
      raise ValueError(f"{self.name} model {config.model.name!r} does not use "
                       f"{', '.join(ignored)}; remove the setting(s), which would be ignored.")

  def init_from_arch(self, config: ml_collections.ConfigDict) -> Optional[str]:
    """The converter of a `model.init_from` PyTorch file whose name does not say: the
    model's backbone (ImageNet encoder weights), if it has one."""
    return config.model.options.get("backbone")

  def prediction_config(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config predict.py labels single images with (this one, by default)."""
    return config

  def ignored_settings(self, config: ml_collections.ConfigDict) -> List[str]:
    """Settings (dotted keys with their values) the config makes that this task ignores."""
    del config
    return []

  @abc.abstractmethod
  def objective(self, config: ml_collections.ConfigDict, model,
                dataset: DatasetSpec) -> Objective:
    """The training loss of `model`."""

  @abc.abstractmethod
  def evaluator(self, config: ml_collections.ConfigDict, dataset: DatasetSpec, model, *,
                variable_shardings=None, batch_sharding=None) -> Evaluator:
    """Scores the model on config.data.eval_split (jitted over the given shardings)."""

  @abc.abstractmethod
  def predictor(self, config: ml_collections.ConfigDict, dataset: DatasetSpec, model,
                variables: Variables) -> Callable[[np.ndarray], Any]:
    """image (RGB uint8, any size) -> this task's prediction at that size."""

  @abc.abstractmethod
  def writer(self, output_dir: str, dataset: DatasetSpec, model) -> PredictionWriter:
    """What predict.py writes for each image into `output_dir`."""


def task_name(config: ml_collections.ConfigDict) -> str:
  """The config's `task`, or else its model's ("semantic" for models that don't say)."""
  name = config.get("task", "")
  return name or getattr(MODELS.get(config.model.name), "task", "semantic")


def get_task(config: ml_collections.ConfigDict) -> Task:
  """The registered task of `config`, checked against its model."""
  name = task_name(config)
  task = TASKS.get(name)()
  native = getattr(MODELS.get(config.model.name), "task", "semantic")
  if native != name:
    raise ValueError(f"task {name!r} cannot train model {config.model.name!r}, which is a "
                     f"{native} model; set task to {native!r} or pick a {name} model.")
  return task


def with_lowering(fn: Callable, mode: str) -> Callable:
  """`fn` whose traces see convolution lowering `mode`."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with conv_lowering.lowering(mode):
      return fn(*args, **kwargs)
  return wrapped


def variables_of(state) -> Variables:
  """The inference variables of a train state (or of a restored {"params", ...} dict)."""
  if isinstance(state, dict):
    return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
  return {"params": state.params, "batch_stats": state.batch_stats}


def float32_tree(tree):
  """Floating-point leaves as float32 (a bf16 model's outputs before the loss)."""
  return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating)
                      else x, tree)


def finite_scalars(metrics: Dict[str, Any]) -> Dict[str, float]:
  """The finite float entries of a metrics dict."""
  return {k: float(v) for k, v in metrics.items()
          if isinstance(v, (float, int, np.floating, np.integer)) and not isinstance(v, bool)
          and np.isfinite(v)}
