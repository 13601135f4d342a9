"""Seconds per image of SemanticPredictor's sliding-window and whole-image
inference against image size, with a plain per-window loop as the reference.

  python benchmarks/sliding_window.py --sizes 512x512,512x1024,1024x2048
  python benchmarks/sliding_window.py --sizes 1024x2048 --window-batch 1,4

The model is a small U-Net (random weights; the speed does not depend on them).
The reference runs mmseg's slide_inference loop on the host: one jitted call
per window (batch 1), the window logits copied back and summed into a numpy
canvas, divided by the counts, argmax. SemanticPredictor runs the windows in
fixed batches of `--window-batch` (one table row per value) and keeps the
canvas on the device. The first call of each (compilation) is timed
separately; the table gives the mean of `--repeats` later calls of `predict`,
the reference's time divided by the predictor's (above 1: the predictor is
faster) and the fraction of pixels on which the two agree. `--json PATH` also
writes the table as benchmarks/report.py's JSON.
"""
import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import report
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


def parse_batches(text):
  batches = [int(v) for v in text.split(",")]
  if min(batches) < 1:
    raise argparse.ArgumentTypeError(f"window batches must be positive, got {text!r}")
  return batches


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="512x512,512x1024,1024x2048",
                      help="comma-separated HxW image sizes")
  parser.add_argument("--width", type=int, default=8, help="U-Net width")
  parser.add_argument("--depth", type=int, default=4, help="U-Net depth")
  parser.add_argument("--classes", type=int, default=19)
  parser.add_argument("--window", type=parse_size, default=(512, 512))
  parser.add_argument("--stride", type=parse_size, default=(341, 341))
  parser.add_argument("--window-batch", type=parse_batches, default=[4],
                      help="comma-separated windows per model call in slide mode, a row each")
  parser.add_argument("--repeats", type=int, default=2)
  report.add_json_argument(parser)
  args = parser.parse_args()
  sizes = [parse_size(s) for s in args.sizes.split(",")]

  model = build_model("unet", args.classes, {"width": args.width, "depth": args.depth})
  init = jax.jit(model.init, static_argnames="train")
  variables = init(jax.random.key(0, impl="rbg"), np.zeros((1, 32, 32, 3), np.float32),
                   train=False)
  common = dict(mean=MEAN, std=STD, window=args.window, stride=args.stride)
  slides = {batch: SemanticPredictor(model, variables, args.classes, mode="slide",
                                     window_batch=batch, **common)
            for batch in args.window_batch}
  whole = SemanticPredictor(model, variables, args.classes, mode="whole", **common)
  mean, std = np.float32(MEAN), np.float32(STD)
  forward = jax.jit(lambda v, x: model.apply(v, (x.astype(jnp.float32) - mean) / std,
                                             train=False))

  device = jax.devices()[0]
  print(f"U-Net width {args.width} depth {args.depth}, {args.classes} classes; window "
        f"{args.window}, stride {args.stride}; jax {jax.__version__} on {device.platform} "
        f"({device.device_kind}), {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}")
  table = report.Table(["image", "windows", "window batch", "slide s (1st)", "whole s (1st)",
                        "loop s (1st)", "ratio (loop s / slide s)", "agree"])
  rng = np.random.default_rng(0)
  for height, width in sizes:
    image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
    grids = [max(s - w + t - 1, 0) // t + 1 for s, w, t in zip((height, width), args.window,
                                                               args.stride)]
    slide_runs = {batch: timed(lambda: slide.predict(image), args.repeats)
                  for batch, slide in slides.items()}
    whole_first, whole_s, _ = timed(lambda: whole.predict(image), args.repeats)
    loop_first, loop_s, loop_labels = timed(
        lambda: reference_slide(forward, variables, image, args.window, args.stride,
                                args.classes), args.repeats)
    for batch, (slide_first, slide_s, slide_labels) in slide_runs.items():
      table.add(f"{height}x{width}", grids[0] * grids[1], batch,
                f"{slide_s:.3f} ({slide_first:.2f})", f"{whole_s:.3f} ({whole_first:.2f})",
                f"{loop_s:.3f} ({loop_first:.2f})", f"{loop_s / slide_s:.2f}",
                f"{float((slide_labels == loop_labels).mean()):.4f}")
  table.finish(
      args.json, benchmark="Sliding-window inference against image size",
      setup=(f"U-Net width {args.width}, depth {args.depth}, {args.classes} classes, random "
             f"weights; window {args.window[0]}x{args.window[1]}, stride "
             f"{args.stride[0]}x{args.stride[1]}; images HxW; jax on {device.platform}. "
             "`SemanticPredictor` in slide mode (windows in compiled batches of 'window batch', "
             "canvas on the device) and whole mode, against a reference loop as mmseg's "
             "slide_inference: one jitted batch-1 call per window, logits summed into a numpy "
             f"canvas on the host. Seconds per image, mean of {args.repeats} calls after the "
             "first, which is given in brackets (it includes compilation); 'agree' is the "
             "fraction of pixels where the slide and loop labels match."))


if __name__ == "__main__":
  main()
