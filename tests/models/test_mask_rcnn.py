"""Mask R-CNN / Faster R-CNN with static shapes: the train step with no and with the
maximum number of ground-truth instances, gradients reaching the backbone through
RoIAlign, inference outputs, and the whole trainer / eval.py / predict.py path on the
embedded dataset (COCO AP through pycocotools)."""
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

from configs import fasterrcnn_coco, maskrcnn_coco, maskrcnn_shapes
from segjax.convert import load_variables, save_variables
from segjax.models.mask_rcnn import LOSS_NAMES, MaskRCNN
from segjax.ops.targets import RoiTargets
from segjax.tasks import instance
from segjax.training import steps
from segjax.training.train_state import TrainState
from segjax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE, G = 64, 4
TINY = dict(backbone="resnet18", backbone_width=8, fpn_channels=8, frozen_bn=False,
            trainable_layers=5, anchor_sizes=(8, 16, 32, 64, 128), rpn_pre_nms_top_n_train=32,
            rpn_post_nms_top_n_train=16, rpn_pre_nms_top_n_test=32, rpn_post_nms_top_n_test=16,
            rpn_batch_size_per_image=16, box_batch_size_per_image=8, representation_size=16,
            mask_channels=8, mask_num_convs=2, detections_per_img=6)


def _model(**kw):
  return MaskRCNN(num_classes=3, **{**TINY, **kw})


def _images(batch=2):
  return jax.random.normal(jax.random.key(0), (batch, SIZE, SIZE, 3))


def _targets(batch, count):
  """`count` valid square instances per image (0 = none), padded to G rows."""
  boxes = np.zeros((batch, G, 4), np.float32)
  masks = np.zeros((batch, G, SIZE, SIZE), np.uint8)
  for b in range(batch):
    for k in range(count):
      x, y = 4 + 14 * k, 6 + 10 * b
      boxes[b, k] = (x, y, x + 12, y + 16)
      masks[b, k, y:y + 16, x:x + 12] = 1
  valid = np.arange(G)[None].repeat(batch, 0) < count
  return {"boxes": jnp.asarray(boxes), "classes": jnp.asarray(np.arange(G)[None] % 3 *
                                                                 valid, jnp.int32),
          "instance_valid": jnp.asarray(valid), "masks": jnp.asarray(masks)}


@pytest.fixture(scope="module")
def variables():
  return jax.jit(_model().init)(jax.random.key(1), _images())


@pytest.mark.parametrize("count", [0, G])
def test_train_step_runs_with_no_and_with_all_instances(variables, count):
  model, tx = _model(), optax.sgd(0.01)
  state = TrainState.create(variables["params"], variables["batch_stats"], tx)
  step = jax.jit(lambda s, b, r: steps.train_step(
      s, b, r, objective=instance.objective(model=model, loss_weights={}), tx=tx,
      schedule=lambda _: 0.01))
  batch = {"image": _images(), **_targets(2, count)}
  new_state, metrics = step(state, batch, jax.random.key(2))
  for name in LOSS_NAMES:
    assert np.isfinite(metrics[f"loss_{name}"]), name
  if count == 0:  # nothing to regress or segment
    assert metrics["loss_rpn_box"] == 0 and metrics["loss_box"] == 0
    assert metrics["loss_mask"] == 0
  else:
    assert metrics["loss_rpn_box"] > 0 and metrics["loss_mask"] > 0
  assert np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, new_state.params)
  assert any(jax.tree.leaves(moved["backbone"]))


@pytest.mark.parametrize("term", ["classifier", "mask"])
def test_head_losses_reach_the_backbone_through_roi_align(variables, term):
  """The box and mask losses depend on the backbone only through RoIAlign's features."""
  model = _model()

  def loss(params):
    losses, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                            _images(), _targets(2, 2), jax.random.key(3), method="losses",
                            mutable=["batch_stats"])
    return losses[term]

  grads = jax.jit(jax.grad(loss))(variables["params"])
  norm = lambda tree: float(optax.global_norm(tree))
  assert norm(grads["backbone"]["backbone"]) > 0  # the ResNet
  assert norm(grads["backbone"]["fpn"]) > 0
  assert norm(grads["rpn_head"]) == 0  # proposals are not differentiated


def test_inference_outputs_are_padded_best_first(variables):
  out = jax.jit(_model().apply)(variables, _images())
  assert out["boxes"].shape == (2, 6, 4) and out["masks"].shape == (2, 6, 28, 28)
  valid, scores = np.asarray(out["valid"]), np.asarray(out["scores"])
  for v, s in zip(valid, scores):
    count = v.sum()
    assert v[:count].all() and not v[count:].any()  # valid rows first
    assert np.all(np.diff(s[:count]) <= 0)
  classes = np.asarray(out["classes"])[valid]
  assert ((classes >= 0) & (classes < 3)).all()
  masks = np.asarray(out["masks"])
  assert ((masks >= 0) & (masks <= 1)).all() and not masks[~valid].any()
  boxes = np.asarray(out["boxes"])[valid]
  assert (boxes >= 0).all() and (boxes <= SIZE).all()


