"""Train-step throughput and memory of Mask R-CNN R50-FPN: segjax's static-shape `MaskRCNN`
(one jitted `detection_train_step`) against torchvision's Mask R-CNN, in one run, on the CPU.

  python benchmarks/maskrcnn_train_step.py --size 512 --batch 2 --repeats 3
  python benchmarks/maskrcnn_train_step.py --size 128 --batch 1 --repeats 1 --backbone resnet18

Both sides train the same model: torchvision's defaults with a frozen-BatchNorm ResNet whose
stem and first stage are frozen (trainable_layers 3), on the same synthetic batch (`--batch`
images of `--size`^2 with `--instances` random instances each: boxes, classes and image-sized
elliptic masks), one SGD-momentum step per iteration on the trainable parameters' gradients
clipped to global norm `--clip-norm`. The clipping keeps the run finite: with random weights
and identity FrozenBatchNorm the FPN features are ~60 in size and the first gradient's norm
~2400 at 512x512 (R50), and unclipped steps at lr 0.02 reach NaN losses by the third step, on
both sides; a NaN step times nothing meaningful (torchvision then drops its NaN proposals and
runs faster), so a non-finite loss fails the run. segjax pads the instances to
`--max-instances` rows and donates the train state; its compile time is reported apart from the
steady-state step time (median of `--repeats` timed steps after `--warmup` untimed ones, each
ended with block_until_ready). The torchvision step is timed whole: its input transform,
forward with losses, backward, optimizer step. With static shapes segjax's mask branch has a
fixed number of RoI slots per image, `--mask-slots` (`MaskRCNN(mask_slots=...)`; by default
MaskRCNN's 32, at most int(512 * 0.25) = 128, every foreground RoI the sampler can draw; with
fewer slots than foreground RoIs, a weighted random subset of them), foreground first, and
runs them in one pass, or with `--mask-chunk k` (`MaskRCNN(mask_chunk=k)`; default 0: one pass)
in chunks of k per image, skipping at run time the chunks with no foreground RoI in the batch;
torchvision's mask head runs on its sampled foreground RoIs.

Each side runs in its own child process (this script with the internal `--only segjax|torch`),
so the peak RSS reported for it (`ru_maxrss`: runtime, compiler, model, activations) is its
own; segjax's row adds XLA's own estimate for the compiled step (`memory_analysis()`:
temporaries + arguments + outputs). GB are 2^30 bytes. `run(argv)` does what the command line
does and returns the table (benchmarks/report.py's record) without printing it.

torchvision's reference is built as `maskrcnn_resnet50_fpn` builds it with a pretrained
backbone (`resnet_fpn_backbone` with FrozenBatchNorm2d, trainable_layers 3, then
`MaskRCNN(backbone, num_classes=K + 1)`), with random weights:
`maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)` would instead train ordinary
BatchNorm and all five stages, which is not the model segjax runs. Its transform gets
min_size = max_size = --size, so it keeps the images at --size (checked before timing).

CAVEAT: torchvision's compiled operators (torchvision::nms, torchvision::roi_align) do not load
next to the CPU-only torch of this environment, so the reference runs with
`tests.torch_reference.plain_torch_detection_ops()`: its RoIAlign (the box and mask heads'
MultiScaleRoIAlign and the mask targets of `project_masks_on_boxes`) is `lean_roi_align` there,
plain torch computing what torchvision's C++ kernel does (checked against torchvision's
pure-Python `_roi_align` in tests/ops/test_torch_roi_align.py), and its NMS a greedy one (numpy).
It is therefore slower than real torchvision on the CPU; its figures are a lower bound on
torchvision's speed.

`--xla_onednn` sets XLA_FLAGS=--xla_cpu_use_onednn=true in segjax's process before jax is
imported. `--dtype bfloat16` makes segjax compute in bfloat16; the torchvision reference stays
float32. `--json PATH` also writes the table as benchmarks/report.py's JSON.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
REFERENCE_CAVEAT = ("torchvision's compiled kernels do not load here, so it runs with plain-torch "
                    "RoIAlign (lean_roi_align of tests/torch_reference.py, equal to torchvision's "
                    "RoIAlign, tested) and a greedy NMS (numpy): it is slower than real "
                    "torchvision on this CPU")
COLUMNS = ["implementation", "s/step (median)", "s/step (mean)", "images/s",
           "torch time / this", "compile (s)", "peak RSS (GB)", "losses (last step)"]


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


def finite_losses(side, losses):
  """`losses` ({name: value}), checked to be finite: a diverged step is no benchmark."""
  if not all(np.isfinite(v) for v in losses.values()):
    raise RuntimeError(f"{side}'s training diverged (last step's losses {losses}); lower --lr "
                       "or --clip-norm.")
  return losses


def segjax_setup(args, data, **options):
  """segjax's side as this benchmark builds it: (the jitted train step, state donated; the first
  train state; the host batch of `data`, normalized and padded to --max-instances rows; the
  step's key). `options`: more MaskRCNN arguments (e.g. rpn_post_nms_top_n_train)."""
  import functools

  import jax
  import jax.numpy as jnp
  import optax

  from segjax.models.mask_rcnn import MaskRCNN
  from segjax.tasks import instance
  from segjax.training import steps
  from segjax.training.train_state import TrainState

  images, boxes, classes, masks = data
  batch, count = boxes.shape[:2]
  rows = args.max_instances
  pad = lambda x: np.concatenate([x, np.zeros((batch, rows - count) + x.shape[2:], x.dtype)], 1)
  arrays = {"image": (images - IMAGENET_MEAN) / IMAGENET_STD, "boxes": pad(boxes),
            "classes": pad(classes), "masks": pad(masks),
            "instance_valid": np.broadcast_to(np.arange(rows) < count, (batch, rows))}

  chunk = {} if args.mask_chunk is None else {"mask_chunk": args.mask_chunk}
  if args.mask_slots is not None:
    chunk["mask_slots"] = args.mask_slots
  model = MaskRCNN(num_classes=args.classes, backbone=args.backbone, frozen_bn=True,
                   trainable_layers=3, dtype=jnp.dtype(args.dtype),
                   **{**chunk, **options})
  # Parameter shapes do not depend on the image size: initialize on a small image.
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
  frozen = model.frozen_params_mask(variables["params"])
  labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
  sgd = optax.sgd(args.lr, momentum=0.9)
  if args.clip_norm:
    sgd = optax.chain(optax.clip_by_global_norm(args.clip_norm), sgd)
  tx = optax.multi_transform({"train": sgd,
                              "frozen": optax.set_to_zero()}, labels)
  state = TrainState.create(variables["params"], variables["batch_stats"], tx)
  step_fn = jax.jit(functools.partial(steps.train_step,
                                      objective=instance.objective(model=model, loss_weights={}),
                                      tx=tx, schedule=optax.constant_schedule(args.lr)),
                    donate_argnums=(0,))
  return step_fn, state, arrays, jax.random.key(1)


