"""Tasks: semantic, instance, panoptic and promptable (SAM) segmentation behind one interface.

`get_task(config)` gives the config's `Task`; the trainer, eval.py and predict.py use only
its methods (model, data ops, objective, evaluator, predictor, writer), never the task's
name. See segjax/tasks/base.py.
"""
from segjax.tasks.base import (TASKS, Evaluator, Objective, PredictionWriter, Task, get_task,
                               task_name, variables_of)
from segjax.tasks import instance, panoptic, promptable, semantic  # noqa: F401  (registers)

__all__ = ["TASKS", "Evaluator", "Objective", "PredictionWriter", "Task", "get_task",
           "task_name", "variables_of"]
