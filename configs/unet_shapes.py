"""U-Net on the embedded segjax_shapes dataset: the README's main job.

Variants: `configs/unet_shapes.py` (the main job) and `:smoke` (tiny, for CI).
"""
from configs import common, default


def get_config(variant: str = ""):
  config = default.get_config()
  config.model.name = "unet"
  config.model.options.width = 8
  config.model.options.depth = 4
  config.data.name = "segjax_shapes"
  # Training on 96x96 crops, evaluating on whole 128x128 images.
  config.data.train_ops = ("random_resize(scale=(128, 128), ratio_range=(0.75, 1.25))|"
                           "random_crop(size=(96, 96))|random_flip(prob=0.5)")
  # The shape ("thing") classes cover a fifth of the pixels: weight them up.
  config.loss.class_weights = (2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0)
  config.data.batch_size = 16
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.min_learning_rate = 0.0
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 50
  config.optimizer.weight_decay = 1e-4
  config.total_steps = 2200
  config.eval_every = 550
  config.checkpoint_every = 275
  # `--crf`: weights chosen on train[:48] by benchmarks/crf_miou.py (pydensecrf's
  # defaults, weight 10 and 13 colour levels, lose 36 mIoU on these textured scenes).
  config.inference.crf.bilateral_weight = 3.0
  config.inference.crf.bilateral_srgb = 30.0
  if variant == "smoke":
    config.model.options.width = 4
    config.model.options.depth = 2
    common.shapes_smoke(config, learning_rate=0.01)
    config.optimizer.warmup_steps = 2
    config.checkpoint_every = 20
  elif variant:
    raise ValueError(f"Unknown variant {variant!r} of unet_shapes; use '' or 'smoke'.")
  config.lock()
  return config
