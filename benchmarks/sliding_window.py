"""Seconds per image of SemanticPredictor's sliding-window and whole-image
inference against image size, with a plain per-window loop as the reference.

  python benchmarks/sliding_window.py --sizes 512x512,512x1024,1024x2048

The model is a small U-Net (random weights; the speed does not depend on them).
The reference runs mmseg's slide_inference loop on the host: one jitted call
per window (batch 1), the window logits copied back and summed into a numpy
canvas, divided by the counts, argmax. SemanticPredictor runs the windows in
fixed batches of `--window-batch` and keeps the canvas on the device. The
first call of each (compilation) is timed separately; the table gives the mean
of `--repeats` later calls of `predict`, the reference's time divided by the
predictor's (above 1: the predictor is faster) and the fraction of pixels on
which the two agree.
"""
import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from segjax.inference import SemanticPredictor
from segjax.models import build_model

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def reference_slide(forward, variables, image, window, stride, num_classes):
  """mmseg's slide_inference, one window at a time, accumulated on the host."""
  h_img, w_img = image.shape[:2]
  (h_crop, w_crop), (h_stride, w_stride) = window, stride
  h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
  w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
  preds = np.zeros((h_img, w_img, num_classes), np.float32)
  count = np.zeros((h_img, w_img, 1), np.float32)
  for h_idx in range(h_grids):
    for w_idx in range(w_grids):
      y2 = min(h_idx * h_stride + h_crop, h_img)
      x2 = min(w_idx * w_stride + w_crop, w_img)
      y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
      preds[y1:y2, x1:x2] += np.asarray(forward(variables, image[None, y1:y2, x1:x2]))[0]
      count[y1:y2, x1:x2] += 1
  return (preds / count).argmax(-1).astype(np.int32)


def timed(fn, repeats):
  """(seconds of the first call, mean seconds of `repeats` later calls, result)."""
  start = time.perf_counter()
  result = fn()
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(repeats):
    result = fn()
  return first, (time.perf_counter() - start) / repeats, result


def parse_size(text):
  height, width = (int(v) for v in text.lower().split("x"))
  return height, width


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="512x512,512x1024,1024x2048",
                      help="comma-separated HxW image sizes")
  parser.add_argument("--width", type=int, default=8, help="U-Net width")
  parser.add_argument("--depth", type=int, default=4, help="U-Net depth")
  parser.add_argument("--classes", type=int, default=19)
  parser.add_argument("--window", type=parse_size, default=(512, 512))
  parser.add_argument("--stride", type=parse_size, default=(341, 341))
  parser.add_argument("--window-batch", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  sizes = [parse_size(s) for s in args.sizes.split(",")]

  model = build_model("unet", args.classes, {"width": args.width, "depth": args.depth})
  init = jax.jit(model.init, static_argnames="train")
  variables = init(jax.random.key(0, impl="rbg"), np.zeros((1, 32, 32, 3), np.float32),
                   train=False)
  common = dict(mean=MEAN, std=STD, window=args.window, stride=args.stride,
                window_batch=args.window_batch)
  slide = SemanticPredictor(model, variables, args.classes, mode="slide", **common)
  whole = SemanticPredictor(model, variables, args.classes, mode="whole", **common)
  mean, std = np.float32(MEAN), np.float32(STD)
  forward = jax.jit(lambda v, x: model.apply(v, (x.astype(jnp.float32) - mean) / std,
                                             train=False))

  device = jax.devices()[0]
  print(f"U-Net width {args.width} depth {args.depth}, {args.classes} classes; window "
        f"{args.window}, stride {args.stride}, window batch {args.window_batch}; jax "
        f"{jax.__version__} on {device.platform} ({device.device_kind}), "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
  print(f"{'image':>10} {'windows':>7} {'slide s':>8} {'(1st)':>7} {'whole s':>8} {'(1st)':>7} "
        f"{'loop s':>8} {'(1st)':>7} {'loop/slide':>10} {'agree':>6}")
  rng = np.random.default_rng(0)
  for height, width in sizes:
    image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
    grids = [max(s - w + t - 1, 0) // t + 1 for s, w, t in zip((height, width), args.window,
                                                               args.stride)]
    slide_first, slide_s, slide_labels = timed(lambda: slide.predict(image), args.repeats)
    whole_first, whole_s, _ = timed(lambda: whole.predict(image), args.repeats)
    loop_first, loop_s, loop_labels = timed(
        lambda: reference_slide(forward, variables, image, args.window, args.stride,
                                args.classes), args.repeats)
    agree = float((slide_labels == loop_labels).mean())
    print(f"{height:>4}x{width:<5} {grids[0] * grids[1]:>7} {slide_s:>8.3f} {slide_first:>7.2f} "
          f"{whole_s:>8.3f} {whole_first:>7.2f} {loop_s:>8.3f} {loop_first:>7.2f} "
          f"{loop_s / slide_s:>10.2f} {agree:>6.4f}")


if __name__ == "__main__":
  main()
