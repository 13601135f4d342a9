"""Defaults shared by every config; each config file extends `get_config()` here.

Components are named (model, dataset, preprocessing ops) and built from
registries; `python train.py --config configs/X.py:VARIANT --config.key=value`.
The data ops run after the input checks and before normalization, both of
which every pipeline adds itself.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # train.py's persistent XLA compilation cache: "" = <workdir>/compilation_cache (a resumed run
  # loads its compiled steps), "off", or a directory shared between runs.
  config.compilation_cache_dir = ""
  # XLA flags train.py adds to $XLA_FLAGS (which wins for any flag it sets). The default runs
  # convolutions on XLA's Eigen kernels instead of YNNPACK on the CPU: with conv_lowering
  # "auto", PSPNet-R50 and DeepLabV3+-R50 train steps measured 1.7x and 1.24x faster that way
  # (benchmarks/RESULTS.md).
  config.xla_flags = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"

  # semantic | instance | panoptic (segjax/tasks); "" = the model's own task.
  config.task = ""

  config.model = ml_collections.ConfigDict()
  config.model.name = "unet"
  config.model.options = ml_collections.ConfigDict()  # constructor arguments of the model
  config.model.dtype = "float32"  # compute dtype: float32 | bfloat16
  config.model.param_dtype = "float32"  # bf16 mixed precision: dtype bfloat16, params float32
  # BatchNorm training statistics: "sync" over the global batch (all devices and
  # processes), or "per_device" (each device's shard of the batch on its own).
  config.model.batch_norm = "sync"
  # Rematerialize ResNet backbone blocks in training with this jax checkpoint policy:
  # "" (off), nothing_saveable, dots_saveable, dots_with_no_batch_dims_saveable.
  config.model.remat = ""
  # Convolutions in training: "auto" rewrites what XLA's CPU backend runs slowly (1x1 filter
  # gradients as matmuls, depthwise convs as shifted multiply-adds) on the CPU only;
  # "patches" on every backend; "xla" never (segjax/layers/conv_lowering.py).
  config.model.conv_lowering = "auto"
  # Weights to start from ("" = random): a short name downloaded and converted once into
  # $SEGJAX_CACHE (~/.cache/segjax): resnet50_v1c, resnet101_v1c (mmseg), resnet18/34/50/101,
  # vgg16, vgg16_bn, mobilenet_v2 (torchvision ImageNet); an http(s)/file URL; a PyTorch
  # checkpoint (append #arch=NAME if its file name does not say); or a converted .npz
  # (segjax/convert/pretrained.py). Encoder weights go into the encoder, a whole converted
  # model's modules into the model.
  config.model.init_from = ""

  config.data = ml_collections.ConfigDict()
  config.data.name = "segjax_shapes"
  config.data.data_dir = ""  # tfds data dir; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
  config.data.manual_dir = ""  # archives you downloaded; "" = <data_dir>/downloads/manual
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.train_ops = ""
  config.data.eval_ops = ""
  config.data.mean = (123.675, 116.28, 103.53)  # RGB, 0..255
  config.data.std = (58.395, 57.12, 57.375)
  config.data.batch_size = 16  # global, over all devices and processes
  config.data.eval_batch_size = 16
  config.data.num_threads = 2  # grain reader threads per process (or per worker)
  # grain worker processes decoding and augmenting in parallel; 0 = threads only.
  # A checkpoint resumes its data position only with the same value.
  config.data.num_workers = 0

  config.loss = ml_collections.ConfigDict()
  # Weighted terms by name (segjax/losses/registry.py), e.g.
  # ({"name": "cross_entropy", "weight": 1.0, "label_smoothing": 0.1},
  #  {"name": "dice", "weight": 0.5}); an auxiliary head gets the same terms.
  config.loss.terms = ({"name": "cross_entropy", "weight": 1.0},)
  # Per-class weights of the cross-entropy (mmseg's class_weight); () = all 1.
  config.loss.class_weights = ()
  config.loss.aux_weight = 0.4  # weight of an auxiliary head's loss (PSPNet, DeepLabV3)
  # Detectors (mask_rcnn): weight of each of the model's losses in the total.
  config.loss.detection = ml_collections.ConfigDict(
      {"rpn_objectness": 1.0, "rpn_box": 1.0, "classifier": 1.0, "box": 1.0, "mask": 1.0,
       "semantic": 0.5})  # semantic: Panoptic FPN's lambda_s

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "sgd"  # sgd | adamw | lars | lamb
  config.optimizer.learning_rate = 0.01
  # Large batches: scale learning_rate (and its warmup) by data.batch_size /
  # reference_batch_size ("linear", Goyal et al.) or its square root ("sqrt").
  config.optimizer.lr_scaling = "none"  # none | linear | sqrt
  config.optimizer.reference_batch_size = 0
  # Gradient over this many micro-batches of data.batch_size each step (the same
  # update as the whole batch at once, with one micro-batch's activations in memory).
  config.optimizer.accumulation_steps = 1
  config.optimizer.trust_coefficient = 0.001  # lars
  config.optimizer.min_learning_rate = 1e-4
  config.optimizer.schedule = "poly"  # poly | cosine | constant | steps (after warmup)
  config.optimizer.poly_power = 0.9
  config.optimizer.warmup_steps = 0
  config.optimizer.warmup_factor = 0.0  # warmup starts at this fraction of the lr
  config.optimizer.decay_steps = ()  # schedule "steps": multiply by decay_factor at these
  config.optimizer.decay_factor = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.weight_decay = 5e-4
  config.optimizer.grad_clip_norm = 0.0  # 0 = off
  # A step with a non-finite loss or gradient norm: "stop" the run (nothing of it is
  # saved) or "skip" its update (parameters and optimizer state stay as they were).
  config.optimizer.nonfinite = "stop"

  config.total_steps = 1000
  config.log_every = 10
  config.eval_every = 500
  config.checkpoint_every = 250
  config.keep_checkpoints = 2
  # Write a JAX profiler trace (TensorBoard's profile tab) of this many train steps,
  # starting after the first two (compilation), to <workdir>/profile; 0 = off.
  config.profile_steps = 0

  # Evaluation (training's and eval.py's) and predict.py. mode "batched": the
  # data.eval_ops pipeline in static batches; "whole" / "slide": one image at a
  # time, any size, predicted at its original resolution
  # (segjax/inference/semantic.py); predict.py uses "whole" in place of "batched".
  config.inference = ml_collections.ConfigDict()
  config.inference.mode = "batched"  # batched | whole | slide
  config.inference.scale = (0, 0)  # keep-ratio test resize (w, h), mmseg's order; 0 = none
  config.inference.window = (512, 512)  # slide: window (h, w)
  config.inference.stride = (341, 341)  # slide: stride (h, w)
  config.inference.window_batch = 4  # slide: windows per compiled batch
  config.inference.scales = (1.0,)  # test-time augmentation: ratios of `scale`
  config.inference.flip = False  # test-time augmentation: add horizontal flips
  config.inference.label_ops = ""  # whole/slide: ops on the label only, e.g. reduce_zero_label
  # whole/slide: run the model on exactly the resized image / windows clipped to it, as
  # mmseg does (no padding; one compilation per distinct shape), so predictions are mmseg's.
  config.inference.exact_shapes = False
  # whole mode, evaluation only: batches of data.eval_batch_size images of one size bucket
  # instead of one image at a time (segjax/inference/buckets.py). size_divisor > 0: each
  # test-resized image is padded bottom/right to a multiple of it (1: not padded, one
  # compiled shape per distinct resized size; with exact_shapes, mmseg's predictions);
  # buckets: (h, w) shapes, each image padded to the smallest that holds it (at most
  # len(buckets) bucket shapes). 0 and () = one image at a time, as are test-time
  # augmentation and the CRF.
  config.inference.size_divisor = 0
  config.inference.buckets = ()
  # Dense CRF refinement of whole/slide predictions (segjax/classical/crf.py; DeepLab's
  # post-processing), also `--crf` of eval.py and predict.py. window > 0: the local
  # approximation with that radius over stride x stride cells; 0: exact (small images).
  config.inference.crf = ml_collections.ConfigDict(
      {"enabled": False, "num_iterations": 5, "gaussian_sxy": 3.0, "gaussian_weight": 3.0,
       "bilateral_sxy": 80.0, "bilateral_srgb": 13.0, "bilateral_weight": 10.0,
       "window": 10, "stride": 8})
  # Panoptic FPN fusion (detectron2's defaults; model.options.fusion picks the method).
  config.inference.panoptic = ml_collections.ConfigDict(
      {"overlap_threshold": 0.5, "stuff_area_threshold": 4096, "instance_score_threshold": 0.5,
       "unknown": False})

  config.mesh = ml_collections.ConfigDict()
  config.mesh.axes = (("data", -1),)  # (name, size); -1 = all remaining devices
  config.mesh.batch_axes = ("data",)
  # data_parallel: parameters and optimizer state replicated on every device;
  # fsdp: sharded along the "data" axis (segjax/training/sharding.py).
  config.mesh.strategy = "data_parallel"
  # (regex over parameter paths, PartitionSpec entries or "fsdp"), before the
  # strategy's rule; unmatched = replicated.
  config.mesh.param_rules = ()
  return config
