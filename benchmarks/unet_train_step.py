"""Train-step throughput: segjax's U-Net (jitted JAX) against the same U-Net in
PyTorch, in one run, on whatever device each framework finds (CPU here).

  python benchmarks/unet_train_step.py --width 8 --depth 4 --size 128 --batch 16

Both run forward + backward + an SGD-momentum update on a fixed random batch;
the first steps (compilation, allocator warm-up) are not timed. Prints images/s
for JAX, PyTorch (NCHW) and PyTorch channels_last, and JAX's step time divided
by each (above 1: JAX is slower). `--json PATH` also writes the table as
benchmarks/report.py's JSON.
"""
import argparse
import functools
import time

import jax
import numpy as np
import optax
import torch
from torch import nn

import report
from segjax.models import build_model
from segjax.tasks import semantic
from segjax.training import steps
from segjax.training.train_state import TrainState


class TorchUNet(nn.Module):
  """The U-Net of segjax.models.unet, layer for layer, in PyTorch."""

  def __init__(self, num_classes, width, depth):
    super().__init__()
    def double(cin, cout):
      return nn.Sequential(*[m for i in range(2) for m in (
          nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False),
          nn.BatchNorm2d(cout), nn.ReLU(inplace=True))])
    widths = [width * 2 ** level for level in range(depth + 1)]
    self.down = nn.ModuleList(double(3 if l == 0 else widths[l - 1], widths[l])
                              for l in range(depth))
    self.bottleneck = double(widths[depth - 1], widths[depth])
    self.upsample = nn.ModuleList(nn.ConvTranspose2d(widths[l + 1], widths[l], 2, stride=2)
                                  for l in range(depth))
    self.up = nn.ModuleList(double(2 * widths[l], widths[l]) for l in range(depth))
    self.classifier = nn.Conv2d(width, num_classes, 1)

  def forward(self, x):
    skips = []
    for block in self.down:
      x = block(x)
      skips.append(x)
      x = nn.functional.max_pool2d(x, 2)
    x = self.bottleneck(x)
    for level in reversed(range(len(self.up))):
      x = self.up[level](torch.cat([skips[level], self.upsample[level](x)], 1))
    return self.classifier(x)


def time_steps(step, num_steps, warmup):
  for _ in range(warmup):
    step()
  start = time.perf_counter()
  for _ in range(num_steps):
    step()
  return (time.perf_counter() - start) / num_steps


def bench_jax(args, images, labels):
  model = build_model("unet", args.classes, {"width": args.width, "depth": args.depth})
  variables = model.init(jax.random.key(0), images[:1], train=False)
  tx = optax.sgd(0.01, momentum=0.9)
  state = TrainState.create(variables["params"], variables["batch_stats"], tx)
  train_step = jax.jit(functools.partial(steps.train_step,
                                         objective=semantic.objective(model=model,
                                                                      ignore_index=255),
                                         tx=tx, schedule=optax.constant_schedule(0.01)),
                       donate_argnums=(0,))
  batch = {"image": jax.device_put(images), "label": jax.device_put(labels)}
  holder = {"state": state}
  def step():
    holder["state"], metrics = train_step(holder["state"], batch, jax.random.key(1))
    jax.block_until_ready(metrics["loss"])
  return time_steps(step, args.steps, args.warmup)


def bench_torch(args, images, labels, channels_last):
  model = TorchUNet(args.classes, args.width, args.depth)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  y = torch.from_numpy(labels).long()
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y, ignore_index=255)
    loss.backward()
    optimizer.step()
  return time_steps(step, args.steps, args.warmup)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--width", type=int, default=8)
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--size", type=int, default=128)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--classes", type=int, default=7)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  report.add_json_argument(parser)
  args = parser.parse_args()
  xla_flags = report.use_train_defaults()
  rng = np.random.default_rng(0)
  images = rng.normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
  labels = rng.integers(0, args.classes, (args.batch, args.size, args.size)).astype(np.int32)
  print(f"U-Net width {args.width} depth {args.depth}, batch {args.batch} x {args.size}^2, "
        f"jax {jax.__version__} on {jax.devices()[0].platform} (XLA_FLAGS={xla_flags!r}), "
        f"torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)")
  results = {"jax": bench_jax(args, images, labels),
             "torch": bench_torch(args, images, labels, channels_last=False),
             "torch channels_last": bench_torch(args, images, labels, channels_last=True)}
  table = report.Table(["framework", "ms/step", "img/s", "ratio (jax s / this s)"])
  for name, seconds in results.items():
    table.add(name, f"{seconds * 1e3:.1f}", f"{args.batch / seconds:.1f}",
              f"{results['jax'] / seconds:.2f}")
  table.finish(
      args.json, benchmark="U-Net train step: segjax (JAX) against PyTorch",
      setup=(f"segjax's U-Net (width {args.width}, depth {args.depth}, {args.classes} classes) "
             "and the same U-Net layer for layer in PyTorch (NCHW, and channels_last), each "
             "running forward + backward + an SGD-momentum update on a fixed random batch of "
             f"{args.batch} images of {args.size}x{args.size}, float32, in one process (jax on "
             f"{jax.devices()[0].platform}, torch on the CPU). Mean step time over {args.steps} "
             f"steps after {args.warmup} untimed ones (compilation, allocator warm-up); ratio "
             "above 1: JAX is slower."))


if __name__ == "__main__":
  main()
