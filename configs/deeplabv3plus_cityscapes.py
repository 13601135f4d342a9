"""DeepLabV3+ R50-D8 on Cityscapes (fine), 512x1024 crops, 80k iterations:
mmsegmentation's deeplabv3plus_r50-d8_4xb2-80k_cityscapes-512x1024, model and recipe.

The model of configs/deeplabv3plus_ade20k.py (`deeplabv3plus_mmseg`, mmseg's
layout exactly) with 19 classes; data, schedule and mmseg-exact whole-image
test of configs/pspnet_cityscapes.py.

Data: `cityscapes` needs leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip
in the manual dir (see README). Variants: `` (80k), `40k`, `smoke`.
"""
from configs import deeplabv3plus_ade20k, pspnet_cityscapes


def get_config(variant: str = ""):
  if variant not in ("", "40k", "smoke"):
    raise ValueError(f"Unknown variant {variant!r} of deeplabv3plus_cityscapes; use '', "
                     "'40k' or 'smoke'.")
  config = deeplabv3plus_ade20k.get_config("smoke" if variant == "smoke" else "")
  config.unlock()
  if variant != "smoke":
    pspnet_cityscapes.cityscapes_recipe(config, 80_000 if variant == "" else 40_000)
  config.lock()
  return config
