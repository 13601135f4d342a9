"""The training loop: config in, trained and evaluated checkpoints out.

`train_and_evaluate(config, workdir)` builds the mesh, data, model and
optimizer from the config, restores the latest checkpoint in `workdir` if one
exists (the data position follows from its step), runs the jitted, sharded,
donated `train_step`, evaluates every `eval_every` steps and at the end, and
writes checkpoints, TensorBoard scalars, `metrics.jsonl` and prediction panels.
With several processes (segjax/training/distributed.py) every process runs
this same function on its share of the data; process 0 alone writes logs.
"""
import functools
import os
import time
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from segjax import visualization
from segjax.data import pipeline
from segjax.data.sources import DatasetSpec, get_dataset
from segjax.inference import instances, panoptic_eval, per_image
from segjax.layers import conv_lowering, remat
from segjax.losses import build_loss
from segjax.metrics import format_iou_table, segmentation_metrics
from segjax.metrics.coco import format_coco_table
from segjax.metrics.panoptic import format_pq_table
from segjax.models import MODELS, build_model
from segjax.training import checkpointing, optimizers, sharding, steps
from segjax.training.run_logging import MetricWriter
from segjax.training.train_state import TrainState


def create_train_state(model, tx, rng: jax.Array, input_shape: Tuple[int, ...], mesh,
                       param_rules, init_from: str = "") -> Tuple[TrainState, Any]:
  """Initialises the state directly into its shardings; returns (state, shardings).

  Initialised in training mode so that train-only parts (auxiliary heads) get
  their parameters too.
  """
  init = _state_initializer(model, tx, input_shape)
  state_shardings = sharding.tree_shardings(jax.eval_shape(init, rng), mesh, param_rules)
  state = jax.jit(init, out_shardings=state_shardings)(rng)
  if init_from:
    state = load_pretrained(state, tx, init_from, state_shardings,
                            getattr(model, "pretrained_path", ("backbone",)))
  return state, state_shardings


def _state_initializer(model, tx, input_shape: Tuple[int, ...]):
  def init(rng):
    variables = model.init({"params": rng, "dropout": rng}, jnp.zeros(input_shape, jnp.float32),
                           train=True)
    return TrainState.create(variables["params"], variables.get("batch_stats", {}), tx)
  return init


def abstract_train_state(model, tx, input_shape: Tuple[int, ...], mesh,
                         param_rules) -> Tuple[Any, Any]:
  """Shapes, dtypes and shardings of the train state, without computing it (to
  restore a checkpoint into); returns (abstract state, shardings)."""
  abstract = jax.eval_shape(_state_initializer(model, tx, input_shape), jax.random.key(0))
  shardings = sharding.tree_shardings(abstract, mesh, param_rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings), shardings


def make_eval_fn(model, dataset: DatasetSpec, state_shardings, batch_sharding, replicated):
  """The jitted `eval_step`: (state, batch, confusion) -> (confusion, predictions)."""
  return jax.jit(
      functools.partial(steps.eval_step, model=model, num_classes=dataset.num_classes,
                        ignore_index=dataset.ignore_index),
      in_shardings=(state_shardings, batch_sharding, replicated),
      out_shardings=(replicated, batch_sharding), donate_argnums=(2,))


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


def load_pretrained(state: TrainState, tx, path: str, state_shardings,
                    encoder_path: Tuple[str, ...] = ("backbone",)) -> TrainState:
  """Loads a converted checkpoint (`python -m segjax.convert`) into the state.

  A file whose top-level modules are all modules of this model (a whole converted
  detector, e.g. torchvision's maskrcnn_resnet50_fpn) replaces those modules; any
  other file is encoder weights (e.g. ImageNet ResNet-50) for the subtree at
  `encoder_path` (the model's `pretrained_path`).
  """
  from segjax.convert import load_variables
  if not os.path.exists(path):
    raise ValueError(f"model.init_from file {path} does not exist; convert PyTorch weights "
                     "with `python -m segjax.convert`.")
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
  fresh = TrainState.create(ours["params"], ours["batch_stats"], tx)
  return jax.device_put(jax.tree.map(jnp.asarray, fresh), state_shardings)


