"""DeepLabV3+ R50-D8 on ADE20K, 512x512, 80k iterations: mmsegmentation's
deeplabv3plus_r50-d8_4xb4-80k_ade20k-512x512, model and recipe.

Model `deeplabv3plus_mmseg`, mmseg's layout exactly (its checkpoints load with
`segjax.convert.load_peer_checkpoint`): ResNet-50 v1c at output stride 8,
DepthwiseSeparableASPPHead (image pooling, a 1x1 branch and depthwise-separable
3x3 atrous branches at rates 12, 24, 36, each 512 channels, a 3x3 bottleneck;
decoder on the stride-4 stage-1 features projected to 48 channels, two
separable 3x3 convs to 512, Dropout2d 0.1, classifier) and the auxiliary
FCNHead on stage 3 (256 channels, loss weight 0.4). Data, schedule, optimizer
and mmseg-exact whole-image test as configs/pspnet_ade20k.py.

Variants: `` (needs ADE20K), `160k`, `smoke` (scaled down, embedded data).
"""
from configs import pspnet_ade20k


def get_config(variant: str = ""):
  if variant not in ("", "160k", "smoke"):
    raise ValueError(f"Unknown variant {variant!r} of deeplabv3plus_ade20k; use '', '160k' "
                     "or 'smoke'.")
  config = pspnet_ade20k.get_config(variant)
  config.unlock()
  del config.model["options"]
  config.model.name = "deeplabv3plus_mmseg"
  options = dict(backbone="resnet50_v1c", output_stride=8, contract_dilation=True,
                 dilations=(1, 12, 24, 36), channels=512, c1_channels=48, dropout=0.1,
                 aux_channels=256)
  if variant == "smoke":
    options.update(backbone="resnet18", backbone_width=8, channels=16, c1_channels=8,
                   aux_channels=8)
  config.model.options = options
  config.lock()
  return config
