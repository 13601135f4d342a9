"""PSPNet R50-D8 on ADE20K, 512x512, 80k iterations: mmsegmentation's
pspnet_r50-d8_4xb4-80k_ade20k-512x512, model and recipe.

Model (mmseg's layout exactly, so its checkpoints load with
`segjax.convert.load_peer_checkpoint`; tests/test_mmseg_parity.py): ResNet-50
v1c (deep stem), output stride 8 (dilations 1, 1, 2, 4, contract_dilation),
sync BatchNorm, PSPHead (pyramid pooling bins 1, 2, 3, 6 to 512 channels, 3x3
bottleneck, Dropout2d 0.1, classifier), auxiliary FCNHead on stage 3 (256
channels) with loss weight 0.4; the backbone starts from ImageNet ResNet-50 v1c
(`model.init_from`). Recipe: SGD lr 0.01, momentum 0.9, weight decay 5e-4, poly
power 0.9 to 1e-4; batch 16. Data: label 0 -> ignore, random resize of (2048,
512) by 0.5-2.0, 512x512 crop with cat_max_ratio 0.75, flip, photometric
distortion, pad. Test: mmseg's whole-image inference exactly (`inference.mode`
"whole", `exact_shapes`): resize keeping the ratio to (2048, 512), logits
resized back to each image's original size; in batches of `data.eval_batch_size`
images of the same resized size (`inference.size_divisor=1`, nothing padded: one
compiled shape per distinct resized size). `--config.inference.exact_shapes=False
--config.inference.size_divisor=64` (or `inference.buckets`) bounds the compiled
shapes at the price of padding; `data.eval_ops` is the old batched alternative
(every image padded to 2048x2048) for `--config.inference.mode=batched`.

Variants: `` (the full recipe; needs ADE20K), `160k`, and `smoke`: the same
PSPNet scaled down (ResNet-18 layout at width 8, 16-channel PPM branches) on the
embedded segjax_shapes data with the same optimizer recipe, so CI exercises this
file without ADE20K.
"""
from configs import common, default


def get_config(variant: str = ""):
  config = default.get_config()
  config.model.name = "pspnet"
  config.model.options.backbone = "resnet50_v1c"
  config.model.options.output_stride = 8
  config.model.options.pool_bins = (1, 2, 3, 6)
  config.model.options.contract_dilation = True
  config.model.options.head_channels = 512
  config.model.options.dropout = 0.1
  config.model.options.aux_channels = 256
  config.model.init_from = "resnet50_v1c"  # mmseg's open-mmlab://resnet50_v1c
  config.loss.aux_weight = 0.4

  config.data.name = "ade20k"
  config.data.train_ops = (
      "reduce_zero_label|random_resize(scale=(2048, 512), ratio_range=(0.5, 2.0))|"
      "random_crop(size=(512, 512), cat_max_ratio=0.75)|random_flip(prob=0.5)|"
      "photometric_distortion|pad(size=(512, 512))")
  # Batched alternative of the test: the image is resized keeping its ratio to (2048, 512)
  # and padded to 2048x2048 (the only static shape every such resize fits); labels keep
  # their size.
  config.data.eval_ops = ("reduce_zero_label|resize(scale=(2048, 512), resize_labels=False)|"
                          "pad(size=(2048, 2048), label_size=(2048, 2048))")
  config.data.batch_size = 16
  config.data.eval_batch_size = 8

  config.inference.mode = "whole"  # mmseg's test_cfg mode
  config.inference.exact_shapes = True
  config.inference.size_divisor = 1  # batches of one resized size (segjax/inference/buckets.py)
  config.inference.scale = (2048, 512)  # the recipe's test resize (w, h)
  config.inference.label_ops = "reduce_zero_label"

  common.mmseg_sgd_poly(config)
  config.total_steps = 80_000
  config.eval_every = 8_000
  config.checkpoint_every = 8_000
  config.log_every = 50

  if variant == "160k":
    config.total_steps = 160_000
    config.eval_every = config.checkpoint_every = 16_000
  elif variant == "smoke":
    # The same PSPNet (dilated ResNet, PPM, auxiliary head), scaled down.
    config.model.options.backbone = "resnet18"
    config.model.options.backbone_width = 8
    config.model.options.head_channels = 16
    config.model.options.aux_channels = 8
    shapes_smoke(config)
  elif variant:
    raise ValueError(f"Unknown variant {variant!r} of pspnet_ade20k; use '', '160k' or "
                     "'smoke'.")
  config.lock()
  return config


def shapes_smoke(config) -> None:
  """The smoke variant's data and schedule: 40 steps from scratch on the embedded
  segjax_shapes data, evaluated whole (exact shapes, batched by size) at the original size."""
  config.model.init_from = ""
  config.inference.label_ops = ""
  # From scratch, 40 steps: a larger learning rate than the recipe's.
  common.shapes_smoke(
      config, learning_rate=0.05, eval_ops="",
      train_ops=("random_resize(scale=(128, 128), ratio_range=(0.5, 2.0))|"
                 "random_crop(size=(128, 128), cat_max_ratio=0.75)|"
                 "random_flip(prob=0.5)|photometric_distortion"))