def segjax_losses(metrics):
  """{loss name: value} of segjax's step metrics, checked finite."""
  return finite_losses("segjax", {k[len("loss_"):]: float(v) for k, v in metrics.items()
                                  if k.startswith("loss_")})


def bench_segjax(args, data):
  """segjax's jitted train step, measured in this process: a dict of compile_s, times (s),
  losses (last step), XLA's buffer bytes of the compiled step, peak_rss_gb and versions."""
  report.use_train_defaults()
  import jax

  step_fn, state, arrays, key = segjax_setup(args, data)
  arrays = jax.device_put(arrays)
  start = time.perf_counter()
  compiled = step_fn.lower(state, arrays, key).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()

  holder = {"state": state}
  def step():
    holder["state"], metrics = compiled(holder["state"], arrays, key)
    holder["metrics"] = jax.block_until_ready(metrics)
  times = report.time_steps(step, args.repeats, args.warmup)
  losses = segjax_losses(holder["metrics"])
  return {"compile_s": compile_s, "times": times, "losses": losses,
          "xla_bytes": {"temp": memory.temp_size_in_bytes,
                        "arguments": memory.argument_size_in_bytes,
                        "outputs": memory.output_size_in_bytes,
                        "aliased": memory.alias_size_in_bytes},
          "peak_rss_gb": report.peak_rss_gb(),
          "versions": (f"jax {jax.__version__} on {jax.devices()[0].platform} (segjax dtype "
                       f"{args.dtype}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")}


