"""orbax checkpoints of the train state and a model record.

A checkpoint holds two items: `state` (the sharded TrainState) and `meta`, the
model record: model name, number of classes and parameter shapes, and what
inference needs to rebuild the model from the checkpoint alone (task, the run's
config with its model options, test-time ops and input normalization, the
dataset's class names, palette, ignore index and thing classes, the input shape).
Every process takes part in saving and restoring (each writes and reads the shards
it holds, process 0 the metadata), so the workdir must be one filesystem all
processes see (a shared disk or a bucket). A checkpoint restores into any number
of processes and devices and any sharding strategy: the restore reshards to the
shardings asked for. The data position needs no item of its own: the input
pipeline resumes from the restored step. On restart the latest checkpoint in the
workdir is restored; one written by a different model is refused with a sentence
saying so instead of failing deep inside the restore. Evaluation and prediction
restore only the parameters and BatchNorm statistics (`restore_variables`).
"""
import logging
import time
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from segjax import paths
from segjax.training.sharding import path_name


class CheckpointMismatchError(ValueError):
  """The workdir holds a checkpoint of a different model."""


def model_record(model_name: str, num_classes: int, params, **inference) -> Dict[str, Any]:
  """What identifies the model (name, classes, parameter shapes), plus the JSON-able
  `inference` entries (task, config, dataset, input_shape) that rebuild it."""
  shapes = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"model": model_name, "num_classes": num_classes,
          "param_shapes": {path_name(p): list(x.shape) for p, x in shapes}, **inference}


def create_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """Keeps the `keep` latest checkpoints; the trainer decides when to save."""
  # Orbax writes each step into a temporary folder renamed on completion, so a step cut
  # off mid-write is never listed; leftovers of such writes are removed at start-up.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         cleanup_tmp_directories=True)
  return _manager(paths.absolute(workdir) / "checkpoints", options)


def _manager(directory, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      directory, options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state, record) -> None:
  """Saves asynchronously; every process must call it."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(record)), force=True)


def check_record(found: Dict[str, Any], expected: Dict[str, Any], directory: str,
                 fix: str = "use a new --workdir", subject: str = "") -> None:
  """Refuses a checkpoint of another model: `subject` (default: the workdir's checkpoints
  at `directory`) and `fix` (what the user should do) make the sentence."""
  subject = subject or f"The workdir's checkpoints at {directory}"
  if found["model"] != expected["model"] or found["num_classes"] != expected["num_classes"]:
    raise CheckpointMismatchError(
        f"{subject} are of model {found['model']!r} with {found['num_classes']} classes, but "
        f"the config asks for {expected['model']!r} with {expected['num_classes']} classes; "
        f"{fix}.")
  if found["param_shapes"] != expected["param_shapes"]:
    diff = sorted(k for k in set(found["param_shapes"]) | set(expected["param_shapes"])
                  if found["param_shapes"].get(k) != expected["param_shapes"].get(k))
    raise CheckpointMismatchError(
        f"{subject} hold model {found['model']!r} with other parameter shapes than the "
        f"config builds (first difference: {diff[0]}); the model options changed, so "
        f"{fix}.")


class DamagedCheckpointError(ValueError):
  """No checkpoint in the workdir can be restored."""


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"


def restore_latest(manager: ocp.CheckpointManager, abstract_state, record) -> Optional[Any]:
  """The state of the latest checkpoint that restores, in the shardings of
  `abstract_state`, or None when the workdir has none.

  A checkpoint that fails to restore (a truncated or missing file, an emptied folder)
  is passed over with a warning for the one before it, and moved out of the way to
  <workdir>/damaged_checkpoints/<step> (never deleted), so that later saves and the
  rotation of old checkpoints do not meet it; if none restores, DamagedCheckpointError
  names them all. A checkpoint of another model is refused (CheckpointMismatchError).
  """
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      found = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - any failure to read means damaged
      damaged.append((step, e))
      continue
    check_record(found, record, str(manager.directory))
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))["state"]
    except Exception as e:  # noqa: BLE001
      damaged.append((step, e))
      continue
    if damaged:
      _set_aside(manager, [s for s, _ in damaged])
      for bad, error in damaged:
        logging.getLogger("absl").warning(
            "The checkpoint of step %d in %s is damaged and cannot be restored (%s); it was "
            "moved to %s and the run resumes from step %d.", bad, manager.directory,
            _first_line(error), _aside_directory(manager, bad), step)
    return restored
  if damaged:
    raise DamagedCheckpointError(
        f"None of the checkpoints in {manager.directory} can be restored: "
        + "; ".join(f"step {s} ({_first_line(e)})" for s, e in damaged)
        + ". Move them away (or use a new --workdir) to start from scratch.")
  return None


def _aside_directory(manager: ocp.CheckpointManager, step: int):
  return paths.path(str(manager.directory)).parent / "damaged_checkpoints" / str(step)


def _set_aside(manager: ocp.CheckpointManager, steps) -> None:
  """Moves the step folders `steps` to <workdir>/damaged_checkpoints (process 0, then every
  process waits for it) and rereads the manager's list of steps."""
  if jax.process_index() == 0:
    for step in steps:
      target = _aside_directory(manager, step)
      if target.exists():  # never overwrite one set aside before
        target = target.with_name(f"{step}.{int(time.time())}")
      paths.move_tree(paths.path(str(manager.directory)) / str(step), target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("segjax_damaged_checkpoints_moved")
  manager.reload()


def _step_directory(location: str) -> Tuple[Any, Optional[int]]:
  """(checkpoints folder, step or None for the latest) of a --checkpoint path (local or
  gs://): a training workdir, its `checkpoints` folder, or one step's folder (e.g.
  runs/x/checkpoints/4000)."""
  path = paths.absolute(location)
  step = None
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  elif path.name.isdigit():
    path, step = path.parent, int(path.name)
  if not path.is_dir():
    raise ValueError(f"--checkpoint {path} does not exist; give a training workdir, its "
                     "checkpoints folder or one step folder inside it.")
  return path, step


class _QuietReadOnly(logging.Filter):
  """Drops orbax's warnings that a read-only manager is read-only (it is asked to be: eval
  and predict must never write into a user's checkpoints)."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return "read_only=True" not in message and "is read only" not in message


def _read_only_manager(directory) -> ocp.CheckpointManager:
  if not any(isinstance(f, _QuietReadOnly) for f in logging.getLogger("absl").filters):
    logging.getLogger("absl").addFilter(_QuietReadOnly())
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})


def read_record(path: str) -> Tuple[Dict[str, Any], int]:
  """(model record, step) of the checkpoint at `path` (see `_step_directory`)."""
  directory, step = _step_directory(path)
  manager = _read_only_manager(directory)
  steps = manager.all_steps()
  if step is None:
    step = manager.latest_step()
  if step is None or step not in steps:
    raise ValueError(f"No checkpoint{'' if step is None else f' of step {step}'} in "
                     f"{directory}; its steps are {sorted(steps)}.")
  record = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  manager.close()
  return record, step


def restore_variables(path: str, step: int, abstract_variables) -> Dict[str, Any]:
  """The parameters and BatchNorm statistics of a checkpoint (no step, no optimizer
  state), in the shapes, dtypes and shardings of `abstract_variables`
  ({"params", "batch_stats"} of jax.ShapeDtypeStruct)."""
  directory, _ = _step_directory(path)
  manager = _read_only_manager(directory)
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_variables)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=abstract_variables, restore_args=restore_args, partial_restore=True)))["state"]
  manager.close()
  return {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}
