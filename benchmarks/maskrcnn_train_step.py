"""Train-step throughput of Mask R-CNN R50-FPN: segjax's static-shape `MaskRCNN` (one jitted
`detection_train_step`) against torchvision's Mask R-CNN, in one run, on the CPU.

  python benchmarks/maskrcnn_train_step.py --size 512 --batch 2 --repeats 3
  python benchmarks/maskrcnn_train_step.py --size 128 --batch 1 --repeats 1 --backbone resnet18

Both sides train the same model: torchvision's defaults with a frozen-BatchNorm ResNet whose
stem and first stage are frozen (trainable_layers 3), on the same synthetic batch (`--batch`
images of `--size`^2 with `--instances` random instances each: boxes, classes and image-sized
elliptic masks), one SGD-momentum step per iteration. segjax pads the instances to
`--max-instances` rows and donates the train state; its compile time is reported apart from the
steady-state step time (median of `--repeats` timed steps after `--warmup` untimed ones, each
ended with block_until_ready). The torchvision step is timed whole: its input transform,
forward with losses, backward, optimizer step. With static shapes segjax's mask head always runs
on int(512 * 0.25) = 128 RoI slots per image, torchvision's only on the sampled foreground RoIs.

torchvision's reference is built as `maskrcnn_resnet50_fpn` builds it with a pretrained
backbone (`resnet_fpn_backbone` with FrozenBatchNorm2d, trainable_layers 3, then
`MaskRCNN(backbone, num_classes=K + 1)`), with random weights:
`maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)` would instead train ordinary
BatchNorm and all five stages, which is not the model segjax runs. Its transform gets
min_size = max_size = --size, so it keeps the images at --size (checked before timing).

CAVEAT: torchvision's compiled operators (torchvision::nms, torchvision::roi_align) do not load
next to the CPU-only torch of this environment, so the reference runs with
`tests.torch_reference.plain_torch_detection_ops()`: the pure-Python RoIAlign of
`torchvision.ops.roi_align._roi_align` and a plain greedy NMS (numpy). It is therefore slower
than real torchvision on the CPU; its figures are a lower bound on torchvision's speed.

`--xla_onednn` sets XLA_FLAGS=--xla_cpu_use_onednn=true before jax is imported. `--dtype
bfloat16` makes segjax compute in bfloat16; the torchvision reference stays float32.
"""
import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
REFERENCE_CAVEAT = ("torchvision runs its pure-Python RoIAlign and a plain greedy NMS because its "
                    "compiled kernels do not load here: it is slower than real torchvision on "
                    "this CPU")


def synthetic_batch(batch, size, instances, num_classes, seed=0):
  """Images in [0, 1] [B, S, S, 3] and `instances` random objects per image: boxes [B, n, 4]
  (x1, y1, x2, y2), 0-based classes [B, n] and image-sized uint8 masks [B, n, S, S] (the
  ellipse inscribed in each box)."""
  rng = np.random.default_rng(seed)
  images = rng.random((batch, size, size, 3), dtype=np.float32)
  sides = rng.uniform(size / 8, size / 2, (batch, instances, 2))
  corners = rng.uniform(0, 1, (batch, instances, 2)) * (size - sides)
  boxes = np.round(np.concatenate([corners, corners + sides], -1)).astype(np.float32)
  classes = rng.integers(0, num_classes, (batch, instances)).astype(np.int32)
  ys, xs = np.mgrid[:size, :size] + 0.5
  centre, radius = (boxes[..., :2] + boxes[..., 2:]) / 2, (boxes[..., 2:] - boxes[..., :2]) / 2
  masks = (((xs - centre[..., 0, None, None]) / radius[..., 0, None, None]) ** 2
           + ((ys - centre[..., 1, None, None]) / radius[..., 1, None, None]) ** 2 <= 1)
  return images, boxes, classes, masks.astype(np.uint8)


def cpu_name():
  """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` knows."""
  try:
    with open("/proc/cpuinfo") as cpuinfo:
      names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
  except OSError:
    names = []
  return names[0] if names else platform.processor() or platform.machine()


def time_steps(step, repeats, warmup):
  """Seconds of each of `repeats` calls of `step` after `warmup` untimed ones."""
  for _ in range(warmup):
    step()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def bench_segjax(args, data):
  """(compile seconds, seconds of each timed step, last step's losses) of segjax's jitted
  train step."""
  import functools

  import jax
  import jax.numpy as jnp
  import optax

  from segjax.models.mask_rcnn import MaskRCNN
  from segjax.training import steps
  from segjax.training.train_state import TrainState

  images, boxes, classes, masks = data
  batch, count = boxes.shape[:2]
  rows = args.max_instances
  pad = lambda x: np.concatenate([x, np.zeros((batch, rows - count) + x.shape[2:], x.dtype)], 1)
  arrays = {"image": (images - IMAGENET_MEAN) / IMAGENET_STD, "boxes": pad(boxes),
            "classes": pad(classes), "masks": pad(masks),
            "instance_valid": np.broadcast_to(np.arange(rows) < count, (batch, rows))}
  arrays = jax.device_put(arrays)

  model = MaskRCNN(num_classes=args.classes, backbone=args.backbone, frozen_bn=True,
                   trainable_layers=3, dtype=jnp.dtype(args.dtype))
  # Parameter shapes do not depend on the image size: initialize on a small image.
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
  frozen = model.frozen_params_mask(variables["params"])
  labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
  tx = optax.multi_transform({"train": optax.sgd(args.lr, momentum=0.9),
                              "frozen": optax.set_to_zero()}, labels)
  state = TrainState.create(variables["params"], variables["batch_stats"], tx)
  step_fn = jax.jit(functools.partial(steps.detection_train_step, model=model, tx=tx,
                                      schedule=optax.constant_schedule(args.lr)),
                    donate_argnums=(0,))
  key = jax.random.key(1)
  start = time.perf_counter()
  compiled = step_fn.lower(state, arrays, key).compile()
  compile_s = time.perf_counter() - start

  holder = {"state": state}
  def step():
    holder["state"], metrics = compiled(holder["state"], arrays, key)
    holder["metrics"] = jax.block_until_ready(metrics)
  times = time_steps(step, args.repeats, args.warmup)
  losses = {k[len("loss_"):]: float(v) for k, v in holder["metrics"].items()
            if k.startswith("loss_")}
  return compile_s, times, losses


