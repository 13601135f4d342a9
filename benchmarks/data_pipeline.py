"""Images/s of the ADE20K training input pipeline beside the train step's.

  python benchmarks/data_pipeline.py                 # 96 images, workers 0 1 2
  python benchmarks/data_pipeline.py --no-train-step # pipeline only

Writes a synthetic ADEChallengeData2016.zip (JPEG images of ADE20K's usual
sizes, short side 384-768 and aspect up to 1.6, PNG labels with 151 ids) into a
temp dir, prepares it with the real `ade20k` builder, then runs the
`configs/pspnet_ade20k.py` training pipeline (decode, reduce_zero_label,
random resize of (2048, 512) by 0.5-2, 512x512 crop with cat_max_ratio 0.75,
flip, photometric distortion, pad; uint8 out, normalized on the device by the train
step since benchmarks/device_input.py's change) through grain with 0..N worker
processes. The reference is PyTorch's DataLoader running the same ops with the
same number of workers. The train step is PSPNet-R50-D8's at 512x512 (batch 2,
float32) on the same machine. `--json PATH` also writes the table as
benchmarks/report.py's JSON.
"""
import argparse
import io
import os
import sys
import tempfile
import time
import zipfile

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402
from configs import pspnet_ade20k  # noqa: E402
from segjax.data import pipeline, transforms  # noqa: E402
from segjax.data.sources import get_dataset  # noqa: E402
from segjax.tasks import get_task  # noqa: E402


def write_archive(path: str, num_images: int, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  with zipfile.ZipFile(path, "w") as zf:
    for folder, count in (("training", num_images), ("validation", 2)):
      for i in range(count):
        short = int(rng.integers(384, 769))
        long = int(short * rng.uniform(1.0, 1.6))
        h, w = (short, long) if rng.random() < 0.7 else (long, short)
        # Smooth colour fields and blocky regions: JPEG/PNG sizes like real photos.
        coarse = rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))
        image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
        label = rng.integers(0, 151, (h // 64 + 1, w // 64 + 1), dtype=np.uint8)
        label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
        stem = f"ADE_{folder[:5]}_{i + 1:08d}"
        for kind, array, fmt, ext in (("images", image, "JPEG", "jpg"),
                                      ("annotations", label, "PNG", "png")):
          buffer = io.BytesIO()
          Image.fromarray(array).save(buffer, format=fmt, quality=90)
          zf.writestr(f"ADEChallengeData2016/{kind}/{folder}/{stem}.{ext}", buffer.getvalue())


def grain_images_per_second(source, ops, batch, num_workers, num_batches):
  iterator = pipeline.train_iterator(source, ops, batch, seed=0, num_threads=2,
                                     num_workers=num_workers)
  try:
    next(iterator)  # start-up (workers, first decode) is not throughput
    start = time.perf_counter()
    for _ in range(num_batches):
      next(iterator)
    return num_batches * batch / (time.perf_counter() - start)
  finally:
    iterator.close()


class _TorchDataset:
  def __init__(self, source, ops):
    self.source, self.ops = source, ops

  def __len__(self):
    return 10**9

  def __getitem__(self, i):
    example = transforms.parse_pipeline(self.ops)(self.source[i % len(self.source)],
                                                  np.random.default_rng(i))
    return {k: example[k] for k in pipeline.MODEL_KEYS}


def torch_images_per_second(source, ops, batch, num_workers, num_batches):
  import torch
  loader = torch.utils.data.DataLoader(_TorchDataset(source, ops), batch_size=batch,
                                       num_workers=num_workers, shuffle=False)
  iterator = iter(loader)
  next(iterator)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  return num_batches * batch / (time.perf_counter() - start)


def train_step_images_per_second(config):
  import models as model_bench  # benchmarks/models.py
  options = dict(config.model.options)
  result = model_bench.bench_segjax(config.model.name, options, size=512, batch=2,
                                    num_steps=2, flops_size=512)
  return result["img_s"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=96)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--batches", type=int, default=4)
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--no-train-step", action="store_true")
  report.add_json_argument(parser)
  args = parser.parse_args()

  config = pspnet_ade20k.get_config()
  with tempfile.TemporaryDirectory() as tmp:
    manual = os.path.join(tmp, "manual")
    os.makedirs(manual)
    write_archive(os.path.join(manual, "ADEChallengeData2016.zip"), args.images)
    dataset = get_dataset("ade20k", os.path.join(tmp, "data"), manual)
    source = dataset.source("train")
    ops = get_task(config).data_ops(config, config.data.train_ops, dataset).spec
    print(f"{os.cpu_count()} CPUs; pipeline: {ops}")
    table = report.Table(["worker processes", "grain img/s", "torch DataLoader img/s",
                          "ratio (grain img/s / torch img/s)"])
    for workers in args.workers:
      ours = grain_images_per_second(source, ops, args.batch, workers, args.batches)
      theirs = torch_images_per_second(source, ops, args.batch, workers, args.batches)
      table.add(workers, f"{ours:.1f}", f"{theirs:.1f}", f"{ours / theirs:.2f}")
  notes = []
  if not args.no_train_step:
    notes.append(f"PSPNet-R50-D8 train step, 512x512, batch 2, float32: "
                 f"{train_step_images_per_second(config):.3f} img/s")
  table.finish(
      args.json, benchmark="ADE20K training input pipeline: grain against torch DataLoader",
      setup=(f"A synthetic ADEChallengeData2016.zip of {args.images} JPEG images at ADE20K's "
             "usual sizes (short side 384-768, aspect up to 1.6; PNG labels with 151 ids) is "
             "prepared with the real `ade20k` builder; the configs/pspnet_ade20k.py training "
             "pipeline (decode, reduce_zero_label, random resize of (2048, 512) by 0.5-2, 512x512 "
             "crop with cat_max_ratio 0.75, flip, photometric distortion, pad; uint8 images, "
             "normalized on the device by the train step) runs in "
             "grain with 2 reader threads per process and the given number of worker processes "
             f"(0: in the main process), batches of {args.batch}, timed over {args.batches} "
             "batches after the first. The reference is PyTorch's DataLoader running the same ops "
             "with the same number of workers."),
      notes=notes)


if __name__ == "__main__":
  main()
