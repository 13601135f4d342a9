"""eval.py and predict.py on a checkpoint trained here: metrics equal the
training evaluation's, per-image inference equals batched inference, and
predictions are written at each input's own size."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import unet_shapes
from segjax.data import shapes
from segjax.commands.evaluate import evaluate_checkpoint
from segjax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPLIT = "validation[:16]"


def _config(data_dir, mode="batched"):
  config = unet_shapes.get_config("smoke")
  config.unlock()
  config.data.data_dir = data_dir
  config.data.eval_split = SPLIT
  config.total_steps, config.checkpoint_every, config.eval_every = 6, 6, 6
  config.inference.mode = mode
  config.lock()
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("commands")
  data_dir, workdir = str(root / "tfds"), str(root / "run")
  result = trainer.train_and_evaluate(_config(data_dir), workdir)
  return data_dir, workdir, result


def _cli(script, *args, data_dir):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run(
      [sys.executable, os.path.join(REPO, script), "--config", "configs/unet_shapes.py:smoke",
       f"--config.data.data_dir={data_dir}", *args], cwd=REPO, env=env, capture_output=True,
      text=True, timeout=600)


def test_eval_command_reproduces_training_evaluation(trained, tmp_path):
  data_dir, workdir, result = trained
  output = tmp_path / "metrics.json"
  run = _cli("eval.py", "--checkpoint", workdir, f"--output={output}",
             f"--config.data.eval_split={SPLIT}", data_dir=data_dir)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "mIoU" in run.stdout
  metrics = json.load(open(output))
  assert metrics["step"] == 6 and metrics["mode"] == "batched"
  np.testing.assert_allclose(metrics["mIoU"], result["mIoU"], rtol=1e-12)
  assert list(metrics["IoU"]) == list(shapes.CLASS_NAMES)


def test_whole_image_inference_equals_batched(trained):
  data_dir, workdir, result = trained
  metrics, _ = evaluate_checkpoint(_config(data_dir, "whole"),
                                   os.path.join(workdir, "checkpoints", "6"))
  assert metrics["mode"] == "whole"
  np.testing.assert_allclose(metrics["mIoU"], result["mIoU"], rtol=1e-12)
  np.testing.assert_allclose(metrics["aAcc"], result["aAcc"], rtol=1e-12)


def test_predict_command_writes_labels_and_overlays(trained, tmp_path):
  data_dir, workdir, _ = trained
  inputs = tmp_path / "in"
  inputs.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(inputs / "a.png")
  Image.fromarray(rng.integers(0, 256, (97, 61, 3), dtype=np.uint8)).save(inputs / "b.jpg")
  (inputs / "notes.txt").write_text("not an image")
  run = _cli("predict.py", "--checkpoint", workdir, f"--input={inputs}",
             f"--output={tmp_path / 'out'}", data_dir=data_dir)
  assert run.returncode == 0, run.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "a_overlay.jpg", "b.png",
                                                   "b_overlay.jpg"]
  for name, size in (("a", (70, 50)), ("b", (61, 97))):
    label = Image.open(tmp_path / "out" / f"{name}.png")
    assert label.mode == "P" and label.size == size
    assert np.asarray(label).max() < 7
    assert Image.open(tmp_path / "out" / f"{name}_overlay.jpg").size == size


def test_commands_report_bad_input_in_one_sentence(trained, tmp_path):
  data_dir, workdir, _ = trained
  run = _cli("eval.py", f"--checkpoint={tmp_path / 'nothing'}", data_dir=data_dir)
  assert run.returncode != 0 and "does not exist" in run.stderr
  assert "Traceback" not in run.stderr
  (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
  run = _cli("predict.py", "--checkpoint", workdir, f"--input={tmp_path / 'bad.png'}",
             f"--output={tmp_path / 'out'}", data_dir=data_dir)
  assert run.returncode != 0 and "Cannot read" in run.stderr and "bad.png" in run.stderr
  assert "Traceback" not in run.stderr


def test_training_evaluates_per_image_when_configured(trained, tmp_path):
  """inference.mode "whole" during training gives the batched evaluation's numbers."""
  data_dir, _, result = trained
  config = _config(data_dir, "whole")
  whole = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  np.testing.assert_allclose(whole["mIoU"], result["mIoU"], rtol=1e-12)
