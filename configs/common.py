"""Recipes that several configs share; each sets its fields on a config made by
`default.get_config()` (and returns nothing), so a config reads as its
differences from the recipe.
"""


def mmseg_sgd_poly(config) -> None:
  """mmsegmentation's semantic-segmentation optimizer: SGD, lr 0.01, momentum 0.9,
  weight decay 5e-4, poly decay (power 0.9) to 1e-4."""
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.01
  config.optimizer.min_learning_rate = 1e-4
  config.optimizer.schedule = "poly"
  config.optimizer.poly_power = 0.9
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4


def detectron2_sgd_steps(config, learning_rate: float, decay_steps, total_steps: int) -> None:
  """detectron2's detection optimizer: SGD with momentum 0.9 and weight decay 1e-4,
  a linear warmup over 1000 steps from 0.001 x `learning_rate`, then x0.1 at each
  of `decay_steps`, for `total_steps`."""
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = learning_rate
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = "steps"
  config.optimizer.warmup_steps = 1000
  config.optimizer.warmup_factor = 0.001
  config.optimizer.decay_steps = tuple(decay_steps)
  config.optimizer.decay_factor = 0.1
  config.total_steps = total_steps


def shapes_smoke(config, learning_rate: float, train_ops=None, eval_ops=None) -> None:
  """A CI-sized run of a config's model: 40 steps on the embedded segjax_shapes
  data (batch 8, evaluation batch 32), evaluated and checkpointed at the end.
  `train_ops` / `eval_ops` replace the config's when given; the model is the
  caller's to scale down."""
  config.data.name = "segjax_shapes"
  config.data.train_split = "train"
  if train_ops is not None:
    config.data.train_ops = train_ops
  if eval_ops is not None:
    config.data.eval_ops = eval_ops
  config.data.batch_size = 8
  config.data.eval_batch_size = 32
  config.inference.scale = (0, 0)
  config.optimizer.learning_rate = learning_rate
  config.total_steps = 40
  config.log_every = 5
  config.eval_every = config.checkpoint_every = 40
