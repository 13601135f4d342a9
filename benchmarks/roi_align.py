"""RoIs per second of multi-level RoIAlign on 4 FPN levels, JAX (jitted) against torchvision.

  python benchmarks/roi_align.py --rois 512,2000

Image 800x800, batch 1, 256 channels, P2..P5 maps (200, 100, 50, 25), output 7x7, aligned,
random boxes. torchvision's compiled C++ kernel cannot load in this environment, so the
reference is its pure-Python `_roi_align` (eager torch ops, its torch.compile wrapper
removed), run per level on the RoIs assigned to that level as MultiScaleRoIAlign does. That
version samples adaptive grids over the whole map ([K, C, 7, 7, H, W] elements), which does not
fit in memory at these sizes, so it runs only with sampling ratio 2; the JAX side runs both.
The table gives the mean of `--repeats` calls after one warm-up (compilation) call and the
reference's time divided by JAX's (above 1: JAX is faster). `--json PATH` also writes the
table as benchmarks/report.py's JSON.
"""
import argparse
import os
import platform
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

import report
from segjax.ops.roi_align import fpn_levels, multilevel_roi_align

LEVELS = (2, 3, 4, 5)


def torch_reference():
  """torchvision's Python `_roi_align` (unwrapped) and torch; its C++ ops cannot load here."""
  for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
    sys.modules.setdefault(name, types.ModuleType(name))
  import torch
  import torchvision  # noqa: F401  (registers torchvision.ops.roi_align)
  return sys.modules["torchvision.ops.roi_align"]._roi_align.__wrapped__, torch


def timed(fn, repeats):
  """Mean seconds of `repeats` calls of fn after one warm-up call."""
  fn()
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - start) / repeats


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rois", default="512,2000")
  parser.add_argument("--channels", type=int, default=256)
  parser.add_argument("--image", type=int, default=800)
  parser.add_argument("--repeats", type=int, default=3)
  report.add_json_argument(parser)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  maps = [rng.normal(size=(1, args.image >> k, args.image >> k, args.channels))
          .astype(np.float32) for k in LEVELS]
  jax_maps = [jnp.asarray(m) for m in maps]
  tv_roi_align, torch = torch_reference()
  torch.set_num_threads(os.cpu_count())
  torch_maps = [torch.from_numpy(m).permute(0, 3, 1, 2).contiguous() for m in maps]
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}")
  table = report.Table(["RoIs", "sampling", "segjax RoIs/s", "torchvision (Python) RoIs/s",
                        "ratio (torchvision s / segjax s)", "max abs diff"])
  max_diffs = []
  for num in [int(n) for n in args.rois.split(",")]:
    sizes = np.exp(rng.uniform(np.log(16), np.log(args.image), (num, 2)))
    x1y1 = rng.uniform(0, 1, (num, 2)) * (args.image - sizes)
    boxes = np.concatenate([x1y1, x1y1 + sizes], 1).astype(np.float32)[None]
    assigned = np.asarray(fpn_levels(jnp.asarray(boxes)))[0]
    for ratio in (2, 0):
      pool = jax.jit(lambda m, b, ratio=ratio: multilevel_roi_align(
          m, b, 7, sampling_ratio=ratio, aligned=True))
      jax_s = timed(lambda: pool(jax_maps, jnp.asarray(boxes)).block_until_ready(),
                    args.repeats)
      if ratio > 0:

        def reference(ratio=ratio):
          out = torch.zeros(num, args.channels, 7, 7)
          for index, level in enumerate(LEVELS):
            idx = np.nonzero(assigned == index)[0]
            rois = torch.from_numpy(np.concatenate(
                [np.zeros((len(idx), 1), np.float32), boxes[0, idx]], 1))
            out[torch.from_numpy(idx)] = tv_roi_align(torch_maps[index], rois, 2.0**-level,
                                                      7, 7, ratio, True)
          return out

        with torch.no_grad():
          ref = reference().permute(0, 2, 3, 1).numpy()
          got = np.asarray(pool(jax_maps, jnp.asarray(boxes)))[0]
          max_diff = float(np.abs(ref - got).max())
          max_diffs.append(max_diff)
          ref_s = timed(reference, args.repeats)
        table.add(num, ratio, f"{num / jax_s:.0f}", f"{num / ref_s:.0f}", f"{ref_s / jax_s:.2f}",
                  f"{max_diff:.1e}")
      else:
        table.add(num, "adaptive", f"{num / jax_s:.0f}", "(does not fit)", "-", "-")
  table.finish(
      args.json, benchmark="Multi-level RoIAlign: segjax against torchvision",
      setup=(f"`multilevel_roi_align` (jitted, jax on {jax.devices()[0].platform}) pooling 7x7, "
             f"aligned, from P2-P5 of a {args.image}x{args.image} image (batch 1, {args.channels} "
             "channels, random boxes) against torchvision's pure-Python `_roi_align` run per FPN "
             "level on the RoIs assigned to it, as MultiScaleRoIAlign does (torchvision's "
             "compiled kernel does not load here). The reference samples adaptive grids over "
             "whole maps, which does not fit in memory, so it runs with sampling ratio 2 only. "
             f"Mean of {args.repeats} calls after one warm-up (compilation) call."),
      notes=[f"outputs equal to torchvision's within {max(max_diffs):.1e} (largest absolute "
             f"difference, sampling ratio 2)"])


if __name__ == "__main__":
  main()