def model_task(config: ml_collections.ConfigDict) -> str:
  """"semantic" (per-pixel logits), "instance" (a detector such as Mask R-CNN) or
  "panoptic" (Panoptic FPN)."""
  return getattr(MODELS.get(config.model.name), "task", "semantic")


def build(config: ml_collections.ConfigDict, dataset: DatasetSpec):
  """The config's model for `dataset`: semantic models predict every class, instance
  models the dataset's thing classes."""
  num_classes, options = dataset.num_classes, dict(config.model.options)
  task = model_task(config)
  if task in ("instance", "panoptic"):
    if not dataset.thing_classes:
      raise ValueError(f"Model {config.model.name!r} detects instances, but dataset "
                       f"{dataset.name!r} has no instance annotations; use a dataset with "
                       "objects (segjax_shapes, coco_instances, coco_panoptic, cityscapes).")
    num_classes = len(dataset.thing_classes)
  if task == "panoptic":
    options.update(thing_classes=tuple(dataset.thing_classes),
                   stuff_classes=panoptic_eval.stuff_classes(dataset),
                   ignore_index=dataset.ignore_index)
  return build_model(config.model.name, num_classes, options, config.model.dtype,
                     config.model.param_dtype)


def data_ops(config: ml_collections.ConfigDict, ops: str, dataset: DatasetSpec) -> str:
  """The configured ops between the input checks and normalization every pipeline runs;
  for instance models, class ids become thing indices unless they already are."""
  mean, std = tuple(config.data.mean), tuple(config.data.std)
  parts = ["squeeze_labels", "check_image", ops, f"normalize(mean={mean}, std={std})"]
  task = model_task(config)
  if task in ("instance", "panoptic"):
    things = tuple(dataset.thing_classes)
    if things != tuple(range(len(things))):
      parts.insert(2, f"thing_classes(ids={things})")
  if task == "panoptic" and config.model.options.get("fusion", "heuristic") == "heuristic":
    parts.insert(-1, f"panoptic_semantic(stuff_classes={panoptic_eval.stuff_classes(dataset)}, "
                     f"ignore_index={dataset.ignore_index})")
  if task == "semantic":
    parts.append(f"check_labels(num_classes={dataset.num_classes}, "
                 f"ignore_index={dataset.ignore_index})")
  return "|".join(p for p in parts if p)


def evaluate(state, eval_fn, dataset: DatasetSpec, config, batch_sharding, replicated,
             workdir: Optional[str], step: int) -> Dict[str, Any]:
  """Runs a full pass over the eval split; returns metrics and, with a
  `workdir`, writes a panel PNG to its predictions/ folder."""
  source = dataset.source(config.data.eval_split)
  confusion = jax.device_put(jnp.zeros((dataset.num_classes,) * 2, jnp.int32), replicated)
  first = None
  for local in pipeline.eval_batches(source, data_ops(config, config.data.eval_ops, dataset),
                                     config.data.eval_batch_size, dataset.ignore_index):
    confusion, predictions = eval_fn(state, pipeline.to_global(local, batch_sharding),
                                     confusion)
    if first is None:
      first = (local, multihost_utils.process_allgather(predictions, tiled=True))
  metrics = segmentation_metrics(np.asarray(jax.device_get(confusion)))
  if workdir and jax.process_index() == 0 and first is not None:
    images, labels, predictions = first[0]["image"], first[0]["label"], first[1]
    if "original_size" in first[0]:  # show only each example's valid region
      rows = [(x[:r[0], :r[1]], y[:o[0], :o[1]], p[:o[0], :o[1]]) for x, y, p, r, o in zip(
          images, labels, predictions, first[0]["resized_size"], first[0]["original_size"])
              if o.min() > 0]  # blank padding examples have size 0
      images, labels, predictions = zip(*rows)
    image = visualization.panel(images, labels, predictions, dataset.palette,
                                dataset.ignore_index, config.data.mean, config.data.std)
    os.makedirs(os.path.join(workdir, "predictions"), exist_ok=True)
    visualization.save_png(os.path.join(workdir, "predictions", f"step_{step:07d}.png"), image)
  return metrics


