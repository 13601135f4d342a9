"""Panoptic FPN: the semantic loss joins Mask R-CNN's, the whole model trains on 8 devices
and reports PQ, eval.py reproduces it, and predict.py writes COCO panoptic PNG + JSON that
`pq_compute` reads and scores like the in-memory evaluation."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from configs import panoptic_fpn_shapes
from segjax.data import shapes
from segjax.data.sources import get_dataset
from segjax.metrics.panoptic import id_to_rgb, pq_compute, rgb_to_id
from segjax.models.panoptic_fpn import PanopticFPN
from segjax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 64
TINY = dict(backbone="resnet18", backbone_width=8, fpn_channels=8, frozen_bn=False,
            trainable_layers=5, anchor_sizes=(8, 16, 32, 64, 128), rpn_pre_nms_top_n_train=32,
            rpn_post_nms_top_n_train=16, rpn_pre_nms_top_n_test=32, rpn_post_nms_top_n_test=16,
            rpn_batch_size_per_image=16, box_batch_size_per_image=8, representation_size=16,
            mask_channels=8, mask_num_convs=2, detections_per_img=6, semantic_channels=8,
            semantic_norm="", thing_classes=(0, 1), stuff_classes=(2, 3, 4))


@pytest.mark.parametrize("fusion,channels", [("heuristic", 4), ("parameter_free", 5)])
def test_semantic_loss_trains_the_semantic_head_and_backbone(fusion, channels):
  model = PanopticFPN(num_classes=2, fusion=fusion, **TINY)
  images = jax.random.normal(jax.random.key(0), (2, SIZE, SIZE, 3))
  variables = jax.jit(model.init)(jax.random.key(1), images)
  predictor = variables["params"]["semantic_head"]["predictor"]["kernel"]
  assert predictor.shape[-1] == channels  # stuff + "things", or every class
  labels = jax.random.randint(jax.random.key(2), (2, SIZE, SIZE), 0, channels)
  targets = {"boxes": jnp.zeros((2, 3, 4)), "classes": jnp.zeros((2, 3), jnp.int32),
             "instance_valid": jnp.zeros((2, 3), bool),
             "masks": jnp.zeros((2, 3, SIZE, SIZE), jnp.uint8),
             "label": labels.at[:, :8].set(255)}

  def semantic(params):
    losses, _ = model.apply({**variables, "params": params}, images, targets,
                            jax.random.key(3), method="losses", mutable=["batch_stats"])
    return losses["semantic"], losses

  grads, losses = jax.jit(jax.grad(semantic, has_aux=True))(variables["params"])
  assert {"semantic", "mask", "classifier"} <= set(losses)
  assert np.isfinite(losses["semantic"]) and losses["semantic"] > 0
  assert float(optax.global_norm(grads["semantic_head"])) > 0
  assert float(optax.global_norm(grads["backbone"])) > 0
  out = jax.jit(model.apply)(variables, images)
  assert out["semantic"].shape == (2, SIZE // 4, SIZE // 4, channels)


def _config(data_dir, split="validation[:8]"):
  config = panoptic_fpn_shapes.get_config("smoke")
  config.unlock()
  config.data.data_dir = data_dir
  config.data.eval_split = split
  config.total_steps = config.eval_every = config.checkpoint_every = 4
  config.lock()
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("panoptic")
  data_dir, workdir = str(root / "tfds"), str(root / "run")
  return data_dir, workdir, trainer.train_and_evaluate(_config(data_dir), workdir)


def test_trains_on_eight_devices_and_reports_pq(trained):
  assert jax.device_count() == 8
  result = trained[2]
  for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
    assert 0 <= result[key] <= 1 or np.isnan(result[key])
  assert result["pq"]["All"]["n"] > 0


def test_eval_command_reproduces_training_pq(trained, tmp_path):
  data_dir, workdir, result = trained
  output = tmp_path / "metrics.json"
  run = subprocess.run(
      [sys.executable, os.path.join(REPO, "eval.py"), "--config",
       "configs/panoptic_fpn_shapes.py:smoke", f"--config.data.data_dir={data_dir}",
       "--config.data.eval_split=validation[:8]", "--checkpoint", workdir,
       f"--output={output}"], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
      capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "Things" in run.stdout
  np.testing.assert_allclose(json.load(open(output))["PQ"], result["PQ"], rtol=1e-9)


def test_predictions_are_read_by_pq_compute(trained, tmp_path):
  """predict's PNG + JSON, scored by pq_compute against the split's annotations written in
  the COCO panoptic format, give the PQ of the in-memory evaluation of the same images."""
  from segjax.commands.evaluate import evaluate_checkpoint
  from segjax.commands.predict import predict_files
  data_dir, workdir, _ = trained
  config = _config(data_dir, "validation[:4]")
  dataset = get_dataset("segjax_shapes", data_dir)
  source = dataset.source("validation[:4]")
  images, gt_dir = tmp_path / "images", tmp_path / "gt"
  images.mkdir()
  gt_dir.mkdir()
  annotations = []
  for i in range(len(source)):
    record = source[i]
    Image.fromarray(record["image"]).save(images / f"{i}.png")
    Image.fromarray(record["panoptic"]).save(gt_dir / f"{i}.png")
    segments = [{"id": int(s), "category_id": int(c), "iscrowd": 0}
                for s, c, v in zip(record["segment_ids"], record["segment_classes"],
                                   record["segment_valid"]) if v]
    assert set(np.unique(rgb_to_id(record["panoptic"]))) - {0} <= {s["id"] for s in segments}
    annotations.append({"image_id": str(i), "file_name": f"{i}.png", "segments_info": segments})
  categories = [{"id": c, "name": n, "isthing": int(c in shapes.THING_CLASSES)}
                for c, n in enumerate(shapes.CLASS_NAMES)]
  with open(tmp_path / "gt.json", "w") as f:
    json.dump({"annotations": annotations, "categories": categories}, f)
  written = predict_files(workdir, str(images), str(tmp_path / "pred"), config)
  assert os.path.join(str(tmp_path / "pred"), "predictions.json") in written
  png = np.asarray(Image.open(tmp_path / "pred" / "0.png"))
  assert png.shape == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3)
  assert (id_to_rgb(rgb_to_id(png)) == png).all()
  from_files = pq_compute(str(tmp_path / "gt.json"), str(tmp_path / "pred" / "predictions.json"),
                          str(gt_dir), str(tmp_path / "pred"))
  in_memory, _ = evaluate_checkpoint(config, workdir)
  np.testing.assert_allclose(from_files["All"]["pq"], in_memory["PQ"], rtol=1e-9)
