"""A run whose workdir is a gs:// bucket, for real, against a local Cloud Storage
emulator (tests/gcs_emulator.py): train.py writes its checkpoints, metrics,
TensorBoard events, panel and compilation cache there; a damaged latest checkpoint
is set aside in the bucket and the next run resumes from the one before; eval.py's
and predict.py's commands read the gs:// checkpoint and write to the bucket, with the
same results as from a local folder; a profiler trace lands in the bucket. Datasets
stay local: a gs:// data dir, and URL schemes other than gs://, are refused with one
sentence."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from segjax import paths
from segjax.data.sources import get_dataset
from tests import gcs_emulator

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKDIR = f"gs://{gcs_emulator.BUCKET}/run"
SPLIT = "validation[:16]"
# Two train steps, each checkpointed, evaluated at the end; the resumed run goes to 3.
SETTINGS = {"checkpoint_every": 1, "eval_every": 100, "log_every": 1}


@pytest.fixture(scope="module")
def emulator():
  with gcs_emulator.start() as env:
    yield env


def _env(emulator):
  return dict(os.environ, PYTHONPATH=REPO, **emulator)


def _names(emulator, prefix):
  return [n[len(prefix):] for n in gcs_emulator.objects(emulator, prefix)]


def _records(emulator):
  text = gcs_emulator.read(emulator, "run/metrics.jsonl").decode()
  return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def first_run(emulator, tmp_path_factory):
  """train.py with --workdir gs://test-bucket/run, two steps."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "train.py"), "--config",
       "configs/unet_shapes.py:smoke", "--workdir", WORKDIR, f"--config.data.data_dir={data_dir}",
       f"--config.data.eval_split={SPLIT}", "--config.total_steps=2",
       *[f"--config.{k}={v}" for k, v in SETTINGS.items()]],
      cwd=REPO, env=_env(emulator), capture_output=True, text=True, timeout=600)
  return data_dir, result


def test_training_writes_into_the_bucket(emulator, first_run):
  _, result = first_run
  assert result.returncode == 0, result.stderr[-3000:]
  names = _names(emulator, "run/")
  for step in ("1", "2"):
    for item in ("commit_success.txt", "meta/metadata", "state/_METADATA",
                 "state/manifest.ocdbt"):
      assert f"checkpoints/{step}/{item}" in names, names
  assert any(n.startswith("tensorboard/events.out.tfevents.") for n in names), names
  assert "predictions/step_0000002.png" in names
  assert any(n.startswith("compilation_cache/") for n in names), names
  records = _records(emulator)
  assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
  assert [r["step"] for r in records if "eval/mIoU" in r] == [2]
  # Nothing went to a local folder named after the URL.
  assert not os.path.exists(os.path.join(REPO, "gs:"))


def test_resume_eval_and_predict_from_the_bucket(emulator, first_run, tmp_path):
  data_dir, first = first_run
  assert first.returncode == 0, first.stderr[-3000:]
  # Damage the latest checkpoint: the next run must set it aside, never delete it.
  gcs_emulator.delete(emulator, "run/checkpoints/2/state/_METADATA")
  kept = _names(emulator, "run/checkpoints/2/")

  images = tmp_path / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  for name, shape in (("a.png", (40, 56, 3)), ("b.png", (48, 48, 3))):
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(images / name)
  args = {"workdir": WORKDIR, "data_dir": data_dir, "eval_split": SPLIT,
          "overrides": {**SETTINGS, "total_steps": 3}, "images": str(images),
          "cloud_output": f"gs://{gcs_emulator.BUCKET}/predictions",
          "local_output": str(tmp_path / "predictions"),
          "weights": f"gs://{gcs_emulator.BUCKET}/weights/w.npz",
          "cache": f"gs://{gcs_emulator.BUCKET}/cache"}
  run = subprocess.run([sys.executable, "-m", "tests.training.gcs_driver", json.dumps(args)],
                       cwd=REPO, env=_env(emulator), capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  out = json.loads(run.stdout.strip().splitlines()[-1])

  # Resumed from step 1, the damaged step 2 moved whole to damaged_checkpoints/2.
  assert "Resuming from the checkpoint of step 1" in run.stdout
  assert f"moved to {WORKDIR}/damaged_checkpoints/2" in run.stderr
  assert _names(emulator, "run/damaged_checkpoints/2/") == kept
  assert out["step"] == 3
  steps = sorted({n.split("/")[0] for n in _names(emulator, "run/checkpoints/")})
  assert steps == ["2", "3"]  # keep_checkpoints = 2
  records = _records(emulator)
  assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3]
  assert [r["step"] for r in records if "eval/mIoU" in r] == [3]

  # eval.py's command read the gs:// checkpoint: the training evaluation, exactly.
  assert out["eval_output"] == f"{WORKDIR}/eval_validation.json"
  saved = json.loads(gcs_emulator.read(emulator, "run/eval_validation.json"))
  assert saved["step"] == out["eval_step"] == 3
  np.testing.assert_allclose(saved["mIoU"], out["train_mIoU"], rtol=1e-12)
  np.testing.assert_allclose(out["eval_mIoU"], out["train_mIoU"], rtol=1e-12)

  # predict.py's command wrote the same files to the bucket as to a local folder.
  names = ["a.png", "a_overlay.jpg", "b.png", "b_overlay.jpg"]
  assert sorted(os.path.basename(p) for p in out["cloud_written"]) == names
  assert _names(emulator, "predictions/") == names
  for name in names:
    assert (gcs_emulator.read(emulator, f"predictions/{name}")
            == (tmp_path / "predictions" / name).read_bytes()), name

  # model.init_from and $SEGJAX_CACHE in the bucket (gcs_driver.py).
  assert all(out["weights_ok"].values()), out["weights_ok"]
  assert _names(emulator, "cache/") == ["pretrained/w.npz"]  # no temporary file left

  # The profiler's trace, written locally and uploaded into the workdir.
  assert any(n.endswith(".xplane.pb") for n in _names(emulator, "run/profile/plugins/profile/"))


def test_datasets_and_other_url_schemes_are_refused_with_a_sentence(monkeypatch):
  with pytest.raises(ValueError, match=r"reads datasets from a local disk only"):
    get_dataset("segjax_shapes", "gs://bucket/tensorflow_datasets")
  monkeypatch.setenv("TFDS_DATA_DIR", "gs://bucket/tensorflow_datasets")
  with pytest.raises(ValueError, match=r"\$TFDS_DATA_DIR\) is gs://bucket/tensorflow_datasets"):
    get_dataset("segjax_shapes")
  with pytest.raises(ValueError, match=r"s3://bucket/run: segjax reads and writes run files on "
                     r"local disks and in gs:// buckets only"):
    paths.path("s3://bucket/run")
  # train.py stops with the sentence, and writes nothing locally.
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "train.py"), "--config",
       "configs/unet_shapes.py:smoke", "--workdir", "s3://bucket/run"],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
      timeout=600)
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "gs:// buckets only" in result.stderr
  assert not os.path.exists(os.path.join(REPO, "s3:"))
