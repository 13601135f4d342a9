"""DeepLabV3+ R50-D8 on Cityscapes (fine), 512x1024 crops, 80k iterations.

mmsegmentation's deeplabv3plus_r50-d8_512x1024_80k_cityscapes recipe (80.09
mIoU single scale in its model zoo): the model of configs/deeplabv3plus_voc.py
with 19 classes; random resize of (2048, 1024) by 0.5-2.0, 512x1024 crop with
cat_max_ratio 0.75, flip, photometric distortion; SGD lr 0.01, momentum 0.9,
wd 5e-4, poly 0.9 to 1e-4, batch 8; whole-image evaluation at 1024x2048.

Data: `cityscapes` needs leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip
in the manual dir (see README). Variants: `` (80k), `40k`, `smoke`.
"""
from configs import deeplabv3plus_voc


def get_config(variant: str = ""):
  base = "smoke" if variant == "smoke" else ""
  if variant not in ("", "40k", "smoke"):
    raise ValueError(f"Unknown variant {variant!r} of deeplabv3plus_cityscapes; use '', "
                     "'40k' or 'smoke'.")
  config = deeplabv3plus_voc.get_config(base)
  config.unlock()
  if variant != "smoke":
    config.data.name = "cityscapes"
    config.data.train_split = "train"
    config.data.train_ops = (
        "random_resize(scale=(2048, 1024), ratio_range=(0.5, 2.0))|"
        "random_crop(size=(512, 1024), cat_max_ratio=0.75)|random_flip(prob=0.5)|"
        "photometric_distortion|pad(size=(512, 1024))")
    # Every Cityscapes image is 1024x2048: this resize keeps it as it is.
    config.data.eval_ops = "resize(scale=(2048, 1024))"
    config.data.batch_size = 8
    config.data.eval_batch_size = 4
    config.inference.scale = (2048, 1024)
    config.total_steps = 80_000 if variant == "" else 40_000
    config.eval_every = config.checkpoint_every = config.total_steps // 10
  config.lock()
  return config
