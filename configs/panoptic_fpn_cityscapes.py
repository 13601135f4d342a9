"""Panoptic FPN R50-FPN on Cityscapes (fine), after detectron2's Cityscapes recipes.

8 thing classes (person ... bicycle, trainIds 11-18) as instances, 11 stuff
classes from the semantic head; ResNet-50 FPN from ImageNet (`model.init_from`),
frozen BatchNorm; batch 8, SGD lr 0.01, 24k steps with x0.1 at 18k (detectron2's
Cityscapes Mask R-CNN schedule); training short side 800-1024 (step 32) with
flips on 1024x2048 images padded to 1024x2048 crops of the scaled image; testing at
the full 1024x2048. Stuff area limit 2048 (Cityscapes' images are 2 Mpx).
Variants: `` and `smoke` (tiny, on segjax_shapes).
"""
from configs import common, default, panoptic_fpn_shapes

TRAIN_SIZES = tuple(range(800, 1025, 32))


def get_config(variant: str = ""):
  if variant == "smoke":
    return panoptic_fpn_shapes.get_config("smoke")
  if variant:
    raise ValueError(f"Unknown variant {variant!r} of panoptic_fpn_cityscapes; use '' or "
                     "'smoke'.")
  config = default.get_config()
  config.model.name = "panoptic_fpn"
  config.model.options = dict(
      backbone="resnet50", frozen_bn=True, trainable_layers=3, fusion="heuristic",
      semantic_channels=128, semantic_norm="GN", roi_sampling_ratio=0, roi_aligned=True,
      rpn_post_nms_top_n_train=1000)
  config.data.name = "cityscapes"
  config.data.train_ops = (
      f"unpack_instances|random_short_side(sizes={TRAIN_SIZES}, max_size=4096)|"
      "random_crop(size=(1024, 2048))|random_flip(prob=0.5)|pad(size=(1024, 2048))|"
      "pad_instances(max_instances=100)|crop_masks(size=64)")
  config.data.eval_ops = "unpack_instances|pad_instances(max_instances=100, max_segments=150)"
  config.data.batch_size = 8
  config.data.eval_batch_size = 8
  config.inference.panoptic.stuff_area_threshold = 2048
  common.detectron2_sgd_steps(config, learning_rate=0.01, decay_steps=(18_000,),
                              total_steps=24_000)
  config.log_every = 20
  config.eval_every = config.checkpoint_every = 4_000
  config.lock()
  return config
