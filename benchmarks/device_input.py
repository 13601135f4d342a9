"""Bytes per step to the devices and input-pipeline images/s: uint8 images normalized on
the device (segjax now) against float32 images normalized on the host (segjax before).

  python benchmarks/device_input.py                  # 48 ADE20K-sized images, workers 0 2
  python benchmarks/device_input.py --images 16 --batches 2 --workers 0

Two training pipelines, each run twice in the same process: "before" is the task's ops
followed by the `normalize` op, as `Task.data_ops` ended until now (float32 images), and
"after" is the task's ops alone (uint8 images; the jitted step normalizes them,
`segjax.data.device`). configs/pspnet_ade20k.py's pipeline runs on a synthetic
ADEChallengeData2016.zip prepared with the real `ade20k` builder (benchmarks/
data_pipeline.py writes it), configs/maskrcnn_coco.py's on synthetic COCO-like records
(640x480 images with 12 objects and their masks, held in memory). Bytes per step are those
of one global batch of the config's size (every array the train step gets); images/s
are grain's with 2 reader threads and the given numbers of worker processes. The copy
time is `jax.device_put` of one batch to this machine's default device, the on-device
normalization time the jitted lookup of one uint8 batch there: on a CPU both are memory
copies of the same machine, shown for scale only; on an accelerator the copy crosses
PCIe or the host link, which the byte ratio then sets. `--json PATH` also writes the
tables as benchmarks/report.py's JSON.
"""
import argparse
import functools
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402
from configs import maskrcnn_coco, pspnet_ade20k  # noqa: E402
from data_pipeline import write_archive  # noqa: E402
from segjax.data import device, pipeline, transforms  # noqa: E402
from segjax.data.sources import dataset_classes, get_dataset  # noqa: E402
from segjax.tasks import get_task  # noqa: E402


def coco_like_records(count: int, seed: int = 0):
  """COCO-shaped records as the coco_instances source gives them: a 480x640 uint8 image
  and `objects` (boxes, classes, crowd flags and image-sized masks) of 12 boxes each."""
  rng = np.random.default_rng(seed)
  things = dataset_classes("coco_instances").thing_classes
  records = []
  for _ in range(count):
    h, w = 480, 640
    coarse = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
    image = np.kron(coarse, np.ones((16, 16, 1), np.uint8))
    objects = {"box": [], "class": [], "is_crowd": [], "mask": []}
    for _ in range(12):
      x1, y1 = rng.integers(0, w - 64), rng.integers(0, h - 64)
      x2, y2 = x1 + rng.integers(16, 64), y1 + rng.integers(16, 64)
      mask = np.zeros((h, w, 1), np.uint8)
      mask[y1:y2, x1:x2] = 1
      objects["box"].append(np.float32([x1, y1, x2, y2]))
      objects["class"].append(int(rng.choice(things)))
      objects["is_crowd"].append(False)
      objects["mask"].append(mask)
    records.append({"image": image, "objects": objects})
  return records


def batch_bytes(source, ops, batch_size, keys, optional_keys):
  """(first global batch, its bytes) of the training iterator."""
  iterator = pipeline.train_iterator(source, ops, batch_size, seed=0, keys=keys,
                                     optional_keys=optional_keys)
  try:
    batch = next(iterator)
  finally:
    iterator.close()
  return batch, sum(int(v.nbytes) for v in batch.values())


def images_per_second(source, ops, batch_size, keys, optional_keys, workers, batches):
  """grain's images/s over `batches` batches after the first (start-up is not throughput)."""
  iterator = pipeline.train_iterator(source, ops, batch_size, seed=0, num_threads=2,
                                     num_workers=workers, keys=keys, optional_keys=optional_keys)
  try:
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    return batches * batch_size / (time.perf_counter() - start)
  finally:
    iterator.close()


def ops_images_per_second(source, ops, count):
  """Images/s of the ops alone, in this thread (no grain, no batching): their host cost."""
  examples = [source[i % len(source)] for i in range(count)]
  start = time.perf_counter()
  for i, example in enumerate(examples):
    ops(example, np.random.default_rng(i))
  return count / (time.perf_counter() - start)


def median_seconds(fn, repeats: int = 5) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def copy_seconds(batch) -> float:
  import jax
  return median_seconds(lambda: jax.block_until_ready(device.put(batch)))


def normalize_seconds(images, mean, std) -> float:
  import jax
  fn = jax.jit(functools.partial(device.normalize, mean=mean, std=std))
  on_device = device.put(images)
  return median_seconds(lambda: jax.block_until_ready(fn(on_device)))


