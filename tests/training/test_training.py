"""End to end: resume equals an uninterrupted run, the CLI trains and its loss
falls, and bad input stops with one clear sentence."""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import unet_shapes
from segjax.tasks import get_task
from segjax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _config(data_dir, **overrides):
  config = unet_shapes.get_config("smoke")
  config.unlock()
  config.data.data_dir = data_dir
  config.data.eval_split = "validation[:32]"
  config.total_steps, config.checkpoint_every, config.eval_every = 8, 4, 8
  for key, value in overrides.items():
    config[key] = value
  config.lock()
  return config


class Killed(Exception):
  pass


def test_killed_and_resumed_run_equals_uninterrupted_run(data_dir, tmp_path, monkeypatch):
  config = _config(data_dir)
  straight = trainer.train_and_evaluate(config, str(tmp_path / "straight"))

  # Kill the second run after step 6: its last checkpoint is step 4.
  real_to_global, calls = trainer.pipeline.to_global, []
  def dying_to_global(batch, sharding):
    calls.append(1)
    if len(calls) > 6:
      raise Killed()
    return real_to_global(batch, sharding)
  monkeypatch.setattr(trainer.pipeline, "to_global", dying_to_global)
  with pytest.raises(Killed):
    trainer.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["4"]
  monkeypatch.setattr(trainer.pipeline, "to_global", real_to_global)
  resumed = trainer.train_and_evaluate(config, str(tmp_path / "resumed"))

  assert int(resumed["state"].step) == int(straight["state"].step) == 8
  for a, b in zip(jax.tree.leaves(jax.device_get(straight["state"])),
                  jax.tree.leaves(jax.device_get(resumed["state"]))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert resumed["mIoU"] == pytest.approx(straight["mIoU"], abs=1e-6)


def test_checkpoint_without_data_position_would_differ(data_dir, tmp_path):
  """Control for the test above: a run on other data (another seed, what
  resuming at the wrong data position amounts to) ends elsewhere."""
  a = trainer.train_and_evaluate(_config(data_dir), str(tmp_path / "a"))
  b = trainer.train_and_evaluate(_config(data_dir, seed=1), str(tmp_path / "b"))
  diffs = [np.max(np.abs(x - y)) for x, y in zip(jax.tree.leaves(jax.device_get(a["state"].params)),
                                                jax.tree.leaves(jax.device_get(b["state"].params)))]
  assert max(diffs) > 1e-4


def _train_cli(*args, env_extra=None):
  env = dict(os.environ, PYTHONPATH=REPO, **(env_extra or {}))
  return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)


def test_cli_smoke_trains_and_loss_falls(data_dir, tmp_path):
  workdir = tmp_path / "run"
  result = _train_cli("--config", "configs/unet_shapes.py:smoke", "--workdir", str(workdir),
                      f"--config.data.data_dir={data_dir}", "--config.total_steps=40",
                      "--config.eval_every=40", "--config.checkpoint_every=20")
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert len(losses) == 8
  assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses
  assert any("eval/mIoU" in r for r in records)
  assert "mIoU" in result.stdout  # the per-class table is printed
  assert sorted(os.listdir(workdir / "checkpoints")) == ["20", "40"]
  assert os.listdir(workdir / "tensorboard")
  assert os.listdir(workdir / "predictions") == ["step_0000040.png"]
  assert os.listdir(workdir / "compilation_cache")  # compiled steps, for a resumed run
  # The same command again finds the finished run and only evaluates it.
  again = _train_cli("--config", "configs/unet_shapes.py:smoke", "--workdir", str(workdir),
                     f"--config.data.data_dir={data_dir}", "--config.total_steps=40",
                     "--config.eval_every=40", "--config.checkpoint_every=20")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "already trained to step 40" in again.stderr


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/unet_shapes.py:smoke", "--config.data.nmae=x"], "nmae"),
    (["--config", "configs/unet_shapes.py:smoke", "--config.model.name=segformer"],
     r"Unknown model 'segformer'; known models: [a-z0-9_, ]*\bpspnet\b[a-z0-9_, ]*\bunet\b"),
    (["--config", "configs/unet_shapes.py:smoke", "--config.data.name=voc"],
     r"Unknown dataset 'voc'"),
    (["--config", "configs/unet_shapes.py:tiny"], "Unknown variant 'tiny'"),
    # (no pretrained encoder: it is fetched first; tests/convert/test_pretrained.py)
    (["--config", "configs/pspnet_ade20k.py", "--config.model.init_from="],
     r"missing:\n +/\S+/ADEChallengeData2016.zip: "),
])
def test_cli_bad_config_stops_with_one_sentence(data_dir, tmp_path, args, message):
  result = _train_cli(*args, "--workdir", str(tmp_path / "w"),
                      env_extra={"TFDS_DATA_DIR": data_dir})
  assert result.returncode != 0
  assert re.search(message, result.stderr), result.stderr
  assert "Traceback" not in result.stderr


def test_cli_refuses_workdir_of_another_model(data_dir, tmp_path):
  workdir = str(tmp_path / "w")
  trainer.train_and_evaluate(_config(data_dir, total_steps=4), workdir)
  result = _train_cli("--config", "configs/pspnet_ade20k.py:smoke", "--workdir", workdir,
                      f"--config.data.data_dir={data_dir}")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert ("checkpoints" in result.stderr and "'unet'" in result.stderr
          and "'pspnet'" in result.stderr and "new --workdir" in result.stderr)


def test_out_of_range_label_is_reported(data_dir):
  # The embedded dataset has 7 classes; declaring 5 makes labels 5 and 6 invalid.
  from segjax.data import transforms
  config = _config(data_dir)
  spec = trainer.get_dataset(config.data.name, config.data.data_dir)
  ops = get_task(config).data_ops(config, "", spec).spec
  pipeline = transforms.parse_pipeline(ops.replace("num_classes=7", "num_classes=5"))
  with pytest.raises(ValueError, match=r"neither a class id in \[0, 5\) nor the ignore index"):
    for record in spec.source("train[:20]"):
      pipeline(record, np.random.default_rng(0))
