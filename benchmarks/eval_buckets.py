"""ADE20K-shaped evaluation: one static 2048x2048 shape against size buckets.

  python benchmarks/eval_buckets.py                 # FLOPs of PSPNet-R50-D8 + CPU wall time
  python benchmarks/eval_buckets.py --width 8 --images 12

Part 1, FLOPs per evaluated image of PSPNet-R50-D8 (mmseg's layout, 150 classes) at the
ADE20K test resize (keep-ratio to (2048, 512)), from XLA's cost analysis of the compiled
forward pass (`jax.jit(f).lower(...).compile().cost_analysis()['flops']`, batch 1; FLOPs
are linear in the batch): the old batched path runs every image at 2048x2048 (the one
static shape every such resize fits); the buckets run it at its bucket (size_divisor=1: its
resized size exactly; size_divisor=64: rounded up to multiples of 64), the blank slots that
fill a bucket's last batch of `--batch` counted too.

Part 2, CPU wall time of evaluating a synthetic ADE20K-shaped split (`--images` images of
typical ADE20K sizes with random labels) with the same PSPNet at backbone width `--width`
(full width is too slow for a shared CPU at 2048x2048), through segjax's evaluators in one
run: the old batched path (`data.eval_ops` padded to 2048x2048), the recipe's previous
path (one image at a time at its exact resized size), and the bucketed paths. Each is run
twice: the first includes compilation, the second is the steady cost. The table's ratio
divides the old path's seconds by each row's; "same confusion as" says which paths'
confusion matrices are identical.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import report  # noqa: E402

report.use_train_defaults()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import pspnet_ade20k  # noqa: E402
from segjax.data.sources import DatasetSpec  # noqa: E402
from segjax.inference import buckets as buckets_lib  # noqa: E402
from segjax.inference.semantic import resized_size  # noqa: E402
from segjax.tasks import get_task  # noqa: E402

SCALE = (2048, 512)
OLD_PAD = (2048, 2048)
# Typical ADE20K validation sizes (h, w): 4:3 landscape and portrait, square, 3:2, 16:9,
# small and large photos; cycled to make the split.
SIZES = [(512, 683), (683, 512), (512, 512), (384, 512), (375, 500), (512, 768), (480, 640),
         (600, 800), (256, 341), (512, 910), (768, 512), (427, 640)]
NUM_CLASSES = 150


def pspnet_config(width: int, head: int):
  config = pspnet_ade20k.get_config()
  config.unlock()
  config.model.init_from = ""
  if width != 64:
    config.model.options.backbone_width = width
    config.model.options.head_channels = head
    config.model.options.aux_channels = head // 2
  return config


def dataset_spec(sizes):
  rng = np.random.default_rng(0)
  records = []
  for h, w in sizes:
    label = rng.integers(0, NUM_CLASSES, (h // 32 + 1, w // 32 + 1))
    label = np.kron(label, np.ones((32, 32), np.int64))[:h, :w].astype(np.uint8)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    records.append({"image": image, "label": label[..., None]})
  return DatasetSpec(name="ade20k_shaped", class_names=tuple(f"c{i}" for i in range(NUM_CLASSES)),
                     palette=np.zeros((NUM_CLASSES, 3), np.uint8), ignore_index=255,
                     splits=("validation",), open_split=lambda split: records)


def model_and_variables(config, dataset):
  model = get_task(config).build_model(config, dataset)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32))
  rng = np.random.default_rng(0)

  def fill(path, leaf):  # host-side random weights: compiling flax's initializers is slow
    name = jax.tree_util.keystr(path)
    if len(leaf.shape) >= 2:
      return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    if "scale" in name or "var" in name:
      return np.ones(leaf.shape, np.float32)
    return np.zeros(leaf.shape, np.float32)
  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  return model, {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def forward_flops(model, variables, shape):
  """XLA's FLOPs of one forward pass of a (1, h, w, 3) image."""
  fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
  x = jax.ShapeDtypeStruct((1,) + tuple(shape) + (3,), np.float32)
  v = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
  return float(fn.lower(v, x).compile().cost_analysis()["flops"])


def flops_part(sizes, batch):
  config = pspnet_config(64, 512)
  dataset = dataset_spec([(32, 32)])
  model, variables = model_and_variables(config, dataset)
  resized = [resized_size(h, w, SCALE) for h, w in sizes]
  cache = {}

  def flops(shape):
    if shape not in cache:
      start = time.perf_counter()
      cache[shape] = forward_flops(model, variables, shape)
      print(f"  cost analysis of {shape[0]}x{shape[1]}: {cache[shape] / 1e9:.0f} GFLOPs "
            f"({time.perf_counter() - start:.0f} s)", flush=True)
    return cache[shape]

  old = flops(OLD_PAD)
  table = report.Table(["path", "model shapes", "GFLOPs per image", "ratio (old / this)",
                        "pixels per image (k)"])
  table.add(f"old: every image padded to {OLD_PAD[0]}x{OLD_PAD[1]}", 1, f"{old / 1e9:.0f}",
            "1.00", f"{OLD_PAD[0] * OLD_PAD[1] / 1e3:.0f}")
  for divisor in (1, 64):
    plan = buckets_lib.plan(resized, buckets_lib.Buckets(size_divisor=divisor), batch)
    total = sum(b.slots * flops(b.shape) for b in plan) / len(sizes)
    pixels = buckets_lib.padded_pixels(plan) / len(sizes)
    table.add(f"buckets, size_divisor={divisor}, batch {batch}", len({b.shape for b in plan}),
              f"{total / 1e9:.0f}", f"{old / total:.2f}", f"{pixels / 1e3:.0f}")
  return table