def compare(table, name, config, dataset, source, workers, batches, notes):
  """Adds the rows of one config: bytes per step, copy time, images/s per worker count."""
  task = get_task(config)
  after = task.data_ops(config, config.data.train_ops, dataset)
  before = transforms.compose(after, transforms.normalize(mean=tuple(config.data.mean),
                                                          std=tuple(config.data.std)))
  size = config.data.batch_size
  keys = (task.train_keys, task.optional_train_keys)
  (old_batch, old_bytes), (new_batch, new_bytes) = (
      batch_bytes(source, ops, size, *keys) for ops in (before, after))
  assert old_batch["image"].dtype == np.float32 and new_batch["image"].dtype == np.uint8
  mib = lambda n: f"{n / 2**20:.1f}"
  table.add(name, f"bytes per step (MiB), batch {size}", mib(old_bytes), mib(new_bytes),
            f"{old_bytes / new_bytes:.2f}")
  old_copy, new_copy = copy_seconds(old_batch), copy_seconds(new_batch)
  table.add(name, "device_put of one batch (ms, CPU device)", f"{old_copy * 1e3:.1f}",
            f"{new_copy * 1e3:.1f}", f"{old_copy / new_copy:.2f}")
  old, new = (ops_images_per_second(source, ops, 2 * size) for ops in (before, after))
  table.add(name, "ops img/s, one thread, no grain", f"{old:.1f}", f"{new:.1f}",
            f"{new / old:.2f}")
  for count in workers:
    # Interleaved, twice each, so that a change of load hits both alike.
    runs = {"before": [], "after": []}
    for _ in range(2):
      for label, ops in (("before", before), ("after", after)):
        runs[label].append(images_per_second(source, ops, size, *keys, count, batches))
    old, new = max(runs["before"]), max(runs["after"])
    table.add(name, f"pipeline img/s, {count} worker processes", f"{old:.1f}", f"{new:.1f}",
              f"{new / old:.2f}")
  seconds = normalize_seconds(new_batch["image"], tuple(config.data.mean),
                              tuple(config.data.std))
  notes.append(f"{name}: normalizing one uint8 batch on the device (jitted lookup, here on "
               f"the CPU) takes {seconds * 1e3:.1f} ms; pipeline: {after.spec}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=48, help="synthetic ADE20K images")
  parser.add_argument("--batches", type=int, default=8, help="timed batches per grain run")
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  report.add_json_argument(parser)
  args = parser.parse_args()

  table = report.Table(["pipeline", "measure", "before: float32, host-normalized",
                        "after: uint8, device-normalized", "ratio (before / after; img/s: "
                        "after / before)"])
  notes = [f"Load average (1 min) at the start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
           "CPUs: other work shared the machine, which lowers img/s alike for both forms."]
  with tempfile.TemporaryDirectory() as tmp:
    manual = os.path.join(tmp, "manual")
    os.makedirs(manual)
    write_archive(os.path.join(manual, "ADEChallengeData2016.zip"), args.images)
    config = pspnet_ade20k.get_config()
    dataset = get_dataset("ade20k", os.path.join(tmp, "data"), manual)
    compare(table, "pspnet_ade20k", config, dataset, dataset.source("train"), args.workers,
            args.batches, notes)
  config = maskrcnn_coco.get_config()
  compare(table, "maskrcnn_coco", config, dataset_classes("coco_instances"),
          coco_like_records(max(args.images // 2, 4)), args.workers[:1], max(args.batches // 2, 1),
          notes)
  table.finish(
      args.json, benchmark="uint8 to the device: bytes per step and input-pipeline img/s",
      setup=(f"Each config's training pipeline in two forms, measured in the same run: "
             "before = the task's ops then `normalize` on the host (float32 images, what segjax "
             "sent until now), after = the task's ops alone (uint8 images, normalized inside "
             "the jitted step). pspnet_ade20k: a synthetic ADEChallengeData2016.zip of "
             f"{args.images} JPEG images at ADE20K's usual sizes prepared with the real `ade20k` "
             "builder; maskrcnn_coco: synthetic COCO-like records (640x480, 12 objects with "
             "masks) in memory. Bytes per step: one global batch of the config's size, all "
             "keys the train step gets. img/s: grain with 2 reader threads per process and "
             f"the given worker processes, the better of 2 interleaved runs of {args.batches} "
             "batches (ADE20K; half as many for COCO) after the first. device_put: one batch "
             "to the default device, median of 5; on a CPU that is a memory copy, on a GPU or "
             "TPU it crosses the host link, whose time the byte ratio then sets."),
      notes=notes)


if __name__ == "__main__":
  main()
