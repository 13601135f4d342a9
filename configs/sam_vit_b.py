"""Segment Anything, ViT-B: promptable masks (predict.py) and fine-tuning.

Inference needs only the official weights (the .pth converts on the fly):

  python predict.py --config configs/sam_vit_b.py --checkpoint sam_vit_b_01ec64.pth \
      --input photos/ --output out/ --points "500,375" | --boxes "x0,y0,x1,y1" | --automatic

Fine-tuning starts from them (`--config.model.init_from=sam_vit_b_01ec64.pth`) and trains
the mask decoder and prompt encoder on COCO instances, one prompt per instance (up to 16
per image): images resized to a longest side of 1024 and padded, as SAM's input. The
image encoder stays frozen unless `model.options.freeze_image_encoder=False`.

Variant `:smoke` trains a tiny SAM (width 32, 128x128 input) from random weights on the
embedded segjax_shapes data, encoder included, for CI.
"""
import ml_collections

from configs import default
from segjax.tasks import promptable


def get_config(variant: str = ""):
  config = default.get_config()
  config.task = "promptable"
  config.model.name = "sam"
  config.model.options = ml_collections.ConfigDict(dict(
      variant="vit_b", freeze_image_encoder=True, freeze_prompt_encoder=False))
  config.model.init_from = ""  # the official checkpoint, e.g. sam_vit_b_01ec64.pth
  config.data.name = "coco_instances"
  config.data.train_split = "train"
  config.data.eval_split = "validation[:500]"
  config.data.train_ops = ("unpack_instances|resize(scale=(1024, 1024))|random_flip(prob=0.5)|"
                           "pad(size=(1024, 1024))|pad_instances(max_instances=16)")
  config.data.eval_ops = ("unpack_instances|resize(scale=(1024, 1024))|pad(size=(1024, 1024))|"
                          "pad_instances(max_instances=16)")
  config.data.batch_size = 8
  config.data.eval_batch_size = 8
  config.loss.sam = promptable.loss_settings()
  config.inference.sam = promptable.inference_settings()
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-5
  config.optimizer.min_learning_rate = 0.0
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 250
  config.optimizer.warmup_factor = 0.0
  config.optimizer.weight_decay = 0.1
  config.optimizer.grad_clip_norm = 1.0
  config.total_steps = 5000
  config.log_every = 50
  config.eval_every = 1000
  config.checkpoint_every = 1000
  if variant == "smoke":
    smoke(config)
  elif variant:
    raise ValueError(f"Unknown variant {variant!r} of sam_vit_b; use '' or 'smoke'.")
  config.lock()
  return config


def smoke(config) -> None:
  """A tiny SAM from random weights on segjax_shapes (128x128 images, up to 8 instances),
  every part trained, a few steps."""
  config.model.options = ml_collections.ConfigDict(dict(
      variant="vit_b", image_size=128, patch_size=16, encoder_embed_dim=32, encoder_depth=2,
      encoder_num_heads=2, encoder_global_attn_indexes=(1,), window_size=4, mlp_ratio=2.0,
      prompt_embed_dim=32, mask_in_chans=4, decoder_depth=2, decoder_num_heads=2,
      decoder_mlp_dim=64, iou_head_hidden_dim=32, freeze_image_encoder=False))
  config.model.init_from = ""
  config.data.name = "segjax_shapes"
  config.data.train_split = "train"
  config.data.eval_split = "validation[:16]"
  config.data.train_ops = "instance_masks|random_flip(prob=0.5)"
  config.data.eval_ops = "instance_masks"
  config.data.batch_size = 8
  config.data.eval_batch_size = 8
  config.inference.sam.points_per_side = 8
  config.inference.sam.points_per_batch = 16
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 2
  config.optimizer.weight_decay = 1e-4
  config.optimizer.grad_clip_norm = 1.0
  config.total_steps = 12
  config.log_every = 1
  config.eval_every = 12
  config.checkpoint_every = 12
