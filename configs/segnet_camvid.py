"""SegNet on CamVid (SegNet's 11-class version, 360x480), median-frequency
balanced cross-entropy.

The SegNet paper's setup: the VGG-16-style encoder (13 convs with BatchNorm),
a decoder that upsamples with the encoder's max-pool indices, SGD with a fixed
learning rate of 0.1 and momentum 0.9, batch 12, class weights from median
frequency balancing (the values published with SegNet-Tutorial), whole
360x480 images with horizontal flips, "until the loss converges": 10k steps
(about 330 epochs of the 367 training images) is this config's choice.
Evaluation on the 101-image val split (`eval_split` "test" for the 233-image
test set).

Variants: `` (needs camvid, see README), `smoke` (scaled-down SegNet on the
embedded segjax_shapes data).
"""
from configs import common, default
from segjax.data.camvid_builder import SEGNET_CLASS_WEIGHTS


def get_config(variant: str = ""):
  config = default.get_config()
  config.model.name = "segnet"
  config.model.options = dict(width=64)
  config.loss.class_weights = tuple(SEGNET_CLASS_WEIGHTS)

  config.data.name = "camvid"
  config.data.train_ops = "random_flip(prob=0.5)"
  config.data.eval_ops = ""
  config.data.batch_size = 12
  config.data.eval_batch_size = 12

  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.1
  config.optimizer.schedule = "constant"
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.total_steps = 10_000
  config.eval_every = config.checkpoint_every = 1_000
  config.log_every = 20

  if variant == "smoke":
    config.model.options = dict(width=4)
    config.loss.class_weights = (2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0)
    common.shapes_smoke(config, learning_rate=0.05)
  elif variant:
    raise ValueError(f"Unknown variant {variant!r} of segnet_camvid; use '' or 'smoke'.")
  config.lock()
  return config
