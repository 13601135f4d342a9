"""FCN-8s (VGG-16) on Pascal VOC 2012 + SBD (train_aug), whole images.

The FCN paper's setup: VGG-16 with fc6/fc7 as convolutions, the 100-pixel
first-layer padding, skip fusion of pool4 and pool3 scores, learned 2x/2x/8x
upsampling (bilinear initialisation); whole images (no crops, VOC images are
at most 500x500, padded to 512x512 with ignored labels), horizontal flip as
the only augmentation; SGD with momentum 0.9, weight decay 5e-4 and a fixed
learning rate of 1e-4 on the per-pixel-averaged loss, batch 20. The paper
trains "to convergence"; 50k steps (about 95 epochs of train_aug) is this
config's choice. Start the encoder from ImageNet weights with
`--config.model.init_from` (`python -m segjax.convert --arch vgg16 ...`).

Variants: `` (needs voc2012_aug, see README), `smoke` (scaled-down FCN-8s on
the embedded segjax_shapes data).
"""
from configs import common, default


def get_config(variant: str = ""):
  config = default.get_config()
  config.model.name = "fcn8s"
  config.model.options = dict(backbone="vgg16")

  config.data.name = "voc2012_aug"
  config.data.train_split = "train_aug"
  config.data.train_ops = "random_flip(prob=0.5)|pad(size=(512, 512))"
  config.data.eval_ops = "pad(size=(512, 512))"
  config.data.batch_size = 20
  config.data.eval_batch_size = 20

  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 1e-4
  config.optimizer.schedule = "constant"
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.total_steps = 50_000
  config.eval_every = config.checkpoint_every = 5_000
  config.log_every = 50

  if variant == "smoke":
    config.model.options = dict(backbone="vgg16", width=4, fc_width=32)
    common.shapes_smoke(config, learning_rate=0.01,  # from scratch, 40 steps
                        train_ops="random_flip(prob=0.5)", eval_ops="")
  elif variant:
    raise ValueError(f"Unknown variant {variant!r} of fcn8s_voc; use '' or 'smoke'.")
  config.lock()
  return config
