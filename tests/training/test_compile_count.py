"""A run compiles a fixed set of XLA programs: the train step once whatever the number
of steps, evaluation programs once per bucket shape whatever the number of evaluations,
nothing new after the first evaluation and checkpoint. Counted from JAX's compile events
(segjax/training/compile_count.py) over a `:smoke` run of the ADE20K recipe (bucketed
whole-image evaluation) that evaluates and saves three times."""
import logging

import pytest

from configs import pspnet_ade20k
from segjax.tasks.base import Evaluator
from segjax.training import trainer
from segjax.training.compile_count import CompileCounter


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(compile counts of the whole run, counts when each evaluation began, absl messages)."""
  config = pspnet_ade20k.get_config("smoke")
  config.unlock()
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.data.eval_split = "validation[:8]"
  config.data.eval_batch_size = 8
  config.total_steps, config.eval_every, config.checkpoint_every, config.log_every = 6, 2, 2, 2
  config.lock()
  messages, snapshots = [], []
  handler = logging.Handler()
  handler.emit = lambda record: messages.append(record.getMessage())
  logger = logging.getLogger("absl")
  logger.addHandler(handler)
  level = logger.level
  logger.setLevel(logging.INFO)
  evaluate = Evaluator.evaluate

  def snapshot_then_evaluate(self, variables):
    snapshots.append(dict(counter.counts))
    return evaluate(self, variables)
  try:
    with CompileCounter() as counter, pytest.MonkeyPatch.context() as patch:
      patch.setattr(Evaluator, "evaluate", snapshot_then_evaluate)
      trainer.train_and_evaluate(config, str(tmp_path_factory.mktemp("run")))
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
  return dict(counter.counts), snapshots, messages


def test_the_train_step_compiles_once(run):
  counts, _, _ = run
  assert counts["train_step"] == 1, counts


def test_evaluation_compiles_once_per_bucket(run):
  # segjax_shapes images share one size: one bucket, evaluated at steps 2, 4 and 6.
  counts, snapshots, _ = run
  assert len(snapshots) == 3
  assert counts["forward"] == 1 and counts["score"] == 1, counts


def test_nothing_compiles_after_the_first_step_evaluation_and_save(run):
  """Steps 1-2, the evaluation and checkpoint of step 2 compile all there is: from the
  second evaluation to the end (evaluations and checkpoints of steps 4 and 6, steps 5-6)
  no program is compiled again, and the run compiles a bounded number of programs."""
  counts, snapshots, _ = run
  assert counts == snapshots[1], {k: v - snapshots[1].get(k, 0) for k, v in counts.items()}
  assert sum(counts.values()) < 250, counts


def test_the_trainer_logs_its_compilations(run):
  _, _, messages = run
  assert any("XLA programs compiled" in m and "train_step x1" in m for m in messages), messages
