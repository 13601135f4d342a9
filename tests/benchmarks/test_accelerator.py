"""benchmarks/accelerator.py on the CPU at tiny sizes: its child processes measure real steps,
its JSON and markdown hold them, its FLOPs are the train step's, its ratios are the rows'."""
import functools
import json
import statistics

import jax
import jax.numpy as jnp
import pytest

from benchmarks import accelerator
from segjax.models import build_model

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One tiny run (U-Net, float32, segjax and PyTorch eager; segjax's step compiled first in
  another process, the timed run loading it from the cache): (tables returned, JSON path,
  markdown path)."""
  folder = tmp_path_factory.mktemp("accelerator")
  json_path, markdown_path = folder / "accelerator.json", folder / "accelerator.md"
  tables = accelerator.main(["--tiny", "--cases", "unet", "--dtypes", "float32", "--sides",
                             "segjax", "torch", "--steps", "2", "--prewarm-jobs", "1",
                             "--json", str(json_path), "--markdown", str(markdown_path)])
  return tables, json_path, markdown_path


def _rows(table):
  return [dict(zip(table["columns"], row)) for row in table["rows"]]


def test_json_holds_both_tables_of_measured_rows(run):
  tables, json_path, _ = run
  assert json.loads(json_path.read_text()) == tables
  detail, summary = tables
  assert [t["benchmark"] for t in tables] == ["accelerator", "accelerator_summary"]
  rows = _rows(detail)
  assert [(r["implementation"], r["dtype"]) for r in rows] == [("segjax", "float32"),
                                                               ("torch", "float32")]
  for row in rows:
    assert row["note"] == "", row  # no error
    seconds = float(row["s/step (median)"])
    assert seconds > 0 and row["steps timed"] == "2"
    assert float(row["images/s"]) == pytest.approx(2 / seconds, rel=0.01, abs=0.01)
    assert float(row["peak memory (GB)"]) > 0.05
    assert row["memory measure"] == "process peak RSS"
    assert row["MFU (bf16 peak)"] == "unknown peak"  # a CPU is in no peak table
  assert float(rows[0]["compile (s)"]) > 0
  assert float(rows[1]["segjax speed / this"]) == pytest.approx(
      float(rows[1]["s/step (median)"]) / float(rows[0]["s/step (median)"]), rel=0.02)
  assert any("unknown peak" in note for note in detail["notes"])
  assert not any(note.startswith("skipped") for note in detail["notes"])
  (prewarm,) = [note for note in detail["notes"] if "--prewarm-jobs" in note]
  assert "failed" not in prewarm

  (line,) = _rows(summary)
  assert line["segjax images/s"] == rows[0]["images/s"]
  assert line["torch eager images/s"] == rows[1]["images/s"]
  assert line["torch.compile images/s"] == "-"  # not run
  assert line["segjax / eager"] == rows[1]["segjax speed / this"]


def test_flops_are_the_train_steps(run):
  """XLA's FLOPs of the step: forward + backward, 2 to 4 times those of the forward pass
  alone (counted here from the model itself)."""
  rows = _rows(run[0][0])
  step_flops = float(rows[0]["XLA GFLOP/step"]) * 1e9
  model = build_model("unet", 21, accelerator.TINY["unet"][3])
  images = jnp.zeros((2, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=True), jax.random.key(0), images)
  forward = jax.jit(functools.partial(model.apply, train=False)).lower(
      variables, images).cost_analysis()
  forward = (forward[0] if isinstance(forward, (list, tuple)) else forward)["flops"]
  assert 2 * forward < step_flops < 4 * forward


def test_markdown_has_the_tables(run):
  tables, _, markdown_path = run
  text = markdown_path.read_text()
  for table in tables:
    assert f"## {table['benchmark']}" in text
    assert "| " + " | ".join(table["columns"]) + " |" in text
    for row in table["rows"]:
      assert "| " + " | ".join(row) + " |" in text


@pytest.mark.parametrize("kind, name, bf16", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 989.4),
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 756.5),
    ("NVIDIA H200", "NVIDIA H200 SXM", 989.4),
    ("NVIDIA A100-SXM4-40GB", "NVIDIA A100", 312.0),
    ("NVIDIA L40S", "NVIDIA L40S", 362.05),
    ("NVIDIA L4", "NVIDIA L4", 121.0),
    ("TPU v4", "TPU v4", 275.0),
    ("TPU v5 lite", "TPU v5e", 197.0),
    ("TPU v5p", "TPU v5p", 459.0),
    ("TPU v6 lite", "TPU v6e (Trillium)", 918.0),
])
def test_peak_table(kind, name, bf16):
  peak = accelerator.peak(kind)
  assert (peak["name"], peak["bfloat16"]) == (name, bf16)


def test_unknown_devices_have_no_peak():
  assert accelerator.peak("cpu") is None
  assert accelerator.peak("Tesla T4") is None


def test_mfu_against_the_bf16_peak():
  args = accelerator.argparse.Namespace(tiny=False)
  report = object.__new__(accelerator.Report)
  report.args, report.peaks = args, accelerator.peak("NVIDIA H100 80GB HBM3")
  rate, cell = report.mfu(2e12, 0.01)
  assert rate == pytest.approx(200.0) and cell == f"{100 * 200 / 989.4:.1f}%"
  report.peaks = None
  assert report.mfu(2e12, 0.01)[1] == "unknown peak"
  assert report.mfu(None, 0.01) == (None, "-")


def test_plan_puts_maskrcnn_torch_compile_last():
  runs = accelerator.plan(["pspnet", "maskrcnn"], ["bfloat16", "float32"], accelerator.SIDES)
  assert runs[:3] == [(side, "pspnet", "bfloat16") for side in accelerator.SIDES]
  assert runs[-2:] == [("torch.compile", "maskrcnn", "bfloat16"),
                       ("torch.compile", "maskrcnn", "float32")]
  assert len(runs) == len(set(runs)) == 12


def test_torch_device_says_why_none():
  torch = pytest.importorskip("torch")
  assert accelerator._torch_device(torch, "cpu") == "cpu"
  with pytest.raises(RuntimeError, match="only CUDA GPUs and CPUs"):
    accelerator._torch_device(torch, "tpu")


def test_bad_arguments_stop_before_any_run():
  with pytest.raises(SystemExit):
    accelerator.main(["--steps", "0"])


def test_timer_stops_at_its_time_budget():
  timer = accelerator.Timer(warmup=1, steps=100, seconds=0.0)
  calls = []
  times = timer(lambda: calls.append(1))
  assert len(times) == 1 and len(calls) == 2
  assert statistics.median(accelerator.Timer(0, 3, 10.0)(lambda: None)) >= 0


def test_maskrcnn_benchmark_states_the_models_default_mask_slots():
  from benchmarks import maskrcnn_train_step
  from segjax.models.mask_rcnn import MaskRCNN
  assert maskrcnn_train_step.DEFAULT_MASK_SLOTS == MaskRCNN.mask_slots
