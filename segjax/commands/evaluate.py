"""eval.py: a checkpoint's metrics on the config's eval split, as the task's evaluator
computes them, printed and written as JSON."""
import json
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import ml_collections
import numpy as np

from segjax import paths, visualization
from segjax.commands.restore import restore
from segjax.tasks import variables_of
from segjax.training import sharding


def evaluate_checkpoint(config: ml_collections.ConfigDict, checkpoint: str,
                        output: str = "",
                        report: Optional[Callable[[Dict[str, Any], str], None]] = None
                        ) -> Tuple[Dict[str, Any], str]:
  """Scores a checkpoint on `data.eval_split`; writes the metrics as JSON to `output`
  (and a panel of the first predictions beside it, where the task draws one).
  Returns (metrics with "step", "split" and "mode", the task's console table).

  `report(metrics, table)` is called before anything is written, so that the numbers
  are out even when `output`'s folder cannot be written (then a ValueError says where)."""
  restored = restore(checkpoint, config, open_dataset=True)
  config, dataset = restored.config, restored.dataset
  evaluator = restored.task.evaluator(
      config, dataset, restored.model, variable_shardings=variables_of(restored.variable_shardings),
      batch_sharding=sharding.batch_sharding(restored.mesh, config.mesh.batch_axes))
  metrics = evaluator.evaluate(restored.variables)
  table = evaluator.table(metrics)
  metrics = {"step": restored.step, "split": config.data.eval_split,
             "mode": config.inference.mode, **metrics}
  if report is not None:
    report(metrics, table)
  if output and jax.process_index() == 0:
    target = paths.absolute(output)  # local or gs://
    directory = target.parent
    try:
      directory.mkdir(parents=True, exist_ok=True)
      paths.write_text(target, json.dumps(_jsonable(metrics, dataset.class_names), indent=1))
      visualization.save_step_panel(str(directory), restored.step, evaluator.panel())
    except paths.storage_errors() as e:
      raise ValueError(f"Could not write the results to {directory} "
                       f"({getattr(e, 'strerror', '') or e}); give --output a path in a "
                       "folder you can write to.") from e
  return metrics, table


def default_output(checkpoint: str, split: str) -> str:
  """eval.py's --output when none is given: eval_<split>.json in the training workdir
  (local or gs://) of `checkpoint`, or beside a step folder or weights file."""
  location = paths.absolute(checkpoint)
  folder = location if (location / "checkpoints").is_dir() else location.parent
  return str(folder / f"eval_{split.split('[')[0]}.json")


def _jsonable(metrics: Dict[str, Any], class_names) -> Dict[str, Any]:
  """Scalars as floats (NaN as null), per-class arrays as {class name: value},
  nested dicts (COCO's per iou type) likewise."""
  def number(x):
    return None if np.isnan(x) else float(x)
  out = {}
  for key, value in metrics.items():
    if isinstance(value, np.ndarray) and value.ndim == 1:
      out[key] = {name: number(v) for name, v in zip(class_names, value)}
    elif isinstance(value, (float, np.floating)):
      out[key] = number(value)
    elif isinstance(value, dict):
      out[key] = _jsonable(value, class_names)
    else:
      out[key] = value
  return out
