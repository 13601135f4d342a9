"""Fault injection: nothing lost, nothing silently wrong.

Pre-emption (SIGTERM) and Ctrl-C save and resume exactly, damaged checkpoints fall back
to the previous one, a non-finite loss stops the run without saving, and the bad inputs
a user brings to predict.py, eval.py, train.py, the converters, the box ops and PQ are
refused or handled with one sentence.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from configs import unet_shapes
from segjax.training import checkpointing, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent compilation cache for this module's runs, in process and in train.py
  subprocesses: each compiles the same steps."""
  directory = str(tmp_path_factory.mktemp("jax_cache"))
  saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                               "jax_persistent_cache_min_compile_time_secs")}
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
  yield directory
  del os.environ["JAX_COMPILATION_CACHE_DIR"]
  for key, value in saved.items():
    jax.config.update(key, value)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _config(data_dir, **overrides):
  config = unet_shapes.get_config("smoke")
  config.unlock()
  config.data.data_dir = data_dir
  config.data.eval_split = "validation[:16]"
  config.total_steps, config.checkpoint_every, config.eval_every, config.log_every = 8, 4, 8, 1
  for key, value in overrides.items():
    target = config
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  config.lock()
  return config


def _leaves(state):
  return jax.tree.leaves(jax.device_get(state))


