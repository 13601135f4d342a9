"""DeepLabV3 R50-D8 on ADE20K, 512x512, 80k iterations.

mmsegmentation's deeplabv3_r50-d8 recipe for data, schedule and optimizer
(the same as PSPNet's, see configs/pspnet_ade20k.py), with the model in
torchvision's DeepLabV3 layout: dilated ResNet-50 (output stride 8), ASPP with
rates 12/24/36 and image pooling projected to 256 channels, a 3x3 conv and the
classifier, plus an auxiliary FCN head on stage 3 (loss weight 0.4). mmseg's
ASPP head differs in detail (512 channels, a 3x3 bottleneck after the concat),
so its published numbers are a guide, not an exact target.

Variants: `` (needs ADE20K), `160k`, `smoke` (scaled down, embedded data).
"""
from configs import pspnet_ade20k


def get_config(variant: str = ""):
  config = pspnet_ade20k.get_config(variant)
  config.unlock()
  del config.model["options"]
  config.model.name = "deeplabv3"
  options = dict(backbone="resnet50_v1c", output_stride=8, contract_dilation=True,
                 channels=256, aux_channels=256)
  if variant == "smoke":
    options.update(backbone="resnet18", backbone_width=8, channels=16, aux_channels=8)
  config.model.options = options
  config.lock()
  return config
