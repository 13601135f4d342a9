"""Per-model cost and speed: parameters, forward GFLOPs (XLA cost analysis),
train-step compile time, train-step images/s, XLA's memory estimate, and for
models torchvision also has, PyTorch's train-step images/s in the same run.

  python benchmarks/models.py                    # 512x512, batch 2, every model
  python benchmarks/models.py --size 256 --models pspnet deeplabv3

GFLOPs are XLA's count (a multiply-add is 2 FLOPs) for one --flops-size image
in inference mode; compile time, memory estimate and images/s are for the
train step at --size.

Full-size models, as the configs build them, with 21 classes. The train step is
segjax's own (forward, backward, SGD update; BatchNorm in training mode, aux
heads on); PyTorch runs the same step (cross-entropy on `out`, plus 0.4 x aux).
"""
import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from segjax.models import build_model  # noqa: E402
from segjax.tasks import semantic  # noqa: E402
from segjax.training import steps  # noqa: E402
from segjax.training.train_state import TrainState  # noqa: E402

# name -> (model options, torchvision builder name or None)
MODELS = {
    "fcn8s": ({}, None),
    "fcn_resnet": ({"aux_channels": 256}, "fcn_resnet50"),
    "segnet": ({}, None),
    "unet": ({"width": 64, "depth": 4}, None),
    "unet_resnet": ({}, None),
    "pspnet": ({}, None),
    "deeplabv3": ({"aux_channels": 256}, "deeplabv3_resnet50"),
    "deeplabv3plus": ({}, None),
}
NUM_CLASSES = 21


def _timed(fn, steps, warmup=1):
  for _ in range(warmup):
    fn()
  start = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - start) / steps


def bench_segjax(name, options, size, batch, num_steps, flops_size):
  model = build_model(name, NUM_CLASSES, options)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES, (batch, size, size)), jnp.int32)
  keys = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  variables = jax.jit(functools.partial(model.init, train=True))(keys, images)
  params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
  flops_input = jax.ShapeDtypeStruct((1, flops_size, flops_size, 3), jnp.float32)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, flops_input)
  gflops = forward.compile().cost_analysis()["flops"] / 1e9
  tx = optax.sgd(0.01, momentum=0.9)
  state = TrainState.create(variables["params"], variables.get("batch_stats", {}), tx)
  step_fn = jax.jit(functools.partial(steps.train_step,
                                      objective=semantic.objective(model=model, ignore_index=255),
                                      tx=tx, schedule=optax.constant_schedule(0.01)),
                    donate_argnums=(0,))
  batch_arrays = {"image": images, "label": labels}
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch_arrays, jax.random.key(2)).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  memory_gb = (memory.temp_size_in_bytes + memory.argument_size_in_bytes) / 2**30
  holder = {"state": state}
  def run():
    holder["state"], metrics = compiled(holder["state"], batch_arrays, jax.random.key(2))
    jax.block_until_ready(metrics["loss"])
  seconds = _timed(run, num_steps)
  return dict(params=params, gflops=gflops, compile_s=compile_s, memory_gb=memory_gb,
              img_s=batch / seconds)


def bench_torch(builder, size, batch, num_steps):
  import torch
  from tests.torch_reference import import_torchvision
  torchvision = import_torchvision()
  model = getattr(torchvision.models.segmentation, builder)(
      weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=True).train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  x = torch.randn(batch, 3, size, size)
  y = torch.randint(0, NUM_CLASSES, (batch, size, size))
  def run():
    optimizer.zero_grad(set_to_none=True)
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out["out"], y)
    loss = loss + 0.4 * torch.nn.functional.cross_entropy(out["aux"], y)
    loss.backward()
    optimizer.step()
  return batch / _timed(run, num_steps)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=512, help="input size of the timed steps")
  parser.add_argument("--flops-size", type=int, default=512,
                      help="input size for the GFLOPs column (compiled, not run)")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--models", nargs="*", default=list(MODELS))
  args = parser.parse_args()
  print(f"timed: batch {args.batch} x {args.size}x{args.size}; GFLOPs: one "
        f"{args.flops_size}x{args.flops_size} image; {NUM_CLASSES} classes; jax {jax.__version__} "
        f"on {jax.devices()[0].platform}")
  print(f"| model | params (M) | fwd GFLOPs at {args.flops_size} | compile (s) | "
        "XLA mem est. (GB) | train img/s | torchvision img/s | segjax/torch speed |")
  print("|---|---|---|---|---|---|---|---|")
  for name in args.models:
    options, builder = MODELS[name]
    r = bench_segjax(name, options, args.size, args.batch, args.steps, args.flops_size)
    torch_cell = ratio = "-"
    if builder:
      torch_img_s = bench_torch(builder, args.size, args.batch, args.steps)
      torch_cell, ratio = f"{torch_img_s:.3f} ({builder})", f"{r['img_s'] / torch_img_s:.2f}"
    print(f"| {name} | {r['params'] / 1e6:.2f} | {r['gflops']:.1f} | {r['compile_s']:.1f} | "
          f"{r['memory_gb']:.2f} | {r['img_s']:.3f} | {torch_cell} | {ratio} |", flush=True)


if __name__ == "__main__":
  main()
