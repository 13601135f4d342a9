"""Runs the benchmark suite and rewrites benchmarks/RESULTS.md from its results.

  python benchmarks/run.py                    # every case, one after another (~30 min here)
  python benchmarks/run.py --only nms pq_compute
  python benchmarks/run.py --render           # rewrite RESULTS.md from the stored results

Each case is one of the scripts in benchmarks/, run as a child process with `--json`; each
runs segjax and its PyTorch or plain reference in the same run and reports ratios. A case's
tables, with the machine and versions it ran on and the date, are kept in
benchmarks/results/<case>.json, and RESULTS.md is rendered from all stored cases, so `--only`
refreshes some sections and keeps the others (each section says when and where it was
measured). Cases run one at a time: run the suite on an otherwise idle machine.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(BENCHMARKS, "results")
RESULTS_MD = os.path.join(BENCHMARKS, "RESULTS.md")

# name -> (section title, script and arguments)
CASES = {
    "train_step": ("Train steps: U-Net, FCN-8s, PSPNet-R50, DeepLabV3+-R50 against PyTorch",
                   ["train_step.py", "--options"]),
    "maskrcnn": ("Train step: Mask R-CNN R50-FPN against torchvision",
                 ["maskrcnn_train_step.py", "--size", "512", "--batch", "2", "--repeats", "2",
                  "--warmup", "1"]),
    "maskrcnn_slots128": ("Train step: Mask R-CNN R50-FPN against torchvision, 128 mask slots",
                          ["maskrcnn_train_step.py", "--size", "512", "--batch", "2",
                           "--repeats", "2", "--warmup", "1", "--mask-slots", "128"]),
    "unet_small": ("Train step: small U-Net (width 8) against PyTorch", ["unet_train_step.py"]),
    "roi_align": ("RoIAlign (4 FPN levels) against torchvision",
                  ["roi_align.py", "--rois", "512,2000", "--repeats", "3"]),
    "nms": ("NMS against a greedy PyTorch NMS",
            ["nms.py", "--sizes", "1000,5000,20000", "--repeats", "3"]),
    "pq_compute": ("Panoptic quality: pq_compute against the per-segment reference",
                   ["pq_compute.py", "--images", "100", "--repeats", "2"]),
    "data_pipeline": ("ADE20K input pipeline: grain against PyTorch's DataLoader",
                      ["data_pipeline.py", "--images", "48", "--batches", "8", "--workers",
                       "0", "2", "--no-train-step"]),
    "device_input": ("uint8 to the device: bytes per step and input-pipeline img/s",
                     ["device_input.py", "--images", "48", "--batches", "8", "--workers", "0",
                      "2"]),
    "mmseg_inference": ("Whole-image inference: PSPNet-R50 ADE20K against mmsegmentation",
                        ["mmseg_inference.py", "--photos", "coffee,astronaut", "--repeats", "3"]),
    "sliding_window": ("Sliding-window inference of a 1024x2048 image",
                       ["sliding_window.py", "--sizes", "1024x2048", "--window-batch", "1,4",
                        "--repeats", "2"]),
    "sam": ("Segment Anything ViT-B inference against segment_anything",
            ["sam.py", "--variant", "vit_b", "--size", "1024", "--queries", "64", "--repeats",
             "2"]),
    "eval_buckets": ("ADE20K-shaped evaluation: one 2048x2048 shape against size buckets",
                     ["eval_buckets.py", "--images", "4", "--batch", "1", "--width", "8"]),
}


def run_case(name):
  """Runs case `name`; returns its stored record (tables, command, machine, date, seconds)."""
  sys.path.insert(0, BENCHMARKS)
  import report
  _, command = CASES[name]
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "result.json")
    argv = [sys.executable, os.path.join(BENCHMARKS, command[0]), *command[1:], "--json", out]
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=os.path.dirname(BENCHMARKS), capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
      sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
      raise SystemExit(f"benchmark case {name!r} failed (exit {done.returncode}): "
                       f"{' '.join(argv[1:])}")
    with open(out) as f:
      tables = json.load(f)
  return {"case": name, "command": "python benchmarks/" + " ".join(command),
          "date": datetime.date.today().isoformat(), "seconds": round(seconds),
          "machine": report.machine(), "tables": tables if isinstance(tables, list) else [tables]}


def _markdown_table(columns, rows):
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)


def _machine_line(machine):
  return ", ".join(f"{key} {value}" for key, value in machine.items())


def render(records):
  """RESULTS.md's text from the stored case records, in CASES order."""
  parts = ["# Benchmark results", "",
           "Generated by `python benchmarks/run.py` from benchmarks/results/*.json: do not edit "
           "by hand. Every figure was measured by the command named in its section, with its "
           "PyTorch or plain reference in the same run; each ratio column says what it "
           "divides (in most, above 1 favours segjax). The "
           "machines these ran on are shared and noisy: differences under ~15% between runs "
           "are not significant.", ""]
  for name, (title, _) in CASES.items():
    record = records.get(name)
    parts += [f"## {title}", ""]
    if record is None:
      parts += [f"Not measured yet: `python benchmarks/run.py --only {name}`.", ""]
      continue
    parts += [f"`{record['command']}`, {record['date']}, {record['seconds']} s. "
              f"Machine: {_machine_line(record['machine'])}.", ""]
    for table in record["tables"]:
      parts += [table["setup"], "", _markdown_table(table["columns"], table["rows"]), ""]
      parts += [f"- {note}" for note in table.get("notes", [])]
      if table.get("notes"):
        parts.append("")
  return "\n".join(parts)


def load_records():
  records = {}
  for name in CASES:
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    if os.path.exists(path):
      with open(path) as f:
        records[name] = json.load(f)
  return records


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", nargs="+", choices=list(CASES), metavar="NAME",
                      help=f"run only these cases (of {', '.join(CASES)})")
  parser.add_argument("--render", action="store_true",
                      help="run nothing; rewrite RESULTS.md from the stored results")
  args = parser.parse_args()
  os.makedirs(RESULTS_DIR, exist_ok=True)
  for name in [] if args.render else (args.only or list(CASES)):
    print(f"[{datetime.datetime.now():%H:%M:%S}] {name}: {CASES[name][0]}", flush=True)
    record = run_case(name)
    with open(os.path.join(RESULTS_DIR, f"{name}.json"), "w") as f:
      json.dump(record, f, indent=1)
    for table in record["tables"]:
      print(_markdown_table(table["columns"], table["rows"]), flush=True)
  with open(RESULTS_MD, "w") as f:
    f.write(render(load_records()))
  print(f"wrote {os.path.relpath(RESULTS_MD)}")


if __name__ == "__main__":
  main()