def torchvision_step(args, data, torchvision, *, device="cpu", wrap=None, autocast=None,
                     **options):
  """torchvision's Mask R-CNN train step on `data` as this benchmark builds it, on `device`:
  (step(), which runs one step and returns its {loss name: tensor}; the model). `torchvision`:
  the module, with working detection operators (see bench_torch); `wrap(model)` (e.g.
  torch.compile) is what the step calls; `autocast`: a context for the forward pass;
  `options`: more MaskRCNN arguments."""
  import contextlib

  import torch
  from torchvision.models.detection import MaskRCNN
  from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

  images, boxes, classes, masks = data
  backbone = resnet_fpn_backbone(backbone_name=args.backbone, weights=None, trainable_layers=3)
  model = MaskRCNN(backbone, num_classes=args.classes + 1, min_size=args.size,
                   max_size=args.size, **options).train().to(device)
  inputs = [torch.from_numpy(image).permute(2, 0, 1).contiguous().to(device) for image in images]
  targets = [{"boxes": torch.from_numpy(b).to(device),
              "labels": torch.from_numpy(c).long().to(device) + 1,
              "masks": torch.from_numpy(m).to(device)} for b, c, m in zip(boxes, classes, masks)]
  resized, resized_targets = model.transform(inputs, [dict(t) for t in targets])
  kept = (tuple(resized.tensors.shape[-2:]) == (args.size, args.size)
          and all(tuple(s) == (args.size, args.size) for s in resized.image_sizes)
          and all(torch.equal(r["boxes"], t["boxes"])
                  for r, t in zip(resized_targets, targets)))
  if not kept:
    raise RuntimeError(f"torchvision's transform changed the {args.size}x{args.size} inputs "
                       f"(to {tuple(resized.tensors.shape[-2:])}); the comparison needs both "
                       "sides at --size.")
  trainable = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.SGD(trainable, lr=args.lr, momentum=0.9)
  forward = wrap(model) if wrap else model
  autocast = autocast or contextlib.nullcontext

  def step():
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      losses = forward(inputs, targets)
    sum(losses.values()).backward()
    if args.clip_norm:
      torch.nn.utils.clip_grad_norm_(trainable, args.clip_norm)
    optimizer.step()
    return losses
  return step, model


def torch_losses(losses):
  """{loss name: value} of torchvision's losses, checked finite."""
  return finite_losses("torchvision", {k[len("loss_"):]: float(v.detach())
                                       for k, v in losses.items()})


def bench_torch(args, data):
  """torchvision's Mask R-CNN train step, measured in this process: a dict of times (s), losses
  (last step), peak_rss_gb and versions."""
  import torch

  sys.path.insert(0, REPO)
  from tests.torch_reference import plain_torch_detection_ops

  torch.manual_seed(0)
  with plain_torch_detection_ops() as torchvision:
    train_step, _ = torchvision_step(args, data, torchvision)
    holder = {}
    def step():
      holder["losses"] = train_step()
    times = report.time_steps(step, args.repeats, args.warmup)
    version = torchvision.__version__
  losses = torch_losses(holder["losses"])
  return {"times": times, "losses": losses, "peak_rss_gb": report.peak_rss_gb(),
          "versions": (f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
                       f"torchvision {version} float32")}


DEFAULT_MASK_SLOTS = 32  # MaskRCNN.mask_slots (this parent process does not import segjax)


