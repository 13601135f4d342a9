"""Seconds per call of segjax's jitted NMS against a plain-torch greedy NMS, same boxes.

  python benchmarks/nms.py --sizes 1000,5000,20000 --threshold 0.5

Boxes are random (centres uniform over a 1333x800 image, sides 8..200 pixels),
scores a random permutation (no ties). The reference is the classic greedy loop
in torch (take the best box, drop the rest with IoU > threshold, repeat), run on
the host. segjax's `nms` runs with max_output_size = N (no early stop) and, in a
second row, with max_output_size = 1000 (segjax stops once 1000 are kept; the
reference always runs to the end). The compile time is reported separately;
timings are the mean of `--repeats` calls. ratio = reference / segjax (above 1:
segjax is faster). The kept indices are checked to be equal.
"""
import argparse
import os
import platform
import time

import jax
import numpy as np
import torch

from segjax.ops.nms import nms


def greedy_nms_torch(boxes, scores, threshold):
  """Plain greedy NMS on torch tensors; returns kept indices in score order."""
  order = torch.argsort(scores, descending=True)
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  keep = []
  while order.numel():
    i = order[0]
    keep.append(i)
    rest = order[1:]
    lt = torch.maximum(boxes[i, :2], boxes[rest, :2])
    rb = torch.minimum(boxes[i, 2:], boxes[rest, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    order = rest[inter / (area[i] + area[rest] - inter) <= threshold]
  return torch.stack(keep)


def timed(fn, repeats):
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn()
  return (time.perf_counter() - start) / repeats, out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="1000,5000,20000")
  parser.add_argument("--threshold", type=float, default=0.5)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)")
  print(f"{'N':>6} {'max_out':>7} {'kept':>6} {'compile s':>9} {'segjax s':>9} {'torch s':>9} "
        f"{'ratio':>6}")
  rng = np.random.default_rng(0)
  for n in (int(s) for s in args.sizes.split(",")):
    centre = rng.uniform([0, 0], [1333, 800], (n, 2))
    half = rng.uniform(4, 100, (n, 2))
    boxes = np.concatenate([centre - half, centre + half], 1).astype(np.float32)
    scores = rng.permutation(n).astype(np.float32)
    tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
    ref_s, ref = timed(lambda: greedy_nms_torch(tb, ts, args.threshold), args.repeats)
    ref = ref.numpy()
    for max_out in sorted({n, min(n, 1000)}, reverse=True):
      fn = jax.jit(lambda b, s, m=max_out: nms(b, s, args.threshold, m))
      jb, js = jax.device_put(boxes), jax.device_put(scores)
      start = time.perf_counter()
      jax.block_until_ready(fn(jb, js))
      compile_s = time.perf_counter() - start
      ours_s, (idx, num) = timed(lambda: jax.block_until_ready(fn(jb, js)), args.repeats)
      k = int(num)
      if not np.array_equal(np.asarray(idx)[:k], ref[:k]) or k != min(len(ref), max_out):
        raise SystemExit(f"N={n}: segjax NMS differs from the greedy reference")
      print(f"{n:>6} {max_out:>7} {k:>6} {compile_s:>9.2f} {ours_s:>9.4f} {ref_s:>9.4f} "
            f"{ref_s / ours_s:>6.2f}")


if __name__ == "__main__":
  main()
