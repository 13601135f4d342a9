"""Mask R-CNN R50-FPN on COCO 2017 instances, detectron2's 1x schedule.

detectron2 mask_rcnn_R_50_FPN_1x: ResNet-50 (stem and stage 1 frozen, frozen
BatchNorm, ImageNet initialisation) with an FPN (P2-P6), RPN anchors 32-512 with
ratios 0.5/1/2, ROIAlignV2 (aligned, adaptive sampling), 512 RoIs per image at a
quarter positives, a 2x1024 fc box head and a 4-conv mask head; batch 16, SGD lr
0.02, momentum 0.9, weight decay 1e-4, 1000 warmup steps from 0.001 x lr, lr x0.1
at 60k and 80k of 90k; training short side drawn from 640-800 (step 32), long
side <= 1333, flips; testing short side 800. Static shapes: images padded to
1344x1344, at most 100 instances per image, masks cropped to their boxes at 64x64
for training; evaluation scores detections at each image's original size
(COCO images are at most 640x640) with pycocotools.

Data: `coco_instances` (see README). Set `model.init_from` to an ImageNet
ResNet-50 converted with `python -m segjax.convert --arch resnet50`, or a whole
torchvision `maskrcnn_resnet50_fpn` checkpoint (`--arch maskrcnn_resnet50_fpn`).
Variants: `` (1x), `3x` (270k steps, drops at 210k and 250k), `smoke` (the same
model scaled down, on the embedded segjax_shapes data).
"""
from configs import common, default
from configs.maskrcnn_shapes import shapes_smoke

TRAIN_SIZES = tuple(range(640, 801, 32))


def get_config(variant: str = "", mask: bool = True):
  config = default.get_config()
  config.model.name = "mask_rcnn"
  config.model.options = dict(
      mask=mask, backbone="resnet50", frozen_bn=True, trainable_layers=3,
      rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000,
      rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=1000,
      roi_sampling_ratio=0, roi_aligned=True, detections_per_img=100)
  config.data.name = "coco_instances"
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  masks = "|crop_masks(size=64)" if mask else ""
  config.data.train_ops = (
      f"unpack_instances|random_short_side(sizes={TRAIN_SIZES}, max_size=1333)|"
      f"random_flip(prob=0.5)|pad(size=(1344, 1344))|pad_instances(max_instances=100)"
      + masks)
  config.data.eval_ops = ("unpack_instances|resize(scale=(1333, 800), resize_labels=False)|"
                          "pad(size=(1344, 1344), label_size=(640, 640))|"
                          "pad_instances(max_instances=100)")
  config.data.batch_size = 16
  config.data.eval_batch_size = 8
  config.inference.scale = (1333, 800)  # predict.py: the test resize

  common.detectron2_sgd_steps(config, learning_rate=0.02, decay_steps=(60_000, 80_000),
                              total_steps=90_000)
  config.log_every = 20
  config.eval_every = config.checkpoint_every = 10_000

  if variant == "3x":
    config.optimizer.decay_steps = (210_000, 250_000)
    config.total_steps = 270_000
  elif variant == "smoke":
    shapes_smoke(config)
  elif variant:
    raise ValueError(f"Unknown variant {variant!r}; use '', '3x' or 'smoke'.")
  config.lock()
  return config