def step_options(config: ml_collections.ConfigDict, mesh) -> Dict[str, Any]:
  """The train step's keyword arguments for accumulation, BatchNorm, remat and the
  convolutions' lowering."""
  if config.model.batch_norm not in ("sync", "per_device"):
    raise ValueError(f"Unknown model.batch_norm {config.model.batch_norm!r}; use sync or "
                     "per_device.")
  remat.check_policy(config.model.remat)
  conv_lowering.check_mode(config.model.conv_lowering)
  micro = config.optimizer.accumulation_steps
  devices = int(np.prod([mesh.shape[a] for a in config.mesh.batch_axes]))
  if micro < 1 or config.data.batch_size % (micro * devices):
    raise ValueError(f"data.batch_size {config.data.batch_size} must be a multiple of "
                     f"optimizer.accumulation_steps ({micro}) x the {devices} devices of the "
                     "batch axes, so every micro-batch spreads evenly over the devices.")
  return {"accumulation_steps": micro, "remat_policy": config.model.remat,
          "bn_groups": devices if config.model.batch_norm == "per_device" else 1,
          "conv_lowering_mode": config.model.conv_lowering}


class Profiler:
  """Traces train steps [first, first + count) to <workdir>/profile (process 0)."""

  def __init__(self, workdir: str, first: int, count: int):
    self.directory = os.path.join(workdir, "profile")
    self.first, self.last = first, first + count - 1
    self.active = count > 0 and jax.process_index() == 0

  def before(self, step: int) -> None:
    if self.active and step == self.first:
      jax.profiler.start_trace(self.directory)

  def after(self, step: int, state) -> None:
    if self.active and step == self.last:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      tqdm.write(f"Profiler trace of steps {self.first}-{self.last} written to "
                 f"{self.directory}.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns eval metrics."""
  dataset = get_dataset(config.data.name, config.data.data_dir, config.data.manual_dir)
  mesh = sharding.create_mesh(config.mesh.axes)
  options = step_options(config, mesh)
  param_rules = sharding.param_rules(config.mesh)
  batch_sharding = sharding.batch_sharding(mesh, config.mesh.batch_axes)
  replicated = NamedSharding(mesh, P())
  model = build(config, dataset)
  task = model_task(config)
  instance = task in ("instance", "panoptic")
  tx, schedule = optimizers.create_optimizer(config.optimizer, config.total_steps,
                                             getattr(model, "frozen_params_mask", None),
                                             config.data.batch_size)
  class_weights = tuple(config.loss.class_weights) or None
  loss_fn = build_loss(config.loss.terms)
  if class_weights and len(class_weights) != dataset.num_classes:
    raise ValueError(f"loss.class_weights has {len(class_weights)} entries but dataset "
                     f"{dataset.name!r} has {dataset.num_classes} classes.")

  train_source = dataset.source(config.data.train_split)
  train_ops = data_ops(config, config.data.train_ops, dataset)
  keys = pipeline.INSTANCE_KEYS if instance else pipeline.MODEL_KEYS
  if task == "panoptic":
    keys += ("label",)
  optional_keys = pipeline.OPTIONAL_INSTANCE_KEYS if instance else pipeline.OPTIONAL_TRAIN_KEYS
  example = pipeline.example_shapes(train_source, train_ops, keys)
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  state, state_shardings = create_train_state(
      model, tx, init_rng, (1,) + example["image"], mesh, param_rules, config.model.init_from)

  manager = checkpointing.create_manager(workdir, config.keep_checkpoints)
  record = checkpointing.model_record(config.model.name, model.num_classes, state.params)
  restored = checkpointing.restore_latest(manager, state, record)
  if restored is not None:
    state = restored
    if jax.process_index() == 0:
      tqdm.write(f"Resuming from the checkpoint of step {int(state.step)} in {manager.directory}.")
  start_step = int(state.step)
  train_iter = pipeline.train_iterator(train_source, train_ops, config.data.batch_size,
                                       config.seed, config.data.num_threads,
                                       config.data.num_workers, keys, optional_keys,
                                       start_step=start_step)

  if instance:
    step_fn = functools.partial(steps.detection_train_step, model=model, tx=tx,
                                schedule=schedule, loss_weights=dict(config.loss.detection),
                                **options)
    eval_fn = (instances.make_detect_fn(model, state_shardings, batch_sharding)
               if task == "instance" else
               panoptic_eval.make_segment_fn(model, config, state_shardings, batch_sharding))
  else:
    step_fn = functools.partial(steps.train_step, model=model, tx=tx, schedule=schedule,
                                ignore_index=dataset.ignore_index, loss_fn=loss_fn,
                                class_weights=class_weights, aux_weight=config.loss.aux_weight,
                                **options)
    eval_fn = make_eval_fn(model, dataset, state_shardings, batch_sharding, replicated)
  train_fn = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding, replicated),
                     out_shardings=(state_shardings, replicated), donate_argnums=(0,))

  writer = MetricWriter(workdir)
  profiler = Profiler(workdir, start_step + 3, config.profile_steps)
  progress = tqdm(total=config.total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                  disable=jax.process_index() != 0, desc=config.model.name)
  def report(text: str) -> None:  # process 0 speaks for the run
    if jax.process_index() == 0:
      progress.write(text)

  def run_eval(step: int) -> Dict[str, Any]:
    if task == "panoptic":
      metrics = panoptic_eval.evaluate(state, eval_fn, dataset, config, model, batch_sharding)
      writer.scalars(step, {f"eval/{k}": v for k, v in metrics.items()
                            if isinstance(v, float) and np.isfinite(v)})
      table = format_pq_table(metrics["pq"], metrics["categories"])
      writer.text(step, "eval/pq", table)
      report(f"step {step} eval on {config.data.eval_split}:\n{table}")
      return metrics
    if instance:
      metrics = instances.evaluate(state, eval_fn, dataset, config, batch_sharding, workdir,
                                   step)
      writer.scalars(step, {f"eval/{k}": v for k, v in metrics.items()  # nan: no such gt
                            if not isinstance(v, dict) and np.isfinite(v)})
      table = format_coco_table({k: v for k, v in metrics.items() if isinstance(v, dict)})
      writer.text(step, "eval/coco", table)
      report(f"step {step} eval on {config.data.eval_split}:\n{table}")
      return metrics
    if config.inference.mode == "batched":
      metrics = evaluate(state, eval_fn, dataset, config, batch_sharding, replicated, workdir,
                         step)
    else:  # one image at a time (e.g. overlap-tile for unet_valid); no panel
      metrics = per_image.evaluate(config, dataset, model, state, progress=False)
    writer.scalars(step, {f"eval/{k}": metrics[k] for k in ("mIoU", "aAcc", "mAcc")})
    table = format_iou_table(metrics, dataset.class_names)
    writer.text(step, "eval/per_class", table)
    report(f"step {step} eval on {config.data.eval_split}:\n{table}")
    return metrics

  eval_metrics: Dict[str, Any] = {}
  try:
    if start_step >= config.total_steps:
      logging.warning("The workdir is already trained to step %d; evaluating it.", start_step)
      eval_metrics = run_eval(start_step)
    window_start, window_steps = time.perf_counter(), 0
    for step in range(start_step + 1, config.total_steps + 1):
      batch = pipeline.to_global(next(train_iter), batch_sharding)
      profiler.before(step)
      state, metrics = train_fn(state, batch, dropout_rng)
      profiler.after(step, state)
      window_steps += 1
      progress.update(1)
      if step % config.log_every == 0 or step == config.total_steps:
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - window_start
        metrics["images_per_second"] = window_steps * config.data.batch_size / elapsed
        writer.scalars(step, {f"train/{k}": v for k, v in metrics.items()})
        progress.set_postfix(loss=f"{metrics['loss']:.4f}",
                             lr=f"{metrics['learning_rate']:.2e}",
                             img_s=f"{metrics['images_per_second']:.1f}")
        window_start, window_steps = time.perf_counter(), 0
      if step % config.eval_every == 0 or step == config.total_steps:
        eval_metrics = run_eval(step)
        window_start = time.perf_counter()
      if step % config.checkpoint_every == 0 or step == config.total_steps:
        checkpointing.save(manager, step, state, record)
  finally:
    # Saves are asynchronous: a crash must not lose a checkpoint being written.
    progress.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
    if hasattr(train_iter, "close"):  # stops grain worker processes
      train_iter.close()
  return {"state": state, **eval_metrics}
