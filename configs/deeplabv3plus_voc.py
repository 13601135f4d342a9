"""DeepLabV3+ R50-D8 on Pascal VOC 2012 + SBD (train_aug), 512x512, 20k iterations.

mmsegmentation's deeplabv3plus_r50-d8_512x512_20k_voc12aug recipe: ResNet-50
v1c at output stride 8, ASPP (rates 12/24/36 at stride 8) with image pooling,
the decoder on stride-4 features (48 channels) with two 3x3 separable convs,
an auxiliary FCN head on stage 3 (loss weight 0.4); 21 classes; random resize
of (2048, 512) by 0.5-2.0, 512x512 crop with cat_max_ratio 0.75, flip,
photometric distortion; SGD lr 0.01, momentum 0.9, wd 5e-4, poly 0.9 to 1e-4,
batch 16. Evaluation resizes keeping the ratio to (2048, 512) and scores the
prediction at each image's original size.

Data: `voc2012_aug` needs VOCtrainval_11-May-2012.tar and SBD's benchmark.tgz
in the manual dir (see README). Variants: `` (20k), `40k`, `smoke` (the same
architecture scaled down, on the embedded segjax_shapes data).
"""
from configs import common, default

EVAL_OPS = ("resize(scale=(2048, 512), resize_labels=False)|"
            "pad(size=(2048, 2048), label_size=(512, 512))")


def get_config(variant: str = ""):
  config = default.get_config()
  config.model.name = "deeplabv3plus"
  config.model.options = dict(backbone="resnet50_v1c", output_stride=8, aux_channels=256)
  config.loss.aux_weight = 0.4

  config.data.name = "voc2012_aug"
  config.data.train_split = "train_aug"
  config.data.train_ops = (
      "random_resize(scale=(2048, 512), ratio_range=(0.5, 2.0))|"
      "random_crop(size=(512, 512), cat_max_ratio=0.75)|random_flip(prob=0.5)|"
      "photometric_distortion|pad(size=(512, 512))")
  # VOC images are at most 500x500: resized to (2048, 512) their long side is
  # at most 2048; labels stay at their original size, padded to 512x512.
  config.data.eval_ops = EVAL_OPS
  config.data.batch_size = 16
  config.data.eval_batch_size = 8

  config.inference.scale = (2048, 512)  # whole/slide modes: the recipe's test resize

  common.mmseg_sgd_poly(config)
  config.total_steps = 20_000
  config.eval_every = config.checkpoint_every = 2_000
  config.log_every = 50

  if variant == "40k":
    config.total_steps = 40_000
    config.eval_every = config.checkpoint_every = 4_000
  elif variant == "smoke":
    config.model.options = dict(backbone="resnet18", backbone_width=8, output_stride=8,
                                channels=16, low_level_channels=8, aux_channels=8)
    # From scratch, 40 steps: a larger learning rate than the recipe's; eval scored at
    # the original size.
    common.shapes_smoke(
        config, learning_rate=0.05,
        train_ops=("random_resize(scale=(128, 128), ratio_range=(0.5, 2.0))|"
                   "random_crop(size=(128, 128), cat_max_ratio=0.75)|"
                   "random_flip(prob=0.5)|photometric_distortion"),
        eval_ops=("resize(scale=(96, 96), resize_labels=False)|"
                  "pad(size=(96, 96), label_size=(128, 128))"))
  elif variant:
    raise ValueError(f"Unknown variant {variant!r} of deeplabv3plus_voc; use '', '40k' or "
                     "'smoke'.")
  config.lock()
  return config
