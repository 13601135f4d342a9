"""FCN R50-D8 on ADE20K, 512x512, 80k iterations: mmsegmentation's
fcn_r50-d8_4xb4-80k_ade20k-512x512, model and recipe.

Model `fcn_mmseg`, mmseg's layout exactly (its checkpoints load with
`segjax.convert.load_peer_checkpoint`): ResNet-50 v1c at output stride 8,
FCNHead (two 3x3 conv-BN-ReLUs to 512, the input concatenated with their
output and fused by a 3x3 conv-BN-ReLU, Dropout2d 0.1, classifier) and the
auxiliary FCNHead on stage 3 (256 channels, loss weight 0.4). Data, schedule,
optimizer and mmseg-exact whole-image test as configs/pspnet_ade20k.py.
(torchvision's FCN layout, one conv and no concatenation, is `fcn_resnet`.)

Variants: `` (needs ADE20K), `160k`, `smoke` (scaled down, embedded data).
"""
from configs import pspnet_ade20k


def get_config(variant: str = ""):
  if variant not in ("", "160k", "smoke"):
    raise ValueError(f"Unknown variant {variant!r} of fcn_ade20k; use '', '160k' or "
                     "'smoke'.")
  config = pspnet_ade20k.get_config(variant)
  config.unlock()
  del config.model["options"]
  config.model.name = "fcn_mmseg"
  options = dict(backbone="resnet50_v1c", output_stride=8, contract_dilation=True,
                 channels=512, num_convs=2, concat_input=True, dropout=0.1, aux_channels=256)
  if variant == "smoke":
    options.update(backbone="resnet18", backbone_width=8, channels=16, aux_channels=8)
  config.model.options = options
  config.lock()
  return config
