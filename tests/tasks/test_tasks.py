"""The task abstraction as a user meets it: a :smoke model of each task trains, then
predict.py labels a folder of photos from its checkpoint alone (empty TFDS_DATA_DIR, no
--config); old checkpoints without a model record still restore; config mistakes stop
train.py at start-up with one sentence; and the package has the shape the tasks give it
(no import cycle, no task branch outside segjax/tasks, a short trainer)."""
import ast
import collections
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import maskrcnn_shapes, panoptic_fpn_shapes, unet_shapes
from segjax import tasks
from segjax.commands.restore import restore
from segjax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEGJAX = os.path.join(REPO, "segjax")
CONFIGS = {"semantic": unet_shapes, "instance": maskrcnn_shapes, "panoptic": panoptic_fpn_shapes}


def _smoke(module, data_dir, steps=2):
  config = module.get_config("smoke")
  config.unlock()
  config.data.data_dir = data_dir
  config.data.eval_split = "validation[:8]"
  config.data.eval_batch_size = 8
  config.total_steps = config.checkpoint_every = config.eval_every = steps
  config.lock()
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-step :smoke run of each task: {task: workdir}."""
  root = tmp_path_factory.mktemp("tasks")
  data_dir = str(root / "tfds")
  workdirs = {}
  for name, module in CONFIGS.items():
    workdirs[name] = str(root / name)
    trainer.train_and_evaluate(_smoke(module, data_dir), workdirs[name])
  return data_dir, workdirs


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """Two real photographs of different sizes (scikit-image's), as JPEG and PNG."""
  skimage_data = pytest.importorskip("skimage.data")
  folder = tmp_path_factory.mktemp("photos")
  Image.fromarray(skimage_data.coffee()[::4, ::4]).save(folder / "coffee.jpg", quality=95)
  Image.fromarray(skimage_data.astronaut()[::5, ::6]).save(folder / "astronaut.png")
  return folder


def _run(script, *args, env=None):
  env = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
  return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("task", list(CONFIGS))
def test_predict_from_checkpoint_alone(trained, photos, tmp_path, task):
  _, workdirs = trained
  empty = tmp_path / "no_datasets"
  empty.mkdir()
  out = tmp_path / "out"
  run = _run("predict.py", f"--checkpoint={workdirs[task]}", f"--input={photos}",
             f"--output={out}", env={"TFDS_DATA_DIR": str(empty)})
  assert run.returncode == 0, run.stderr[-3000:]
  assert not os.listdir(empty)  # no dataset was read or prepared
  sizes = {"coffee": (100, 150), "astronaut": (103, 86)}
  if task == "semantic":
    for stem, size in sizes.items():
      labels = np.asarray(Image.open(out / f"{stem}.png"))
      assert labels.shape == size and labels.max() < 7
      assert Image.open(out / f"{stem}_overlay.jpg").size == size[::-1]
  elif task == "instance":
    for stem, size in sizes.items():
      detections = json.load(open(out / f"{stem}.json"))
      assert isinstance(detections, list)
      for d in detections:
        assert d["category"] in ("disk", "square", "triangle", "ring")
        assert d["segmentation"]["size"] == list(size)
      assert Image.open(out / f"{stem}_instances.jpg").size == size[::-1]
  else:
    predictions = json.load(open(out / "predictions.json"))
    assert sorted(a["file_name"] for a in predictions["annotations"]) == [
        "astronaut.png", "coffee.png"]
    for stem, size in sizes.items():
      assert np.asarray(Image.open(out / f"{stem}.png")).shape == size + (3,)
  assert f"wrote {len(os.listdir(out))} files" in run.stdout


def test_restore_needs_no_dataset_and_no_optimizer_state(trained):
  data_dir, workdirs = trained
  restored = restore(workdirs["panoptic"])  # the checkpoint's own config and classes
  assert restored.task.name == "panoptic" and restored.step == 2
  assert restored.dataset.open_split is None  # classes only: the dataset stays closed
  assert set(restored.variables) == {"params", "batch_stats"}
  full = trainer.train_and_evaluate(_smoke(panoptic_fpn_shapes, data_dir),
                                    workdirs["panoptic"])["state"]  # resumes, trained already
  for ours, theirs in zip(jax.tree.leaves(restored.variables), jax.tree.leaves(
      {"params": full.params, "batch_stats": full.batch_stats})):
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_old_checkpoint_without_record_restores_with_a_notice(trained, tmp_path, caplog):
  import shutil
  data_dir, workdirs = trained
  old = tmp_path / "old"
  shutil.copytree(workdirs["semantic"], old)
  meta = old / "checkpoints" / "2" / "meta" / "metadata"
  record = json.load(open(meta))
  json.dump({k: record[k] for k in ("model", "num_classes", "param_shapes")}, open(meta, "w"))
  config = _smoke(unet_shapes, data_dir)
  with pytest.raises(ValueError, match="predates checkpoints that record their model"):
    restore(str(old))
  with caplog.at_level("WARNING"):
    restored = restore(str(old), config)
  assert "predates checkpoints that record their model" in caplog.text
  new = restore(workdirs["semantic"])
  for a, b in zip(*(jax.tree.leaves(r.variables) for r in (restored, new))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("override,message", [
    ("--config.inference.mode=slid", "Unknown inference.mode 'slid'; use one of batched, "
     "whole, slide."),
    ("--config.loss.terms=({'name': 'dise', 'weight': 1.0},)", "Unknown loss 'dise'"),
    ("--config.inference.crf.enabled=True", "The dense CRF (--crf, inference.crf) refines one "
     "image at a time"),
])
def test_config_mistakes_stop_at_start_up(tmp_path, override, message):
  run = _run("train.py", "--config=configs/unet_shapes.py:smoke",
             f"--workdir={tmp_path / 'run'}", override,
             env={"TFDS_DATA_DIR": str(tmp_path / "tfds")})
  assert run.returncode == 1
  lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and message in lines[0], run.stderr[-2000:]
  assert "Traceback" not in run.stderr
  assert not (tmp_path / "tfds").exists()  # stopped before preparing any data


def test_settings_a_detector_ignores_are_refused():
  config = maskrcnn_shapes.get_config("smoke")
  config.unlock()
  config.inference.mode = "whole"
  config.loss.class_weights = (1.0,) * 5
  with pytest.raises(ValueError, match=r"does not use inference.mode='whole'.*"
                                       r"loss.class_weights"):
    tasks.get_task(config).validate(config)


def test_the_task_comes_from_the_model_or_the_task_key():
  config = unet_shapes.get_config("smoke")
  assert tasks.get_task(config).name == "semantic"
  assert tasks.get_task(maskrcnn_shapes.get_config("smoke")).name == "instance"
  config.unlock()
  config.task = "panoptic"
  with pytest.raises(ValueError, match="task 'panoptic' cannot train model 'unet'"):
    tasks.get_task(config)


def _imports():
  """{package: {imported package}} of segjax's subpackages and top-level modules."""
  def unit(module):
    return ".".join(module.split(".")[:2])
  edges = collections.defaultdict(set)
  for folder, _, files in os.walk(SEGJAX):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(folder, name)
      module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
      for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("segjax"):
          targets = ([f"segjax.{a.name}" for a in node.names] if node.module == "segjax"
                     else [node.module])
        elif isinstance(node, ast.Import):
          targets = [a.name for a in node.names if a.name.startswith("segjax")]
        else:
          continue
        edges[unit(module)].update(unit(t) for t in targets if unit(t) != unit(module))
  return edges


def test_no_import_cycle_between_packages():
  edges = _imports()
  assert "segjax.tasks" in edges["segjax.training"]  # the graph is real
  state = {}

  def visit(node, path):
    state[node] = "open"
    for target in sorted(edges.get(node, ())):
      if state.get(target) == "open":
        cycle = path[path.index(target):] + [target]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if target not in state:
        visit(target, path + [target])
    state[node] = "done"

  for node in sorted(edges):
    if node not in state:
      visit(node, [node])
  assert "segjax.training" not in edges["segjax.inference"]
  assert "segjax.inference" not in edges["segjax.training"]


def test_no_task_branch_outside_tasks():
  names = {"semantic", "instance", "panoptic"}
  for folder, _, files in os.walk(SEGJAX):
    if os.path.relpath(folder, SEGJAX).startswith("tasks"):
      continue
    for name in files:
      if not name.endswith(".py"):
        continue
      tree = ast.parse(open(os.path.join(folder, name)).read())
      for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
          constants = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
          assert not names & set(constants), (
              f"{name}:{node.lineno} compares against a task name")
  lines = open(os.path.join(SEGJAX, "training", "trainer.py")).read().count("\n")
  assert lines < 250
