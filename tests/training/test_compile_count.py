"""A run compiles a fixed, small set of XLA programs: the train step once whatever the
number of steps, evaluation programs once per bucket shape whatever the number of
evaluations. Counted from JAX's compile events over a `:smoke` run of the ADE20K
recipe (bucketed whole-image evaluation) that evaluates three times."""
import logging

import pytest

from configs import pspnet_ade20k
from segjax.training import trainer
from segjax.training.compile_count import CompileCounter


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  config = pspnet_ade20k.get_config("smoke")
  config.unlock()
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.data.eval_split = "validation[:8]"
  config.data.eval_batch_size = 8
  config.total_steps, config.eval_every, config.checkpoint_every, config.log_every = 6, 2, 6, 2
  config.lock()
  messages = []
  handler = logging.Handler()
  handler.emit = lambda record: messages.append(record.getMessage())
  logger = logging.getLogger("absl")
  logger.addHandler(handler)
  level = logger.level
  logger.setLevel(logging.INFO)
  try:
    with CompileCounter() as counter:
      trainer.train_and_evaluate(config, str(tmp_path_factory.mktemp("run")))
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
  print(dict(counter.counts))
  return counter.counts, messages


def test_the_train_step_compiles_once(run):
  counts, _ = run
  assert counts["train_step"] == 1, dict(counts)


def test_evaluation_compiles_once_per_bucket(run):
  # segjax_shapes images share one size: one bucket, evaluated at steps 2, 4 and 6.
  counts, _ = run
  assert counts["forward"] == 1 and counts["score"] == 1, dict(counts)


def test_no_program_is_compiled_again(run):
  """No jitted function of the run compiles twice, and the run compiles a few dozen
  programs at most (not a number growing with steps or evaluations)."""
  counts, _ = run
  assert sum(counts.values()) < 80, dict(counts)
  assert {name: n for name, n in counts.items() if n > 1} == {}


def test_the_trainer_logs_its_compilations(run):
  _, messages = run
  assert any("XLA programs compiled" in m and "train_step x1" in m for m in messages), messages
