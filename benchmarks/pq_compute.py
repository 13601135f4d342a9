"""Seconds per 1000 images of segjax's panoptic quality against a segment-by-segment reference.

  python benchmarks/pq_compute.py                      # 150 images of 512x512
  python benchmarks/pq_compute.py --images 500 --things 30

Writes a synthetic COCO panoptic set (gt.json + PNGs, pred.json + PNGs; 80
thing and 53 stuff classes like COCO; per image 3 stuff regions, --things
instances with crowd, VOID holes, a perturbed prediction with missed, shifted,
relabelled and spurious segments) into a temp dir. Times, on the same files:
`pq_compute` with 1 and 2 worker threads, and `pq_reference.reference_pq_compute`
(one boolean mask per segment, one loop per segment pair, as REFERENCE.md states
the rules). Both read their PNGs, so the file timings include PNG decoding; the
in-memory lines time the per-image scoring alone on arrays already decoded
(`PQAccumulator.add` against `reference_image_counts`). Results are checked equal.
`--json PATH` also writes the table as benchmarks/report.py's JSON.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pq_reference  # noqa: E402
import report  # noqa: E402
from segjax.metrics import panoptic  # noqa: E402


def best_time(fn, repeats):
  """(min seconds over repeats, last result)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return min(times), result


def check_equal(actual, expected):
  for group in ("All", "Things", "Stuff"):
    assert actual[group]["n"] == expected[group]["n"]
    for key in ("pq", "sq", "rq"):
      np.testing.assert_allclose(actual[group][key], expected[group][key], rtol=1e-12)
  for category_id, scores in expected["per_class"].items():
    for key in ("pq", "sq", "rq"):
      np.testing.assert_allclose(actual["per_class"][category_id][key], scores[key], rtol=1e-12)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=150)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--things", type=int, default=16, help="thing instances per image")
  parser.add_argument("--repeats", type=int, default=2, help="timings are the best of these")
  report.add_json_argument(parser)
  args = parser.parse_args()

  categories = pq_reference.make_categories(num_things=80, num_stuff=53)
  with tempfile.TemporaryDirectory() as root:
    gt_json, pred_json = pq_reference.write_dataset(root, args.images, args.size, args.size,
                                                    categories, args.things, seed=0)
    gt_folder, pred_folder = os.path.join(root, "gt"), os.path.join(root, "pred")
    with open(gt_json) as f:
      gt_anns = json.load(f)["annotations"]
    with open(pred_json) as f:
      pred_anns = {a["image_id"]: a for a in json.load(f)["annotations"]}
    mean_gt, mean_pred = np.mean(
        [(len(a["segments_info"]), len(pred_anns[a["image_id"]]["segments_info"]))
         for a in gt_anns], axis=0)
    setup = (f"{args.images} random panoptic pairs of {args.size}x{args.size} PNGs (80 thing and "
             f"53 stuff classes like COCO, 3 stuff regions and {args.things} thing instances per "
             f"image with crowd and VOID; {mean_gt:.1f} ground-truth and {mean_pred:.1f} "
             "predicted segments per image on average) scored by `segjax.metrics.pq_compute` and "
             "by the straightforward reference in benchmarks/pq_reference.py (one boolean mask "
             "per segment, one loop per segment pair, REFERENCE.md's rules). Both read their "
             "PNGs, so file rows include PNG decoding; the in-memory rows time the per-image "
             "scoring alone on decoded arrays (`PQAccumulator.add` against "
             "`reference_image_counts`). Workers are threads of this process; the reference uses "
             "one. 'PNG reading alone' is the read_id_png share of pq_compute, a floor for 1 "
             f"worker. Best of {args.repeats} runs.")
    print(f"{args.images} images of {args.size}x{args.size}, mean segments per image: "
          f"{mean_gt:.1f} gt, {mean_pred:.1f} predicted; numpy {np.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")

    timings = {}
    timings["reference"], expected = best_time(lambda: pq_reference.reference_pq_compute(
        gt_json, pred_json, gt_folder, pred_folder), args.repeats)
    for workers in (1, 2):
      timings[f"pq_compute, {workers} worker{'s' * (workers > 1)}"], result = best_time(
          lambda: panoptic.pq_compute(gt_json, pred_json, num_workers=workers), args.repeats)
      check_equal(result, expected)

    def read_pair(gt_ann):
      pred_ann = pred_anns[gt_ann["image_id"]]
      return (panoptic.read_id_png(os.path.join(gt_folder, gt_ann["file_name"])),
              gt_ann["segments_info"],
              panoptic.read_id_png(os.path.join(pred_folder, pred_ann["file_name"])),
              pred_ann["segments_info"])

    def read_only():
      for gt_ann in gt_anns:
        read_pair(gt_ann)

    timings["PNG reading alone, 1 thread"], _ = best_time(read_only, args.repeats)
    arrays = [read_pair(gt_ann) for gt_ann in gt_anns]

    def accumulate():
      accumulator = panoptic.PQAccumulator(categories)
      for gt_ids, gt_segments, pred_ids, pred_segments in arrays:
        accumulator.add(gt_ids, gt_segments, pred_ids, pred_segments)
      return accumulator.result()

    def reference_in_memory():
      totals = {}
      for image in arrays:
        for category_id, counts in pq_reference.reference_image_counts(*image).items():
          totals[category_id] = [a + b for a, b in zip(totals.get(category_id, [0] * 4), counts)]
      return pq_reference.reference_average(totals, categories)

    timings["reference in memory"], reference_memory = best_time(reference_in_memory,
                                                                 args.repeats)
    timings["PQAccumulator in memory"], result = best_time(accumulate, args.repeats)
    check_equal(reference_memory, expected)
    check_equal(result, expected)

  scale = 1000 / args.images
  table = report.Table(["timed", "s / 1000 images", "ratio (its reference s / this s)"])
  for name, seconds in timings.items():
    reference = timings["reference in memory" if "memory" in name else "reference"]
    table.add(name, f"{seconds * scale:.2f}", f"{reference / seconds:.1f}")
  table.finish(args.json, benchmark="Panoptic quality: pq_compute against a per-segment reference",
               setup=setup,
               notes=[f"PQ {100 * expected['All']['pq']:.2f}; pq_compute's and PQAccumulator's "
                      "results (all, things, stuff, per class) equal to the reference's"])


if __name__ == "__main__":
  main()
