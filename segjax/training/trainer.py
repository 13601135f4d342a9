"""The training loop: config in, trained and evaluated checkpoints out.

`train_and_evaluate(config, workdir)` checks the whole config, builds the mesh,
data, model and optimizer, restores the latest checkpoint in `workdir` if one
exists (the data position follows from its step), runs the jitted, sharded,
donated train step, evaluates every `eval_every` steps and at the end, and
writes checkpoints, TensorBoard scalars, `metrics.jsonl` and prediction panels.
Everything that differs between semantic, instance and panoptic models comes
from the config's task (segjax/tasks). With several processes
(segjax/training/distributed.py) every process runs this same function on its
share of the data; process 0 alone writes logs.

Nothing is lost and nothing silently wrong: on SIGTERM (pre-emption) or Ctrl-C the run
finishes its step, saves a checkpoint, says where and returns (segjax/training/interrupts.py);
a damaged latest checkpoint is passed over for the one before it (checkpointing.py); a
non-finite loss or gradient norm stops the run before anything of it is saved
(`optimizer.nonfinite="skip"` skips such steps instead).
"""
import functools
import itertools
import json
import os
import time
from typing import Any, Dict

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from segjax import paths
from segjax.convert import resolve_init_from
from segjax.data import device, pipeline
from segjax.data.sources import get_dataset
from segjax.tasks import get_task, variables_of
from segjax.training import checkpointing, interrupts, optimizers, sharding, steps
from segjax.training.compile_count import CompileCounter
from segjax.training.run_logging import MetricWriter, Profiler
from segjax.training.train_state import create_train_state


class NonFiniteError(ValueError):
  """A train step gave a non-finite loss or gradient norm (optimizer.nonfinite=stop)."""


def check_writable(workdir: str) -> None:
  """Stops at start-up, with one sentence, when `workdir` cannot be created or written
  (rather than after the set-up, at the first checkpoint or log)."""
  folder = paths.path(workdir)  # local or gs://; another URL scheme is refused here
  probe = folder / f".segjax_write_test_{os.getpid()}"
  try:
    folder.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except paths.storage_errors() as e:
    raise ValueError(f"The workdir {workdir} is not writable ({getattr(e, 'strerror', '') or e}); "
                     "give a --workdir you can write to.") from e