def _assert_same_state(a, b):
  for x, y in zip(_leaves(a), _leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
  """An uninterrupted 8-step run with checkpoints at steps 4 and 8 (its workdir kept)."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  return workdir, trainer.train_and_evaluate(_config(data_dir), workdir)


# --- 1. SIGTERM and Ctrl-C: finish the step, save, say where, exit 0 ----------------------

def _signal_at_step(monkeypatch, signum, at):
  """Makes the train loop send `signum` to this process (as a scheduler or the user would)
  during step `at`: batches go to the devices one step ahead (`prefetch_to_device`), so
  the transfer of batch `at` + 1 is what happens just before step `at` is dispatched."""
  real, calls = trainer.pipeline.to_global, []
  def to_global(batch, sharding):
    calls.append(1)
    if len(calls) == at + 1:
      os.kill(os.getpid(), signum)
    return real(batch, sharding)
  monkeypatch.setattr(trainer.pipeline, "to_global", to_global)
  return real


def test_sigterm_saves_and_resumes_exactly(data_dir, straight, tmp_path, monkeypatch, capsys):
  signum = signal.SIGTERM
  workdir = str(tmp_path / "w")
  real = _signal_at_step(monkeypatch, signum, 6)
  stopped = trainer.train_and_evaluate(_config(data_dir), workdir)
  assert int(stopped["state"].step) == 6
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]
  out = capsys.readouterr()
  assert f"Stopped by {signal.Signals(signum).name} after step 6" in out.out + out.err
  assert os.path.join(workdir, "checkpoints", "6") in out.out + out.err
  # The handlers are those of before the run again.
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  monkeypatch.setattr(trainer.pipeline, "to_global", real)
  resumed = trainer.train_and_evaluate(_config(data_dir), workdir)
  _assert_same_state(resumed["state"], straight[1]["state"])


def test_second_ctrl_c_aborts_at_once(data_dir, tmp_path, monkeypatch):
  real, calls = trainer.pipeline.to_global, []
  def to_global(batch, sharding):
    calls.append(1)
    if len(calls) == 3:
      os.kill(os.getpid(), signal.SIGINT)
      os.kill(os.getpid(), signal.SIGINT)
    return real(batch, sharding)
  monkeypatch.setattr(trainer.pipeline, "to_global", to_global)
  with pytest.raises(KeyboardInterrupt):
    trainer.train_and_evaluate(_config(data_dir), str(tmp_path / "w"))
  assert len(calls) == 3


def _train_cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *args], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_train_py_stops_cleanly_on_signal(data_dir, straight, tmp_path, signum):
  """The real thing: train.py signalled while training exits 0 with one line naming the
  checkpoint it saved, and the same command then finishes the run as if uninterrupted."""
  workdir = tmp_path / "w"
  args = ["--config", "configs/unet_shapes.py:smoke", "--workdir", str(workdir),
          f"--config.data.data_dir={data_dir}", "--config.data.eval_split=validation[:16]",
          "--config.total_steps=8", "--config.checkpoint_every=4", "--config.eval_every=8",
          "--config.log_every=1"]
  process = _train_cli(*args)
  deadline = time.time() + 300
  while not (workdir / "metrics.jsonl").exists() or not (workdir / "metrics.jsonl").stat().st_size:
    assert process.poll() is None and time.time() < deadline, process.communicate()
    time.sleep(0.05)
  process.send_signal(signum)
  out, err = process.communicate(timeout=300)
  assert process.returncode == 0, err[-3000:]
  assert "Traceback" not in err
  lines = [line for line in (out + err).splitlines() if "Stopped by" in line]
  assert len(lines) == 1 and signal.Signals(signum).name in lines[0], out + err
  step = int(lines[0].split("after step ")[1].split(":")[0])
  assert 1 <= step <= 8
  assert str(step) in os.listdir(workdir / "checkpoints")
  assert os.path.join(str(workdir), "checkpoints", str(step)) in lines[0]
  if signum == signal.SIGINT:  # resuming is the same after either signal
    return
  again = _train_cli(*args)
  out, err = again.communicate(timeout=300)
  assert again.returncode == 0, err[-3000:]
  final = checkpointing.restore_variables(str(workdir), 8, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _variables(straight[1]["state"])))
  _assert_same_state(final, _variables(straight[1]["state"]))


def _variables(state):
  return {"params": state.params, "batch_stats": state.batch_stats}


# --- 2. Damaged checkpoints: fall back to the previous one --------------------------------

def _data_file(step_dir):
  """The state's array data file (after orbax merges the processes' OCDBT files into
  state/d; the per-process copies are no longer read)."""
  folder = os.path.join(step_dir, "state", "d")
  return max((os.path.join(folder, f) for f in os.listdir(folder)), key=os.path.getsize)


def _truncate_state_file(step_dir):
  path = _data_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _delete_state_file(step_dir):
  os.remove(_data_file(step_dir))


def _delete_named(name):
  def damage(step_dir):
    os.remove(os.path.join(step_dir, *name.split("/")))
  return damage


def _empty(step_dir):
  shutil.rmtree(step_dir)
  os.mkdir(step_dir)


DAMAGES = {"truncated state file": _truncate_state_file,
           "deleted state file": _delete_state_file,
           "deleted _METADATA": _delete_named("state/_METADATA"),
           "deleted meta/metadata": _delete_named("meta/metadata"),
           "emptied folder": _empty}


@pytest.fixture(scope="module")
def state_of_step_4(data_dir, straight, tmp_path_factory):
  """What a restart restores when the step-8 folder is removed by hand."""
  workdir = str(tmp_path_factory.mktemp("by_hand"))
  shutil.copytree(straight[0], workdir, dirs_exist_ok=True)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))
  return trainer.train_and_evaluate(_config(data_dir, total_steps=4), workdir)["state"]


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_latest_checkpoint_falls_back(data_dir, straight, state_of_step_4, tmp_path,
                                              caplog, damage):
  workdir = str(tmp_path / "w")
  shutil.copytree(straight[0], workdir)
  DAMAGES[damage](os.path.join(workdir, "checkpoints", "8"))
  restored = trainer.train_and_evaluate(_config(data_dir, total_steps=4), workdir)["state"]
  assert int(restored.step) == 4
  _assert_same_state(restored, state_of_step_4)
  warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(warnings) == 1 and "step 8" in warnings[0], warnings
  # Set aside, never deleted.
  assert os.path.isdir(os.path.join(workdir, "damaged_checkpoints", "8"))
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]


def test_damaged_checkpoint_is_out_of_the_way_of_later_saves(data_dir, straight, tmp_path):
  """Resuming past a damaged step saves that step anew and rotates only good checkpoints."""
  workdir = str(tmp_path / "w")
  shutil.copytree(straight[0], workdir)
  _truncate_state_file(os.path.join(workdir, "checkpoints", "8"))
  resumed = trainer.train_and_evaluate(_config(data_dir), workdir)
  _assert_same_state(resumed["state"], straight[1]["state"])
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]


def test_no_restorable_checkpoint_is_one_sentence(data_dir, straight, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(straight[0], workdir)
  _delete_named("state/_METADATA")(os.path.join(workdir, "checkpoints", "8"))
  _empty(os.path.join(workdir, "checkpoints", "4"))
  with pytest.raises(checkpointing.DamagedCheckpointError,
                     match=r"None of the checkpoints in \S+ can be restored: step 8 .*step 4"):
    trainer.train_and_evaluate(_config(data_dir), workdir)
  # Nothing was moved or deleted.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]


def test_half_written_step_is_never_the_latest(data_dir, straight, tmp_path):
  """A save cut off mid-write leaves only orbax's temporary folder: it is not a step, and
  the next run removes it."""
  workdir = str(tmp_path / "w")
  shutil.copytree(straight[0], workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  partial = os.path.join(checkpoints, "12.orbax-checkpoint-tmp-1765000000000000")
  shutil.copytree(os.path.join(checkpoints, "8"), partial)
  _truncate_state_file(partial)
  restored = trainer.train_and_evaluate(_config(data_dir), workdir)["state"]
  assert int(restored.step) == 8
  assert sorted(os.listdir(checkpoints)) == ["4", "8"]


# --- 3. Non-finite loss: stop, save nothing of it ------------------------------------------

def test_nonfinite_loss_stops_and_keeps_good_checkpoints(data_dir, straight, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(straight[0], workdir)
  config = _config(data_dir, total_steps=16, **{"optimizer.learning_rate": 1e6})
  with pytest.raises(trainer.NonFiniteError,
                     match=r"^Step (\d+) has a non-finite loss .* The last good checkpoint is "
                           r"step 8 in \S+checkpoints\. Lower optimizer.learning_rate"):
    trainer.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
  healthy = trainer.train_and_evaluate(_config(data_dir), workdir)["state"]  # restores 8
  _assert_same_state(healthy, straight[1]["state"])


def test_nonfinite_loss_from_scratch_names_the_step(data_dir, straight, tmp_path):
  workdir = str(tmp_path / "w")
  config = _config(data_dir, **{"optimizer.learning_rate": 1e6})
  with pytest.raises(trainer.NonFiniteError) as error:
    trainer.train_and_evaluate(config, workdir)
  step = int(str(error.value).split()[1])
  saved = os.listdir(os.path.join(workdir, "checkpoints"))
  assert all(int(s) < step for s in saved), (step, saved)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          _variables(straight[1]["state"]))
  for s in saved:  # whatever was saved is finite
    variables = checkpointing.restore_variables(workdir, int(s), abstract)
    assert all(np.isfinite(x).all() for x in _leaves(variables))


def test_nonfinite_skip_option_keeps_the_last_finite_state(data_dir, straight, tmp_path,
                                                           caplog):
  workdir = str(tmp_path / "w")
  shutil.copytree(straight[0], workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))
  config = _config(data_dir, total_steps=8,
                   **{"optimizer.learning_rate": 1e6, "optimizer.nonfinite": "skip"})
  result = trainer.train_and_evaluate(config, workdir)
  assert int(result["state"].step) == 8
  assert any("update was skipped" in r.getMessage() for r in caplog.records)
  assert all(np.isfinite(x).all() for x in _leaves(result["state"]))


# --- 4, 5, 6. predict.py: no collisions, no overwritten inputs, bad files skipped, 16 bits -

def _photo(seed, size=(40, 56)):
  return np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)


def test_predict_outputs_never_collide(straight, tmp_path):
  from segjax.commands.predict import predict_files
  inputs, out = tmp_path / "in", tmp_path / "out"
  inputs.mkdir()
  Image.fromarray(_photo(0)).save(inputs / "photo.jpg")
  Image.fromarray(_photo(1)).save(inputs / "photo.png")
  Image.fromarray(_photo(2)).save(inputs / "other.png")
  written = predict_files(straight[0], str(inputs), str(out))
  names = sorted(os.listdir(out))
  assert names == ["other.png", "other_overlay.jpg", "photo.jpg.png", "photo.jpg_overlay.jpg",
                   "photo.png.png", "photo.png_overlay.jpg"]
  assert sorted(os.path.basename(p) for p in written) == names  # a true count


def test_predict_refuses_to_write_into_the_input_folder(straight, tmp_path):
  from segjax.commands.predict import predict_files
  Image.fromarray(_photo(0)).save(tmp_path / "photo.png")
  before = (tmp_path / "photo.png").read_bytes()
  with pytest.raises(ValueError, match=r"--output \S+ holds input images \(photo.png\), which "
                                       r"predictions could overwrite; choose another"):
    predict_files(straight[0], str(tmp_path), str(tmp_path))
  assert (tmp_path / "photo.png").read_bytes() == before
  assert os.listdir(tmp_path) == ["photo.png"]


def test_predict_skips_an_unreadable_image_and_labels_the_rest(straight, tmp_path, capsys):
  from segjax.commands.predict import SkippedImagesError, predict_files
  inputs, out = tmp_path / "in", tmp_path / "out"
  inputs.mkdir()
  (inputs / "a.png").write_bytes(b"")
  for i in range(6):
    Image.fromarray(_photo(i)).save(inputs / f"good{i}.png")
  with pytest.raises(SkippedImagesError,
                     match=r"wrote 12 files to \S+ but skipped 1 of 7 images that could not be "
                           r"read: \S+a\.png\.$"):
    predict_files(straight[0], str(inputs), str(out))
  assert sorted(os.listdir(out)) == sorted(f"good{i}{s}" for i in range(6)
                                           for s in (".png", "_overlay.jpg"))
  err = capsys.readouterr().err
  assert "warning: skipping" in err and "a.png" in err


def test_predict_exits_non_zero_listing_skipped_images(straight, tmp_path):
  inputs = tmp_path / "in"
  inputs.mkdir()
  (inputs / "a.png").write_bytes(b"")
  Image.fromarray(_photo(0)).save(inputs / "b.png")
  run = subprocess.run([sys.executable, os.path.join(REPO, "predict.py"), "--checkpoint",
                        straight[0], f"--input={inputs}", f"--output={tmp_path / 'out'}"],
                       cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                       text=True, timeout=300)
  assert run.returncode == 1 and "Traceback" not in run.stderr
  assert "skipped 1 of 2 images" in run.stderr and "a.png" in run.stderr
  assert sorted(os.listdir(tmp_path / "out")) == ["b.png", "b_overlay.jpg"]


def _ramp16():
  return (np.arange(120 * 100, dtype=np.float64).reshape(120, 100) * 65535 / 11999).round(
      ).astype(np.uint16)


@pytest.mark.parametrize("kind", ["16-bit PNG", "16-bit TIFF", "float TIFF"])
def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path, kind):
  from segjax.commands.predict import read_image
  ramp = _ramp16()
  if kind == "float TIFF":
    values, path = (ramp / 65535).astype(np.float32), tmp_path / "x.tif"
  else:
    values, path = ramp, tmp_path / ("x.png" if "PNG" in kind else "x.tif")
  Image.fromarray(values).save(path)
  expected = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
  image = read_image(str(path))
  assert image.dtype == np.uint8 and image.shape == ramp.shape + (3,)
  np.testing.assert_array_equal(image, np.repeat(expected[..., None], 3, axis=-1))


def test_unscalable_images_are_refused(tmp_path):
  from segjax.commands.predict import read_image
  Image.fromarray(np.full((4, 4), 3.5, np.float32)).save(tmp_path / "f.tif")
  with pytest.raises(ValueError, match=r"f\.tif has floating-point pixels in \[3\.5, 3\.5\]"):
    read_image(str(tmp_path / "f.tif"))
  Image.fromarray(np.full((4, 4), 1 << 20, np.int32)).save(tmp_path / "i.tif")
  with pytest.raises(ValueError, match=r"i\.tif has 32-bit integer pixels"):
    read_image(str(tmp_path / "i.tif"))


def test_predict_on_16_bit_image_equals_8_bit(straight, tmp_path):
  from segjax.commands.predict import predict_files
  ramp = _ramp16()
  Image.fromarray(ramp).save(tmp_path / "deep.png")
  eight = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
  Image.fromarray(np.repeat(eight[..., None], 3, axis=-1)).save(tmp_path / "flat.png")
  predict_files(straight[0], str(tmp_path / "deep.png"), str(tmp_path / "a"))
  predict_files(straight[0], str(tmp_path / "flat.png"), str(tmp_path / "b"))
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a" / "deep.png")),
                                np.asarray(Image.open(tmp_path / "b" / "flat.png")))


def test_classical_otsu_splits_a_16_bit_ramp_in_half(tmp_path, capsys):
  from segjax.classical import __main__ as classical
  Image.fromarray(_ramp16()).save(tmp_path / "ramp.png")
  classical.main(["otsu", "--input", str(tmp_path / "ramp.png"), "--output", str(tmp_path)])
  labels = np.asarray(Image.open(tmp_path / "ramp_otsu_labels.png"))
  counts = np.bincount(labels.ravel())
  assert len(counts) == 2 and abs(int(counts[0]) - int(counts[1])) <= 2 * 100, counts


# --- 11. Box ops on edge inputs: zero boxes, small dtypes ----------------------------------

def _reference_iou(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = np.clip(rb - lt, 0, None)
  inter = wh[..., 0] * wh[..., 1]
  union = area(a)[:, None] + area(b)[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0)


def _reference_nms(boxes, scores, classes, threshold, max_out):
  """Plain greedy NMS: visit boxes by descending score (ties: lower index first), keep a
  box unless a kept box of its class overlaps it by IoU > threshold."""
  iou = _reference_iou(boxes, boxes)
  kept = []
  for i in sorted(range(len(scores)), key=lambda i: (-scores[i], i)):
    if all(not (classes[j] == classes[i] and iou[i, j] > threshold) for j in kept):
      kept.append(i)
  kept = kept[:max_out]
  return np.array(kept + [-1] * (max_out - len(kept))), len(kept)


def test_nms_of_zero_boxes_keeps_nothing():
  from segjax.ops.nms import batched_nms, nms
  empty = np.zeros((0, 4), np.float32)
  for indices, count in (nms(empty, np.zeros(0), 0.5, 5),
                         batched_nms(empty, np.zeros(0), np.zeros(0, np.int32), 0.5, 5)):
    assert int(count) == 0 and np.asarray(indices).tolist() == [-1] * 5


def test_small_dtypes_are_upcast_like_torchvision():
  from segjax.ops.boxes import box_area, pairwise_iou
  assert int(box_area(np.array([[0, 0, 100, 100]], np.int8))[0]) == 10000
  assert box_area(np.array([[0, 0, 100, 100]], np.int8)).dtype == np.int32
  a = np.array([[0, 0, 10, 10]], np.float16)
  b = np.array([[5, 0, 15, 10]], np.float16)
  iou = pairwise_iou(a, b)
  assert iou.dtype == np.float32 and float(iou[0, 0]) == pytest.approx(1 / 3)


_BOX_DTYPES = [np.int8, np.uint8, np.int16, np.int32, np.float16, np.float32]


@st.composite
def _box_sets(draw):
  n = draw(st.sampled_from([0, 1, 3, 12]))  # few shapes: each compiles the NMS anew
  dtype = draw(st.sampled_from(_BOX_DTYPES))
  xy = draw(hnp.arrays(np.int64, (n, 2), elements=st.integers(0, 100)))
  wh = draw(hnp.arrays(np.int64, (n, 2), elements=st.integers(0, 27)))
  boxes = np.concatenate([xy, xy + wh], axis=1).astype(dtype)
  scores = draw(hnp.arrays(np.float32, (n,), elements=st.floats(0, 1, width=32)))
  classes = draw(hnp.arrays(np.int32, (n,), elements=st.integers(0, 2)))
  return boxes, scores, classes


@settings(max_examples=30, deadline=None, database=None, derandomize=True)
@given(sets=_box_sets(), threshold=st.sampled_from([0.0, 0.3, 0.5, 0.7]),
       max_out=st.sampled_from([1, 4]))
def test_box_ops_and_nms_match_plain_reference(sets, threshold, max_out):
  from segjax.ops.boxes import box_area, pairwise_iou
  from segjax.ops.nms import batched_nms, nms
  boxes, scores, classes = sets
  exact = boxes.astype(np.float64)
  np.testing.assert_array_equal(np.asarray(box_area(boxes), np.float64),
                                (exact[:, 2] - exact[:, 0]) * (exact[:, 3] - exact[:, 1]))
  np.testing.assert_allclose(pairwise_iou(boxes, boxes[::-1]),
                             _reference_iou(exact, exact[::-1]), rtol=1e-6, atol=1e-7)
  for got, want in ((nms(boxes, scores, threshold, max_out),
                     _reference_nms(exact, scores, np.zeros_like(classes), threshold, max_out)),
                    (batched_nms(boxes, scores, classes, threshold, max_out),
                     _reference_nms(exact, scores, classes, threshold, max_out))):
    assert np.asarray(got[0]).tolist() == want[0].tolist() and int(got[1]) == want[1]


# --- 12. PQ: a class's crowd region is its last crowd segment, as in panopticapi ----------

@pytest.mark.parametrize("order", [(21, 22), (22, 21)])
def test_pq_crowd_region_follows_panopticapi(order):
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import pq_reference
  from segjax.metrics import panoptic
  thing, other = 1, 2
  gt = np.zeros((2, 10), np.int64)
  gt[0, 0:4], gt[0, 4:8], gt[1, 0:6] = 21, 22, 11  # two crowd segments of `thing`, one thing
  gt_segments = [{"id": i, "category_id": thing, "iscrowd": 1} for i in order]
  gt_segments.append({"id": 11, "category_id": thing, "iscrowd": 0})
  pred = np.zeros((2, 10), np.int64)
  pred[0, 0:3] = 103  # all on crowd segment 21
  pred[1, 0:6] = 102  # matches 11
  pred[0, 8:10] = 104  # on VOID, of another class: ignored
  pred_segments = [{"id": 102, "category_id": thing}, {"id": 103, "category_id": thing},
                   {"id": 104, "category_id": other}]
  for rule in ("last", "union"):
    stats = panoptic.image_pq_stats(gt, gt_segments, pred, pred_segments, [thing, other],
                                    crowd_region=rule)
    reference = pq_reference.reference_image_counts(gt, gt_segments, pred, pred_segments,
                                                    crowd_region=rule)
    assert [int(stats.tp[0]), int(stats.fp[0]), int(stats.fn[0])] == reference[thing][:3]
    # 103 lies on 21 only: ignored when 21 is the region, a false positive when 22 is.
    expected_fp = 1 if rule == "last" and order[-1] == 22 else 0
    assert int(stats.fp[0]) == expected_fp and int(stats.tp[0]) == 1
  default = panoptic.image_pq_stats(gt, gt_segments, pred, pred_segments, [thing, other])
  assert int(default.fp[0]) == (1 if order[-1] == 22 else 0)
  with pytest.raises(ValueError, match="crowd_region must be one of"):
    panoptic.image_pq_stats(gt, gt_segments, pred, pred_segments, [thing, other],
                            crowd_region="all")


# --- 7. Unwritable workdir / output --------------------------------------------------------

def test_unwritable_workdir_stops_at_start_up(data_dir, tmp_path):
  (tmp_path / "file").write_text("in the way")
  started = time.time()
  with pytest.raises(ValueError, match=r"^The workdir \S+ is not writable \(.+\); give a "
                                       r"--workdir you can write to\.$"):
    trainer.train_and_evaluate(_config(data_dir), str(tmp_path / "file" / "run"))
  assert time.time() - started < 5  # before any set-up


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_workdir_stops_at_start_up(data_dir, tmp_path):
  workdir = tmp_path / "ro"
  workdir.mkdir()
  workdir.chmod(0o555)
  try:
    with pytest.raises(ValueError, match=r"is not writable \(Permission denied\)"):
      trainer.train_and_evaluate(_config(data_dir), str(workdir))
  finally:
    workdir.chmod(0o755)


def test_eval_reports_metrics_before_failing_to_write(data_dir, straight, tmp_path):
  from segjax.commands.evaluate import evaluate_checkpoint
  (tmp_path / "file").write_text("in the way")
  reported = []
  with pytest.raises(ValueError, match=r"^Could not write the results to \S+file\b.*; give "
                                       r"--output a path in a folder you can write to\.$"):
    evaluate_checkpoint(_config(data_dir), straight[0], str(tmp_path / "file" / "m.json"),
                        report=lambda metrics, table: reported.append((metrics, table)))
  (metrics, table), = reported
  assert metrics["step"] == 8 and "mIoU" in table
  assert metrics["mIoU"] == pytest.approx(straight[1]["mIoU"], abs=1e-6)


# --- 13. metrics.jsonl: one record per step and kind across resumed runs -------------------

def test_metrics_log_is_idempotent_per_step(data_dir, straight, tmp_path, monkeypatch):
  import json
  workdir = str(tmp_path / "w")
  shutil.copytree(straight[0], workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))  # lost: resume from 4
  trainer.train_and_evaluate(_config(data_dir), workdir)  # steps 5-8 logged again
  trainer.train_and_evaluate(_config(data_dir), workdir)  # finished: evaluates step 8 again
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  keys = [(r["step"], tuple(sorted(r))) for r in records]
  assert len(keys) == len(set(keys)), keys
  assert sorted({r["step"] for r in records if "train/loss" in r}) == list(range(1, 9))
  assert [r["step"] for r in records if "eval/mIoU" in r] == [8]


def test_eval_wrong_model_message_names_the_right_flag(data_dir, straight):
  from segjax.commands.evaluate import evaluate_checkpoint
  config = _config(data_dir, **{"model.options.width": 8})
  with pytest.raises(checkpointing.CheckpointMismatchError) as error:
    evaluate_checkpoint(config, straight[0])
  assert "--workdir" not in str(error.value)
  assert "pass the --config it was trained with" in str(error.value)


# --- 10. segjax.convert on files that are not checkpoints ----------------------------------

def _not_checkpoints(tmp_path):
  (tmp_path / "text.pth").write_text("hello, not weights\n")
  Image.fromarray(_photo(0)).save(tmp_path / "photo.jpg")
  shutil.copy(tmp_path / "photo.jpg", tmp_path / "photo.pth")
  (tmp_path / "text.npz").write_text("hello, not arrays\n")
  np.savez(tmp_path / "objects.npz", a=np.array([{"x": 1}], dtype=object))
  import torch
  torch.save({"w": torch.ones(64, 64)}, tmp_path / "cut.pth")
  data = (tmp_path / "cut.pth").read_bytes()
  (tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])
  return {"text.pth": r"text\.pth is not a PyTorch checkpoint but a text file\.$",
          "photo.pth": r"photo\.pth is not a PyTorch checkpoint but a JPEG image\.$",
          "text.npz": r"text\.npz is not a NumPy archive \(\.npz\) but a text file\.$",
          "objects.npz": r"objects\.npz holds pickled Python objects rather than plain arrays",
          "cut.pth": r"cut\.pth is not a PyTorch checkpoint but a truncated or damaged zip "
                     r"archive\.$"}


def test_convert_refuses_files_that_are_not_checkpoints(tmp_path):
  from segjax.convert.common import read_state_dict
  for name, message in _not_checkpoints(tmp_path).items():
    with pytest.raises(ValueError, match=message) as error:
      read_state_dict(str(tmp_path / name))
    assert not any(w in str(error.value) for w in ("unsafe", "allow_pickle", "weights_only"))


def test_convert_command_says_one_sentence(tmp_path):
  _not_checkpoints(tmp_path)
  run = subprocess.run([sys.executable, "-m", "segjax.convert", "--arch", "resnet18", "--input",
                        str(tmp_path / "photo.pth"), "--output", str(tmp_path / "out.npz")],
                       cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                       text=True, timeout=300)
  assert run.returncode != 0 and "Traceback" not in run.stderr
  assert "photo.pth is not a PyTorch checkpoint but a JPEG image." in run.stderr


# --- 8. Corrupt dataset archives -----------------------------------------------------------

def _damaged_copies(good, folder):
  """{"empty": path, "truncated": path} of `good`'s name under `folder`/<kind>/."""
  paths = {}
  for kind in ("empty", "truncated"):
    os.makedirs(os.path.join(folder, kind), exist_ok=True)
    path = os.path.join(folder, kind, os.path.basename(good))
    data = open(good, "rb").read()
    with open(path, "wb") as f:
      f.write(b"" if kind == "empty" else data[:len(data) // 2 + 7])
    paths[kind] = path
  return paths


def test_corrupt_ade20k_zip_is_one_sentence_and_leaves_nothing(tmp_path, capsys):
  from tests.data import test_ade20k
  from segjax.data import prepare
  good = tmp_path / "good" / "ADEChallengeData2016.zip"
  good.parent.mkdir()
  test_ade20k._tiny_archive(good, np.random.default_rng(0))
  data_dir = tmp_path / "data"
  for kind, path in _damaged_copies(str(good), str(tmp_path)).items():
    args = ["ade20k", "--data_dir", str(data_dir), "--manual_dir", os.path.dirname(path)]
    assert prepare.main(args) != 0, kind
    err = capsys.readouterr().err
    assert (f"{path} is not a valid zip archive (empty or truncated); download it again."
            in err), err
    assert "Traceback" not in err
  # Nothing half-prepared is taken as complete: the good archive prepares in full.
  args = ["ade20k", "--data_dir", str(data_dir), "--manual_dir", str(good.parent)]
  assert prepare.main(args) == 0
  assert "train 3, validation 2" in capsys.readouterr().out


def test_corrupt_voc_tar_is_one_sentence(tmp_path):
  from tests.data import test_voc_dataset
  from segjax.data.archives import CorruptArchiveError
  from segjax.data.sources import get_dataset
  good = tmp_path / "good" / "VOCtrainval_11-May-2012.tar"
  good.parent.mkdir()
  test_voc_dataset._voc_tar(good, np.random.default_rng(0), ["2007_000032", "2008_000002"],
                            ["2007_000033"])
  for kind, path in _damaged_copies(str(good), str(tmp_path)).items():
    with pytest.raises(CorruptArchiveError, match=rf"^{path} is not a valid tar archive \(empty "
                                                  r"or truncated\); download it again\.$"):
      dataset = get_dataset("voc2012", str(tmp_path / f"data_{kind}"), os.path.dirname(path))
      for split in ("train", "validation"):
        list(dataset.source(split))


# --- 9. The label-range message points at the real fix -------------------------------------

def test_out_of_range_label_names_image_value_and_real_fix():
  from segjax.data import transforms
  check = transforms.parse_pipeline("check_labels(num_classes=150)")
  example = {"image": np.zeros((2, 2, 3), np.uint8), "label": np.array([[0, 150], [3, 255]]),
             "file_name": b"ADE_val_00000001"}
  with pytest.raises(ValueError) as error:
    check(example, np.random.default_rng(0))
  message = str(error.value)
  assert "of ADE_val_00000001 contains values [150]" in message
  assert "reduce_zero_label op" in message and "data.train_ops" in message
  assert "inference.label_ops" in message
  assert "data.reduce_zero_label" not in message and "data.num_classes" not in message
