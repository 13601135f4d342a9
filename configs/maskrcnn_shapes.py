"""Mask R-CNN on the embedded segjax_shapes dataset: instance segmentation of the
four thing classes (disk, square, triangle, ring), trained from scratch on a CPU.

A scaled-down Mask R-CNN (ResNet-18 at half width, 64-channel FPN, anchors 16-256
for 128x128 images, fewer proposals and RoIs) with trainable BatchNorm, since
there are no pretrained weights. Variants: "" (the README's figure) and `:smoke`
(tiny, for CI).
"""
from configs import default


def get_config(variant: str = ""):
  config = default.get_config()
  config.model.name = "mask_rcnn"
  options = config.model.options
  options.backbone = "resnet18"
  options.backbone_width = 32
  options.fpn_channels = 64
  options.frozen_bn = False
  options.trainable_layers = 5
  options.anchor_sizes = (16, 32, 64, 128, 256)
  options.rpn_pre_nms_top_n_train = 512
  options.rpn_post_nms_top_n_train = 256
  options.rpn_pre_nms_top_n_test = 512
  options.rpn_post_nms_top_n_test = 128
  options.rpn_batch_size_per_image = 128
  options.box_batch_size_per_image = 64
  options.representation_size = 256
  options.mask_channels = 64
  options.detections_per_img = 20
  config.data.name = "segjax_shapes"
  config.data.train_ops = ("instance_masks|random_resize(scale=(128, 128), "
                           "ratio_range=(0.8, 1.25))|random_crop(size=(128, 128))|"
                           "random_flip(prob=0.5)")
  config.data.eval_ops = "instance_masks"
  config.data.batch_size = 8
  config.data.eval_batch_size = 32
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.min_learning_rate = 0.0
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 200
  config.optimizer.weight_decay = 1e-4
  config.optimizer.grad_clip_norm = 10.0
  config.total_steps = 2000
  config.log_every = 20
  config.eval_every = 500
  config.checkpoint_every = 500
  if variant == "smoke":
    shapes_smoke(config)
  elif variant:
    raise ValueError(f"Unknown variant {variant!r} of maskrcnn_shapes; use '' or 'smoke'.")
  config.lock()
  return config


def shapes_smoke(config) -> None:
  """A tiny Mask R-CNN (or Faster R-CNN) run of 6 steps on the embedded data, for CI."""
  options = config.model.options
  options.update(backbone="resnet18", backbone_width=8, fpn_channels=16, frozen_bn=False,
                 trainable_layers=5, anchor_sizes=(16, 32, 64, 128, 256),
                 rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=32,
                 rpn_pre_nms_top_n_test=64, rpn_post_nms_top_n_test=32,
                 rpn_batch_size_per_image=32, box_batch_size_per_image=16,
                 representation_size=32, detections_per_img=20)
  if options.get("mask", True):
    options.mask_channels = 16
  config.model.init_from = ""
  config.data.name = "segjax_shapes"
  config.data.train_split = "train"
  config.data.eval_split = "validation[:16]"
  config.data.train_ops = "instance_masks|random_flip(prob=0.5)"
  config.data.eval_ops = "instance_masks"
  config.data.batch_size = 8
  config.data.eval_batch_size = 8
  config.inference.scale = (0, 0)
  config.optimizer.name = "adamw"
  config.optimizer.schedule = "cosine"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.min_learning_rate = 0.0
  config.optimizer.warmup_steps = 2
  config.optimizer.weight_decay = 1e-4
  config.total_steps = 6
  config.log_every = 2
  config.eval_every = 6
  config.checkpoint_every = 3