def parse_args(argv):
  """The checked command-line arguments `argv` (without the program name)."""
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
  parser.add_argument("--mask-slots", type=int, default=None,
                      help="RoI slots per image segjax's mask head trains on (default: "
                           "MaskRCNN's, 32; at most 128, all the foreground RoIs the sampler "
                           "can draw)")
  parser.add_argument("--mask-chunk", type=int, default=None,
                      help="slots per image of each run-time-skippable chunk of segjax's mask "
                           "branch (default: MaskRCNN's, 0: one pass over all slots)")
  parser.add_argument("--lr", type=float, default=0.02)
  parser.add_argument("--clip-norm", type=float, default=1.0,
                      help="clip the trainable gradients to this global norm (0: no clipping)")
  parser.add_argument("--xla_onednn", action="store_true",
                      help="set XLA_FLAGS=--xla_cpu_use_onednn=true before importing jax")
  report.add_json_argument(parser)
  # Internal: measure one side in this process and write its result dict to --result.
  parser.add_argument("--only", choices=["segjax", "torch"], help=argparse.SUPPRESS)
  parser.add_argument("--result", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.size < 64 or args.size % 32:
    parser.error(f"--size must be a multiple of 32 and at least 64 (got {args.size}), so that "
                 "torchvision pads nothing and both sides see the same image.")
  if not 1 <= args.instances <= args.max_instances:
    parser.error(f"need 1 <= --instances <= --max-instances, got {args.instances} and "
                 f"{args.max_instances}.")
  if min(args.batch, args.repeats, args.classes) < 1 or args.warmup < 0:
    parser.error("--batch, --repeats and --classes must be positive, --warmup non-negative.")
  if args.clip_norm < 0:
    parser.error(f"--clip-norm must be >= 0 (0: no clipping), got {args.clip_norm}.")
  if args.mask_slots is not None and args.mask_slots < 1:
    parser.error(f"--mask-slots must be a positive number of RoIs, got {args.mask_slots}.")
  if args.mask_chunk is not None and args.mask_chunk < 0:
    parser.error(f"--mask-chunk must be >= 0 (0: no chunks), got {args.mask_chunk}.")
  if bool(args.only) != bool(args.result):
    parser.error("--only and --result go together (they are internal: run without them).")
  return args


def measure(args):
  """Runs the side `args.only` in this process and writes its result dict to `args.result`."""
  if args.only == "segjax" and args.xla_onednn:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_use_onednn=true").strip()
  data = synthetic_batch(args.batch, args.size, args.instances, args.classes)
  result = (bench_segjax if args.only == "segjax" else bench_torch)(args, data)
  with open(args.result, "w") as f:
    json.dump(result, f)


def run_child(side, argv):
  """The result dict of side `side` measured in a fresh process with arguments `argv`."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "result.json")
    command = [sys.executable, os.path.abspath(__file__), *argv, "--only", side, "--result", out]
    done = subprocess.run(command, cwd=REPO)
    if done.returncode:
      why = (f"killed by signal {-done.returncode} (out of memory?)" if done.returncode < 0
             else f"exit {done.returncode}")
      raise RuntimeError(f"the {side} side of the benchmark failed ({why}): "
                         f"{' '.join(command[1:])}")
    with open(out) as f:
      return json.load(f)


def _gb(num_bytes):
  return num_bytes / 2**30


def run(argv):
  """Measures both sides, each in its own child process, and returns the table.

  Args:
    argv: the command-line arguments (as `sys.argv[1:]`; `--json` is ignored here).

  Returns:
    benchmarks/report.py's record: {"benchmark", "setup" (the header lines, newline-joined),
    "columns" (`COLUMNS`), "rows" (segjax's, then torchvision's: implementation, s/step median
    and mean, images/s, torchvision's median / this median, compile s, peak RSS GB, last
    step's losses; formatted cells), "notes" (XLA's buffer estimate and the reference caveat)}.

  Raises:
    RuntimeError: when a side fails: killed for memory, or its losses are not finite.
  """
  args = parse_args(argv)
  if args.only:
    raise ValueError("run() measures both sides; --only and --result are internal.")
  ours, theirs = run_child("segjax", argv), run_child("torch", argv)
  slots = min(128, args.mask_slots or DEFAULT_MASK_SLOTS)
  chunk = ("in one pass" if not args.mask_chunk else
           f"in chunks of {min(slots, args.mask_chunk)} skipped without foreground")
  setup = [f"Mask R-CNN {args.backbone}-FPN train step, batch {args.batch} x {args.size}x"
           f"{args.size}, {args.classes} classes, {args.instances} instances per image, "
           f"SGD momentum (lr {args.lr}, gradients clipped to global norm "
           f"{args.clip_norm or 'inf'}); segjax's mask branch on {slots} RoI slots per image "
           f"(--mask-slots {args.mask_slots}) {chunk} "
           f"(--mask-chunk {args.mask_chunk}); {args.repeats} timed steps after "
           f"{args.warmup} "
           "warm-up; each side in its own process",
           f"machine: {cpu_name()}, {os.cpu_count()} CPUs, {platform.platform()}",
           f"{ours['versions']}; {theirs['versions']}"]
  torch_median = statistics.median(theirs["times"])
  rows = []
  for name, result, compile_cell in (
      (f"segjax jit ({args.dtype})", ours, f"{ours['compile_s']:.1f}"),
      ("torchvision (plain-torch RoIAlign, greedy NMS)", theirs, "-")):
    median = statistics.median(result["times"])
    losses = ", ".join(f"{k} {v:.4f}" for k, v in sorted(result["losses"].items()))
    rows.append([name, f"{median:.3f}", f"{statistics.mean(result['times']):.3f}",
                 f"{args.batch / median:.3f}", f"{torch_median / median:.2f}", compile_cell,
                 f"{result['peak_rss_gb']:.2f}", losses])
  xla = ours["xla_bytes"]
  notes = [f"segjax's compiled step (XLA memory_analysis): temporaries {_gb(xla['temp']):.2f} GB "
           f"+ arguments {_gb(xla['arguments']):.2f} GB + outputs {_gb(xla['outputs']):.2f} GB "
           f"= {_gb(xla['temp'] + xla['arguments'] + xla['outputs']):.2f} GB, of which "
           f"{_gb(xla['aliased']):.2f} GB of outputs reuse the donated train state",
           f"NOTE: {REFERENCE_CAVEAT}."]
  return {"benchmark": f"Mask R-CNN {args.backbone}-FPN train step: segjax against torchvision",
          "setup": "\n".join(setup), "columns": COLUMNS, "rows": rows, "notes": notes}


def main():
  args = parse_args(sys.argv[1:])
  if args.only:
    measure(args)
    return
  record = run(sys.argv[1:])
  print(record["setup"])
  print()
  print(report.markdown(record["columns"], record["rows"]))
  print()
  print("\n".join(record["notes"]))
  if args.json:
    report.write_json(args.json, **record)


if __name__ == "__main__":
  main()