def inference_record(config: ml_collections.ConfigDict, task, dataset, input_shape):
  """The checkpoint record entries that rebuild the model without the dataset or an
  optimizer (segjax/apps/restore.py)."""
  return {"task": task.name, "config": json.loads(config.to_json_best_effort()),
          "dataset": dataset.to_record(), "input_shape": list(input_shape)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns eval metrics.
  Logs at the end how many XLA programs the run compiled, by function (a step compiled
  more than once is a recompilation)."""
  with CompileCounter() as compiles:
    try:
      return _train_and_evaluate(config, workdir)
    finally:
      logging.info("%s.", compiles.summary())


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  check_writable(workdir)
  task = get_task(config)
  task.validate(config)
  mesh = sharding.create_mesh(config.mesh.axes)
  options = steps.step_options(config, mesh)
  # Pretrained weights first: a failed download stops the run before any data is prepared.
  init_from = config.model.init_from and resolve_init_from(
      config.model.init_from, task.init_from_arch(config))
  dataset = get_dataset(config.data.name, config.data.data_dir, config.data.manual_dir)
  param_rules = sharding.param_rules(config.mesh)
  batch_sharding = sharding.batch_sharding(mesh, config.mesh.batch_axes)
  model = task.build_model(config, dataset)
  tx, schedule = optimizers.create_optimizer(config.optimizer, config.total_steps,
                                             getattr(model, "frozen_params_mask", None),
                                             config.data.batch_size)
  objective = task.objective(config, model, dataset)

  train_source = dataset.source(config.data.train_split)
  train_ops = task.data_ops(config, config.data.train_ops, dataset)
  example = pipeline.example_shapes(train_source, train_ops, task.train_keys)
  input_shape = (1,) + example["image"]
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  state, state_shardings = create_train_state(model, tx, init_rng, input_shape, mesh,
                                              param_rules, init_from)
  evaluator = task.evaluator(config, dataset, model,
                             variable_shardings=variables_of(state_shardings),
                             batch_sharding=batch_sharding, progress=False)

  manager = checkpointing.create_manager(workdir, config.keep_checkpoints)
  record = checkpointing.model_record(
      config.model.name, model.num_classes, state.params,
      **inference_record(config, task, dataset, input_shape))
  restored = checkpointing.restore_latest(manager, state, record)
  if restored is not None:
    state = restored
    if jax.process_index() == 0:
      tqdm.write(f"Resuming from the checkpoint of step {int(state.step)} in {manager.directory}.")
  start_step = int(state.step)
  train_iter = pipeline.train_iterator(
      train_source, train_ops, config.data.batch_size, config.seed, config.data.num_threads,
      config.data.num_workers, task.train_keys, task.optional_train_keys,
      start_step=start_step)
  # uint8 batches, each put on the devices while the step before it runs.
  batches = device.prefetch_to_device(
      itertools.islice(train_iter, max(config.total_steps - start_step, 0)), 2,
      sharding=batch_sharding)
  train_fn = jax.jit(
      functools.partial(steps.train_step, objective=objective, tx=tx, schedule=schedule,
                        **options),
      in_shardings=(state_shardings, batch_sharding, NamedSharding(mesh, P())),
      out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=(0,))

  writer = MetricWriter(workdir, start_step)
  state_finite = jax.jit(steps.all_finite)
  profiler = Profiler(workdir, start_step + 3, config.profile_steps)
  progress = tqdm(total=config.total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                  disable=jax.process_index() != 0, desc=config.model.name)

  def run_eval(step: int) -> Dict[str, Any]:
    metrics = evaluator.evaluate(variables_of(state))
    writer.scalars(step, {f"eval/{k}": v for k, v in evaluator.scalars(metrics).items()})
    table = evaluator.table(metrics)
    writer.text(step, f"eval/{evaluator.table_tag}", table)
    writer.panel(workdir, step, evaluator.panel())
    if jax.process_index() == 0:  # process 0 speaks for the run
      progress.write(f"step {step} eval on {config.data.eval_split}:\n{table}")
    return metrics

  eval_metrics: Dict[str, Any] = {}
  nonfinite = config.optimizer.nonfinite
  skipped = []

  def finite(step: int, metrics) -> None:
    """Stops the run (or counts a skipped step) when step `step` had a non-finite loss or
    gradient norm; called before that step's state is evaluated or saved."""
    if nonfinite == "skip":  # the step itself kept the state when anything was not finite
      if float(jax.device_get(metrics["skipped"])):
        skipped.append(step)
        logging.warning("Step %d: non-finite loss, gradient norm or update; the update was "
                        "skipped (%d skipped so far).", step, len(skipped))
      return
    loss, grad_norm = (float(x) for x in jax.device_get((metrics["loss"], metrics["grad_norm"])))
    if np.isfinite(loss) and np.isfinite(grad_norm):
      return
    last = manager.latest_step()
    raise NonFiniteError(
        f"Step {step} has a non-finite loss ({loss}) or gradient norm ({grad_norm}); "
        "training stopped without saving it. "
        + (f"The last good checkpoint is step {last} in {manager.directory}. " if last
           else "No checkpoint was saved. ")
        + "Lower optimizer.learning_rate (or set optimizer.grad_clip_norm), or set "
        "optimizer.nonfinite=skip to skip such steps.")

  try:
    if start_step >= config.total_steps:
      logging.warning("The workdir is already trained to step %d; evaluating it.", start_step)
      eval_metrics = run_eval(start_step)
    window_start, window_steps = time.perf_counter(), 0
    pending = None  # (step, metrics) whose finiteness is checked one step late
    with interrupts.StopRequest() as stop:
      for step in range(start_step + 1, config.total_steps + 1):
        batch = next(batches)
        profiler.before(step)
        state, metrics = train_fn(state, batch, dropout_rng)
        profiler.after(step, state)
        if pending is not None:  # the previous step's result, ready by now
          finite(*pending)
        pending = (step, metrics)
        window_steps += 1
        progress.update(1)
        stopping = stop.requested()
        log = step % config.log_every == 0 or step == config.total_steps
        evaluate = step % config.eval_every == 0 or step == config.total_steps
        save = stopping or step % config.checkpoint_every == 0 or step == config.total_steps
        if log or evaluate or save:  # never log, evaluate or save a non-finite state
          finite(*pending)
          pending = None
        if log:
          metrics = jax.device_get(metrics)
          elapsed = time.perf_counter() - window_start
          metrics["images_per_second"] = window_steps * config.data.batch_size / elapsed
          writer.scalars(step, {f"train/{k}": v for k, v in metrics.items()})
          progress.set_postfix(loss=f"{metrics['loss']:.4f}",
                               lr=f"{metrics['learning_rate']:.2e}",
                               img_s=f"{metrics['images_per_second']:.1f}")
          window_start, window_steps = time.perf_counter(), 0
        if evaluate and not stopping:
          eval_metrics = run_eval(step)
          window_start = time.perf_counter()
        if save:
          if not bool(state_finite(state)):  # never save a state that is not finite
            last = manager.latest_step()
            raise NonFiniteError(
                f"The state after step {step} holds non-finite values although its loss is "
                "finite; training stopped without saving it. "
                + (f"The last good checkpoint is step {last} in {manager.directory}. "
                   if last else "No checkpoint was saved. ")
                + "Lower optimizer.learning_rate or optimizer.weight_decay.")
          checkpointing.save(manager, step, state, record)
        if stopping:
          manager.wait_until_finished()
          if jax.process_index() == 0:
            progress.write(
                f"Stopped by {stop.signal_name} after step {step}: checkpoint saved in "
                f"{os.path.join(str(manager.directory), str(step))}; run the same command "
                "to resume.")
          break
  finally:
    # Saves are asynchronous: a crash must not lose a checkpoint being written.
    progress.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
    if hasattr(train_iter, "close"):  # stops grain worker processes
      train_iter.close()
  return {"state": state, **eval_metrics}