def wall_part(sizes, width, head, batch):
  dataset = dataset_spec(sizes)
  base = pspnet_config(width, head)
  model, variables = model_and_variables(base, dataset)
  paths = {
      "old: batched, every image padded to 2048x2048": dict(
          mode="batched", size_divisor=0,
          eval_ops=("resize(scale=(2048, 512), resize_labels=False)|"
                    "pad(size=(2048, 2048), label_size=(2048, 2048))")),
      "before: whole, one image at a time, exact shapes (the recipe's previous path)": dict(
          mode="whole", exact_shapes=True, size_divisor=0),
      "buckets: whole, exact shapes, size_divisor=1 (the recipe's path)": dict(
          mode="whole", exact_shapes=True, size_divisor=1),
      "buckets: whole, size_divisor=64": dict(mode="whole", exact_shapes=False,
                                              size_divisor=64),
  }
  table = report.Table(["path", "s (1st, compiling)", "s (2nd)", "ratio (old 2nd / this 2nd)",
                        "model shapes compiled", "mIoU", "same confusion as"])
  results = []
  for name, options in paths.items():
    config = base.copy_and_resolve_references()
    with config.unlocked():
      config.data.eval_batch_size = batch
      config.inference.scale = SCALE
      config.inference.label_ops = ""
      config.data.eval_ops = options.pop("eval_ops", "")
      for key, value in options.items():
        config.inference[key] = value
    task = get_task(config)
    task.validate(config)
    evaluator = task.evaluator(config, dataset, model, progress=False)
    times = []
    for _ in range(2):
      start = time.perf_counter()
      metrics = evaluator.evaluate(variables)
      times.append(time.perf_counter() - start)
    if hasattr(evaluator, "compiled"):  # bucketed
      shapes = sum(k[0] == "model" for k in evaluator.compiled)
    elif options["mode"] == "batched":
      shapes = 1
    else:  # per image: its predictor's compiled model shapes (of the last evaluation)
      shapes = sum(k[0] == "whole" for k in evaluator._predictor.compiled)
    results.append((name, times, shapes, float(metrics["mIoU"]), evaluator.confusion.copy()))
  old_seconds = results[0][1][1]
  for i, (name, times, shapes, miou, confusion) in enumerate(results):
    same = [str(j + 1) for j, other in enumerate(results)
            if j != i and np.array_equal(other[4], confusion)]
    table.add(f"{i + 1}. {name}", f"{times[0]:.1f}", f"{times[1]:.1f}",
              f"{old_seconds / times[1]:.2f}", shapes, f"{100 * miou:.3f}",
              ", ".join(same) or "-")
  return table


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=6,
                      help="images in part 2's synthetic split (part 1 takes all 12 sizes)")
  parser.add_argument("--batch", type=int, default=4, help="evaluation batch size")
  parser.add_argument("--width", type=int, default=8,
                      help="backbone width of part 2's PSPNet (64 = full)")
  parser.add_argument("--head", type=int, default=64, help="part 2's PPM/head channels")
  parser.add_argument("--skip-flops", action="store_true", help="part 2 only")
  report.add_json_argument(parser)
  args = parser.parse_args()
  sizes = [SIZES[i % len(SIZES)] for i in range(args.images)]
  tables = []
  if not args.skip_flops:
    print("Part 1: FLOPs per image, PSPNet-R50-D8, 150 classes", flush=True)
    tables.append(("flops", flops_part(SIZES, args.batch)))
  print(f"Part 2: CPU wall time, PSPNet-R50-D8 at backbone width {args.width}", flush=True)
  tables.append(("wall", wall_part(sizes, args.width, args.head, args.batch)))
  shown = ", ".join(f"{h}x{w}" for h, w in sizes)
  setups = {
      "flops": (f"FLOPs per evaluated image of PSPNet-R50-D8 (full width, 150 classes, float32 "
                f"forward) from XLA's cost analysis of the compiled program, for {len(SIZES)} "
                f"ADE20K-sized images (HxW: {', '.join(f'{h}x{w}' for h, w in SIZES)}) resized "
                "keeping the ratio to (2048, 512) as the recipe tests; buckets in batches of "
                f"{args.batch} (a bucket's last batch at the smallest power of two that holds "
                "it), the blank slots counted."),
      "wall": (f"CPU seconds to evaluate {len(sizes)} of those images ({shown}; random labels) "
               "with "
               f"PSPNet-R50-D8 at backbone width {args.width}, head {args.head} channels "
               f"(random weights), evaluation batch {args.batch}, through segjax's evaluators "
               "in one process; 1st run compiles, 2nd is the steady cost."),
  }
  notes = {
      "flops": ["The model's forward pass only; resizing the logits back to each original size "
                "(the same work on every path) is not counted."],
      "wall": ["The old path's logits alone are batch x 2048 x 2048 x 150 float32 (2.5 GB per "
               "image): at batch 4 it needs over 10 GB."],
  }
  if args.json:
    import json
    records = []
    for key, table in tables:
      records.append({"benchmark": "eval_buckets", "setup": setups[key],
                      "columns": table.columns, "rows": table.rows, "notes": notes[key]})
    with open(args.json, "w") as f:
      json.dump(records, f, indent=1)
      f.write("\n")


if __name__ == "__main__":
  main()
