"""PSPNet R50-D8 on Cityscapes (fine), 512x1024 crops, 80k iterations:
mmsegmentation's pspnet_r50-d8_4xb2-80k_cityscapes-512x1024, model and recipe.

The model of configs/pspnet_ade20k.py (mmseg's layout exactly; ResNet-50 v1c
from ImageNet weights, auxiliary FCNHead with loss weight 0.4) with 19
classes. Data: random resize of (2048, 1024) by 0.5-2.0, 512x1024 crop with
cat_max_ratio 0.75, flip, photometric distortion, pad; SGD lr 0.01, momentum
0.9, wd 5e-4, poly 0.9 to 1e-4, batch 8. Test: mmseg's whole-image inference
exactly, the image resized keeping its ratio to (2048, 1024) (every Cityscapes
image is 2048x1024 already, so it stays as it is), in batches of 4 of that one
shape (`inference.size_divisor=1`).

Data: `cityscapes` needs leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip
in the manual dir (see README). Variants: `` (80k), `40k`, `smoke` (the same
model scaled down, on the embedded segjax_shapes data).
"""
from configs import pspnet_ade20k


def get_config(variant: str = ""):
  if variant not in ("", "40k", "smoke"):
    raise ValueError(f"Unknown variant {variant!r} of pspnet_cityscapes; use '', '40k' or "
                     "'smoke'.")
  config = pspnet_ade20k.get_config("smoke" if variant == "smoke" else "")
  config.unlock()
  if variant != "smoke":
    cityscapes_recipe(config, 80_000 if variant == "" else 40_000)
  config.lock()
  return config


def cityscapes_recipe(config, total_steps: int) -> None:
  """mmseg's Cityscapes 512x1024 data and schedule (4 GPUs x 2 images)."""
  config.data.name = "cityscapes"
  config.data.train_split = "train"
  config.data.train_ops = (
      "random_resize(scale=(2048, 1024), ratio_range=(0.5, 2.0))|"
      "random_crop(size=(512, 1024), cat_max_ratio=0.75)|random_flip(prob=0.5)|"
      "photometric_distortion|pad(size=(512, 1024))")
  # Batched alternative of the test; every Cityscapes image is 1024x2048, which this keeps.
  config.data.eval_ops = "resize(scale=(2048, 1024))"
  config.data.batch_size = 8
  config.data.eval_batch_size = 4
  config.inference.scale = (2048, 1024)
  config.inference.label_ops = ""
  config.total_steps = total_steps
  config.eval_every = config.checkpoint_every = total_steps // 10