def bench_torch(args, data):
  """(seconds of each timed step, last step's losses, torchvision's version) of torchvision's
  Mask R-CNN train step."""
  import torch

  sys.path.insert(0, REPO)
  from tests.torch_reference import plain_torch_detection_ops

  images, boxes, classes, masks = data
  torch.manual_seed(0)
  with plain_torch_detection_ops() as torchvision:
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    backbone = resnet_fpn_backbone(backbone_name=args.backbone, weights=None, trainable_layers=3)
    model = MaskRCNN(backbone, num_classes=args.classes + 1, min_size=args.size,
                     max_size=args.size).train()
    inputs = [torch.from_numpy(image).permute(2, 0, 1).contiguous() for image in images]
    targets = [{"boxes": torch.from_numpy(b), "labels": torch.from_numpy(c).long() + 1,
                "masks": torch.from_numpy(m)} for b, c, m in zip(boxes, classes, masks)]
    resized, resized_targets = model.transform(inputs, [dict(t) for t in targets])
    kept = (tuple(resized.tensors.shape[-2:]) == (args.size, args.size)
            and all(tuple(s) == (args.size, args.size) for s in resized.image_sizes)
            and all(torch.equal(r["boxes"], t["boxes"])
                    for r, t in zip(resized_targets, targets)))
    if not kept:
      raise RuntimeError(f"torchvision's transform changed the {args.size}x{args.size} inputs "
                         f"(to {tuple(resized.tensors.shape[-2:])}); the comparison needs both "
                         "sides at --size.")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                momentum=0.9)
    holder = {}
    def step():
      optimizer.zero_grad(set_to_none=True)
      losses = model(inputs, targets)
      sum(losses.values()).backward()
      optimizer.step()
      holder["losses"] = losses
    times = time_steps(step, args.repeats, args.warmup)
    version = torchvision.__version__
  losses = {k[len("loss_"):]: float(v.detach()) for k, v in holder["losses"].items()}
  return times, losses, version


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=512, help="square image side, multiple of 32")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=3, help="timed steps per implementation")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
  parser.add_argument("--backbone", default="resnet50", choices=["resnet18", "resnet50"])
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="segjax's compute dtype (torchvision stays float32)")
  parser.add_argument("--classes", type=int, default=90, help="foreground classes K")
  parser.add_argument("--instances", type=int, default=4, help="objects per image")
  parser.add_argument("--max-instances", type=int, default=8,
                      help="segjax's padded ground-truth rows per image")
  parser.add_argument("--lr", type=float, default=0.02)
  parser.add_argument("--xla_onednn", action="store_true",
                      help="set XLA_FLAGS=--xla_cpu_use_onednn=true before importing jax")
  args = parser.parse_args()
  if args.size < 64 or args.size % 32:
    parser.error(f"--size must be a multiple of 32 and at least 64 (got {args.size}), so that "
                 "torchvision pads nothing and both sides see the same image.")
  if not 1 <= args.instances <= args.max_instances:
    parser.error(f"need 1 <= --instances <= --max-instances, got {args.instances} and "
                 f"{args.max_instances}.")
  if min(args.batch, args.repeats, args.classes) < 1 or args.warmup < 0:
    parser.error("--batch, --repeats and --classes must be positive, --warmup non-negative.")
  if args.xla_onednn:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_use_onednn=true").strip()

  data = synthetic_batch(args.batch, args.size, args.instances, args.classes)
  compile_s, jax_times, jax_losses = bench_segjax(args, data)
  torch_times, torch_losses, tv_version = bench_torch(args, data)

  import jax
  import torch
  print(f"Mask R-CNN {args.backbone}-FPN train step, batch {args.batch} x {args.size}x"
        f"{args.size}, {args.classes} classes, {args.instances} instances per image, "
        f"SGD momentum; {args.repeats} timed steps after {args.warmup} warm-up")
  print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, {platform.platform()}")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} (segjax dtype {args.dtype}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}); torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), torchvision {tv_version} float32")
  print(f"NOTE: {REFERENCE_CAVEAT}.")
  print()
  print("| implementation | s/step (median) | s/step (mean) | images/s | "
        "torch time / this | compile (s) |")
  print("|---|---|---|---|---|---|")
  torch_median = statistics.median(torch_times)
  rows = [(f"segjax jit ({args.dtype})", jax_times, f"{compile_s:.1f}"),
          ("torchvision (pure-Python RoIAlign, greedy NMS)", torch_times, "-")]
  for name, times, compile_cell in rows:
    median = statistics.median(times)
    print(f"| {name} | {median:.3f} | {statistics.mean(times):.3f} | {args.batch / median:.3f} | "
          f"{torch_median / median:.2f} | {compile_cell} |")
  print()
  for name, losses in (("segjax", jax_losses), ("torchvision", torch_losses)):
    print(f"{name} losses (last step): "
          + ", ".join(f"{k} {v:.4f}" for k, v in sorted(losses.items())))


if __name__ == "__main__":
  main()
