"""U-Net (same-padded, with BatchNorm) on Cityscapes, 512x1024 crops, 160k iterations.

After mmsegmentation's unet-s5-d16 Cityscapes recipe: a 5-level U-Net (base
width 64, four 2x downsamplings) trained with random resize of (2048, 1024) by
0.5-2.0, 512x1024 crops with cat_max_ratio 0.75, flip and photometric
distortion; SGD lr 0.01, momentum 0.9, wd 5e-4, poly 0.9 to 1e-4, batch 16;
whole-image evaluation at 1024x2048. segjax's `unet` predicts with a 1x1
classifier on the last decoder level; mmseg adds an FCN head and an auxiliary
head, so its 69.1 mIoU is a guide, not an exact target.

The paper's unpadded U-Net (`unet_valid`) trains with the same data plus the
`elastic` and `mirror_pad(pixels=92)` ops; its overlap-tile evaluation of whole
images needs sliding-window inference, which is not in segjax yet.

Variants: `` (needs cityscapes, see README), `smoke`.
"""
from configs import deeplabv3plus_cityscapes, unet_shapes


def get_config(variant: str = ""):
  if variant == "smoke":
    return unet_shapes.get_config("smoke")
  if variant:
    raise ValueError(f"Unknown variant {variant!r} of unet_cityscapes; use '' or 'smoke'.")
  config = deeplabv3plus_cityscapes.get_config()
  config.unlock()
  config.model.name = "unet"
  config.model.options = dict(width=64, depth=4)
  config.loss.aux_weight = 0.0
  config.data.batch_size = 16
  config.total_steps = 160_000
  config.eval_every = config.checkpoint_every = 16_000
  config.lock()
  return config