def test_mask_slots_train_on_a_weighted_random_subset_of_the_foreground_rois(variables):
  """With fewer slots than foreground RoIs the mask loss is one RoI's loss, a different one for
  different keys, whose mean is the loss on both; with enough slots (the default) it is the
  loss on both."""
  batch, rows = 1, 8  # box_batch_size_per_image 8 in TINY: S = 8 sampled rows, at most 2 fg.
  levels = [jax.random.normal(jax.random.key(i), (batch, SIZE // s, SIZE // s, 8))
            for i, s in enumerate((4, 8, 16, 32))]
  targets = _targets(batch, 2)
  labels = jnp.zeros((batch, rows), jnp.int32).at[0, 1].set(1).at[0, 5].set(3)
  roi_t = RoiTargets(boxes=jnp.tile(targets["boxes"][:, :2], (1, rows // 2, 1)), labels=labels,
                     box_targets=jnp.zeros((batch, rows, 4)),
                     matched_idx=jnp.tile(jnp.arange(2, dtype=jnp.int32), (batch, rows // 2)),
                     valid=jnp.ones((batch, rows), bool))

  def mask_loss(model, roi_t, key):
    return model.apply(variables, levels, roi_t, targets, targets["boxes"], key,
                       method=lambda m, *a: m._mask_loss(*a))

  assert _model().mask_slot_count() == 2 and _model(mask_slots=50).mask_slot_count() == 2
  assert MaskRCNN(num_classes=3).mask_slot_count() == 32  # the default
  assert MaskRCNN(num_classes=3, mask_slots=None).mask_slot_count() == 128  # 512 x 0.25
  both = float(mask_loss(_model(), roi_t, jax.random.key(0)))
  assert np.isclose(float(mask_loss(_model(mask_slots=50), roi_t, jax.random.key(1))), both,
                    rtol=1e-6)
  alone = [float(mask_loss(_model(mask_slots=2), roi_t._replace(labels=jnp.where(
      jnp.arange(rows) == keep, labels, 0)), jax.random.key(0))) for keep in (1, 5)]
  assert np.isclose(both, np.mean(alone), rtol=1e-5) and not np.isclose(*alone)
  one_slot = {float(mask_loss(_model(mask_slots=1), roi_t, jax.random.key(k)))
              for k in range(12)}
  assert len(one_slot) == 2 and all(np.isclose(alone, v, rtol=1e-5).any() for v in one_slot)
  with pytest.raises(ValueError, match="mask_slots"):
    mask_loss(_model(mask_slots=0), roi_t, jax.random.key(0))


def test_mask_chunks_give_the_loss_and_gradients_of_one_pass(variables):
  """The mask branch in chunks of 1 slot, those without foreground skipped, equals one pass
  over all the slots: loss and gradients of the mask head and of the FPN levels."""
  batch, rows = 2, 16  # box_batch_size_per_image 16: 4 slots, 3 foreground at most
  levels = [jax.random.normal(jax.random.key(i), (batch, SIZE // s, SIZE // s, 8))
            for i, s in enumerate((4, 8, 16, 32))]
  targets = _targets(batch, 2)
  labels = jnp.zeros((batch, rows), jnp.int32).at[0, jnp.array([2, 7, 11])].set(
      jnp.array([1, 3, 2])).at[1, 4].set(2)
  roi_t = RoiTargets(boxes=jnp.tile(targets["boxes"][:, :2] + jnp.array([0., 1., 2., 0.]),
                                    (1, rows // 2, 1)), labels=labels,
                     box_targets=jnp.zeros((batch, rows, 4)),
                     matched_idx=jnp.tile(jnp.arange(2, dtype=jnp.int32), (batch, rows // 2)),
                     valid=jnp.ones((batch, rows), bool))

  def loss_and_grads(chunk):
    model = _model(box_batch_size_per_image=rows, mask_chunk=chunk)
    assert model.mask_slot_count() == 4

    def loss(params, levels):
      return model.apply({**variables, "params": params}, levels, roi_t, targets,
                         targets["boxes"], jax.random.key(4),
                         method=lambda m, *a: m._mask_loss(*a))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables["params"], levels)

  (one, (params_1, levels_1)), (chunked, (params_c, levels_c)) = map(loss_and_grads, (0, 1))
  assert float(one) > 0
  np.testing.assert_allclose(float(chunked), float(one), rtol=1e-6)
  for a, b in zip(jax.tree.leaves((params_c["mask_head"], levels_c)),
                  jax.tree.leaves((params_1["mask_head"], levels_1))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
  assert float(optax.global_norm(params_c["mask_head"])) > 0
  with pytest.raises(ValueError, match="mask_chunk"):
    loss_and_grads(-1)


def test_faster_rcnn_has_no_mask_branch():
  model = _model(mask=False)
  variables = jax.jit(model.init)(jax.random.key(1), _images())
  assert "mask_head" not in variables["params"]
  losses, _ = jax.jit(lambda v, t: model.apply(v, _images(), t, jax.random.key(0),
                                                method="losses", mutable=["batch_stats"]))(
                                                    variables, _targets(2, 2))
  assert set(losses) == set(LOSS_NAMES) - {"mask"}
  assert "masks" not in jax.jit(model.apply)(variables, _images())


def test_mask_training_needs_masks(variables):
  targets = {k: v for k, v in _targets(2, 1).items() if k != "masks"}
  with pytest.raises(ValueError, match="instance masks"):
    _model().apply(variables, _images(), targets, jax.random.key(0), method="losses",
                   mutable=["batch_stats"])


def test_configs_build():
  for module, variant in ((maskrcnn_coco, ""), (maskrcnn_coco, "3x"), (fasterrcnn_coco, ""),
                          (maskrcnn_shapes, "")):
    config = module.get_config(variant)
    assert config.model.name == "mask_rcnn"
  assert not fasterrcnn_coco.get_config().model.options.mask
  assert "crop_masks" in maskrcnn_coco.get_config().data.train_ops


def _smoke_config(module, data_dir):
  config = module.get_config("smoke")
  config.unlock()
  config.data.data_dir = data_dir
  config.lock()
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("maskrcnn")
  data_dir, workdir = str(root / "tfds"), str(root / "run")
  result = trainer.train_and_evaluate(_smoke_config(maskrcnn_shapes, data_dir), workdir)
  return data_dir, workdir, result


def test_training_reports_coco_ap_and_draws_a_panel(trained):
  _, workdir, result = trained
  for iou_type in ("bbox", "segm"):
    assert 0 <= result[f"{iou_type}_AP"] <= 1
    assert set(result[iou_type]["per_class"]) == {"disk", "square", "triangle", "ring"}
  assert os.listdir(os.path.join(workdir, "predictions"))


def _cli(script, *args, data_dir):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run(
      [sys.executable, os.path.join(REPO, script), "--config",
       "configs/maskrcnn_shapes.py:smoke", f"--config.data.data_dir={data_dir}", *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_eval_command_reproduces_training_ap(trained, tmp_path):
  data_dir, workdir, result = trained
  output = tmp_path / "metrics.json"
  run = _cli("eval.py", "--checkpoint", workdir, f"--output={output}", data_dir=data_dir)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "segm: AP" in run.stdout
  metrics = json.load(open(output))
  for key in ("bbox_AP", "segm_AP", "bbox_AP50"):
    np.testing.assert_allclose(metrics[key], result[key], rtol=1e-9)


def test_predict_command_draws_instances(trained, tmp_path):
  data_dir, workdir, _ = trained
  image = np.zeros((70, 90, 3), np.uint8)  # any size; padded to a multiple of 32 inside
  image[10:40, 20:60] = (220, 30, 30)
  Image.fromarray(image).save(tmp_path / "scene.png")
  run = _cli("predict.py", "--checkpoint", workdir, f"--input={tmp_path / 'scene.png'}",
             f"--output={tmp_path / 'out'}", data_dir=data_dir)
  assert run.returncode == 0, run.stderr[-3000:]
  drawn = np.asarray(Image.open(tmp_path / "out" / "scene_instances.jpg"))
  assert drawn.shape == (70, 90, 3)
  results = json.load(open(tmp_path / "out" / "scene.json"))
  for r in results:  # the COCO results format, masks at the image's own size
    assert r["category"] in ("disk", "square", "triangle", "ring")
    assert r["segmentation"]["size"] == [70, 90]


def test_whole_detector_weights_load_with_init_from(trained, tmp_path):
  """A converted whole-model file (as from --arch maskrcnn_resnet50_fpn) replaces every
  module it holds, not only the encoder."""
  data_dir, workdir, result = trained
  state = result["state"]
  path = str(tmp_path / "detector.npz")
  save_variables({"params": jax.device_get(state.params),
                  "batch_stats": jax.device_get(state.batch_stats)}, path)
  config = _smoke_config(maskrcnn_shapes, data_dir)
  config.unlock()
  config.model.init_from = path
  config.total_steps = 0
  config.lock()
  loaded = trainer.train_and_evaluate(config, str(tmp_path / "fresh"))["state"]
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                      loaded.params, load_variables(path)["params"])
  assert all(jax.tree.leaves(same))


def test_faster_rcnn_trains_and_reports_box_ap_only(trained, tmp_path):
  config = _smoke_config(fasterrcnn_coco, trained[0])
  config.unlock()
  config.total_steps = config.eval_every = config.checkpoint_every = 2
  config.lock()
  result = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert "bbox" in result and "segm" not in result
  assert 0 <= result["bbox_AP"] <= 1
