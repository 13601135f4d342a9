"""uint8 images to the device: `device.normalize` reproduces the host `normalize` op bit
for bit, and a train step, a batched evaluation and a prediction of a semantic model
(U-Net) and of Mask R-CNN give exactly what they gave on host-normalized float32 batches
(the pipelines as they were: the task's ops followed by `normalize`). Also
`prefetch_to_device`: order, how far ahead it reads and transfers, global arrays."""
import functools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import maskrcnn_shapes, unet_shapes
from segjax.data import device, pipeline, shapes, transforms
from segjax.data.sources import DatasetSpec
from segjax.inference import instances
from segjax.inference.semantic import SemanticPredictor
from segjax.tasks import get_task, instance, semantic, variables_of
from segjax.training import optimizers, sharding, steps
from segjax.training.train_state import create_train_state

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
# Random resizes below the crop size: the crop pads (uint8 0 before normalization).
SEMANTIC_OPS = ("random_resize(scale=(48, 48), ratio_range=(0.5, 1.0))|"
                "random_crop(size=(48, 48))|random_flip(prob=0.5)|photometric_distortion")
INSTANCE_OPS = ("instance_masks|random_resize(scale=(64, 64), ratio_range=(0.6, 1.0))|"
                "random_crop(size=(64, 64))|random_flip(prob=0.5)")


def _equal(a, b):
  """Every leaf of two pytrees bit for bit equal."""
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def dataset():
  """segjax_shapes' classes with 8 generated scenes per split, held in memory."""
  records = {split: [shapes.generate_example(np.random.default_rng([seed, i]))
                     for i in range(8)] for split, seed in (("train", 1), ("validation", 2))}
  return DatasetSpec(name="segjax_shapes", class_names=shapes.CLASS_NAMES,
                     palette=np.asarray(shapes.PALETTE, np.uint8),
                     ignore_index=shapes.IGNORE_INDEX, splits=("train", "validation"),
                     open_split=lambda split: records[split.split("[")[0]],
                     thing_classes=shapes.THING_CLASSES)


def _config(module, train_ops, eval_ops, batch_size, eval_split, **options):
  config = module.get_config("smoke")
  with config.unlocked():
    config.data.train_ops, config.data.eval_ops = train_ops, eval_ops
    config.data.eval_split = eval_split
    config.data.batch_size = config.data.eval_batch_size = batch_size
    config.data.mean, config.data.std = (120.0, 110.5, 100.25), (60.0, 55.5, 50.75)
    config.model.options.update(options)
  return config


# name -> (config, devices): the U-Net sharded over the 8 devices as the trainer does;
# Mask R-CNN (the smallest that runs) on one device, whose programs compile much faster.
CONFIGS = {
    "semantic": (lambda: _config(unet_shapes, SEMANTIC_OPS, "", 8, "validation"), 8),
    "instance": (lambda: _config(
        maskrcnn_shapes, INSTANCE_OPS, "instance_masks|resize(scale=(48, 48))|pad(size=(64, 64))",
        2, "validation[:4]", fpn_channels=8, rpn_pre_nms_top_n_train=32,
        rpn_post_nms_top_n_train=16, rpn_pre_nms_top_n_test=32, rpn_post_nms_top_n_test=16,
        rpn_batch_size_per_image=16, box_batch_size_per_image=8, representation_size=16,
        mask_channels=8, mask_num_convs=2, detections_per_img=6), 1),
}


def _host_normalized(config, ops):
  """The pipeline as it was: the task's ops, then `normalize` on the host."""
  return transforms.compose(ops, transforms.normalize(mean=tuple(config.data.mean),
                                                      std=tuple(config.data.std)))


@pytest.fixture(scope="module", params=list(CONFIGS))
def setup(request, dataset):
  """(config, task, model, initial state, shardings, mesh) of a tiny model of each task."""
  make_config, num_devices = CONFIGS[request.param]
  config = make_config()
  task = get_task(config)
  model = task.build_model(config, dataset)
  mesh = sharding.create_mesh((("data", -1),), jax.devices()[:num_devices])
  tx, schedule = optimizers.create_optimizer(config.optimizer, config.total_steps, None,
                                             config.data.batch_size)
  ops = task.data_ops(config, config.data.train_ops, dataset)
  shape = pipeline.example_shapes(dataset.source("train"), ops, ("image",))["image"]
  state, shardings = create_train_state(model, tx, jax.random.key(0), (1,) + shape, mesh, ())
  return config, task, model, state, shardings, mesh, tx, schedule


def test_lookup_normalization_is_the_host_op_bit_for_bit():
  rng = np.random.default_rng(0)
  images = np.concatenate([np.arange(256, dtype=np.uint8).repeat(3).reshape(1, 16, 16, 3),
                           rng.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)])
  for mean, std in ((MEAN, STD), ((0.5, 255.0, 17.3), (0.1, 3.3, 99.0))):
    want = np.stack([transforms.normalize(mean=mean, std=std)({"image": x}, None)["image"]
                     for x in images])
    got = jax.jit(functools.partial(device.normalize, mean=mean, std=std))(images)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(got), want)
    # The pixels beyond each image's extent become 0 after normalization.
    extent = np.int32([[5, 16], [16, 3]])
    cut = np.asarray(jax.jit(functools.partial(device.normalize, mean=mean, std=std))(
        images, extent=extent))
    mask = np.zeros(images.shape, bool)
    mask[0, :5], mask[1, :, :3] = True, True
    np.testing.assert_array_equal(cut, np.where(mask, want, 0.0))
  # Normalized (float) images pass through; other dtypes are refused with a sentence.
  floats = np.ones((1, 4, 4, 3), np.float32)
  assert device.normalize(floats) is floats
  with pytest.raises(ValueError, match="uint8 RGB images"):
    device.normalize(np.ones((1, 4, 4, 3), np.int32))
  with pytest.raises(ValueError, match="positive stds"):
    device.normalize(images, std=(1.0, 0.0, 1.0))


def test_the_task_pipelines_ship_uint8(setup, dataset):
  config, task = setup[:2]
  for ops in (config.data.train_ops, config.data.eval_ops):
    example = task.data_ops(config, ops, dataset)(dataset.source("train")[0],
                                                  np.random.default_rng(0))
    assert example["image"].dtype == np.uint8
    if "label" in example:
      assert example["label"].dtype == np.uint8


def test_train_step_equals_host_normalization(setup, dataset):
  config, task, model, state, shardings, mesh, tx, schedule = setup
  batch_sharding = sharding.batch_sharding(mesh, ("data",))
  step = jax.jit(functools.partial(steps.train_step, objective=task.objective(config, model,
                                                                              dataset),
                                   tx=tx, schedule=schedule, **steps.step_options(config, mesh)),
                 in_shardings=(shardings, batch_sharding, NamedSharding(mesh, P())),
                 out_shardings=(shardings, NamedSharding(mesh, P())))
  ops = task.data_ops(config, config.data.train_ops, dataset)
  results = {}
  for name, pipe in (("uint8", ops), ("float32", _host_normalized(config, ops))):
    batch = next(pipeline.train_iterator(dataset.source("train"), pipe,
                                         config.data.batch_size, seed=3,
                                         keys=task.train_keys,
                                         optional_keys=task.optional_train_keys))
    assert batch["image"].dtype == np.dtype(name)
    results[name] = step(state, pipeline.to_global(batch, batch_sharding), jax.random.key(1))
  new_state, metrics = results["uint8"]
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
  _equal(results["uint8"], results["float32"])  # loss, scalars, parameters, optimizer state


def test_batched_evaluation_equals_host_normalization(setup, dataset):
  config, task, model, state, shardings, mesh = setup[:6]
  batch_sharding = sharding.batch_sharding(mesh, ("data",))
  variables = variables_of(state)
  evaluator = task.evaluator(config, dataset, model, variable_shardings=variables_of(shardings),
                             batch_sharding=batch_sharding)
  old_ops = _host_normalized(config, evaluator.ops)
  if config.model.name == "mask_rcnn":
    old = instance.CocoInstanceEvaluator(config, dataset, model, old_ops,
                                         variables_of(shardings), batch_sharding)
  else:
    old = semantic.BatchedSemanticEvaluator(config, dataset, model, old_ops,
                                            variables_of(shardings), batch_sharding)
  new_metrics, old_metrics = evaluator.evaluate(variables), old.evaluate(variables)
  assert next(iter(evaluator.inputs()))["image"].dtype == np.uint8
  assert next(iter(old.inputs()))["image"].dtype == np.float32
  assert new_metrics.keys() == old_metrics.keys()
  for key, value in new_metrics.items():
    if isinstance(value, float) and np.isnan(value):
      assert np.isnan(old_metrics[key]), key
    elif not isinstance(value, dict):
      np.testing.assert_array_equal(value, old_metrics[key], err_msg=key)
  panel = evaluator.panel()
  assert panel is None or panel.dtype == np.uint8


def test_prediction_equals_host_normalization(setup, dataset):
  config, task, model, state = setup[:4]
  variables = jax.device_get(variables_of(state))
  image = dataset.source("validation")[3]["image"][5:52, 9:70]  # 47x61: padded to 64x64
  predictor = task.predictor(task.prediction_config(config), dataset, model, variables)
  mean, std = np.float32(config.data.mean), np.float32(config.data.std)
  normalized = transforms.normalize(mean=tuple(config.data.mean), std=tuple(config.data.std))(
      {"image": image}, None)["image"]
  padded = np.zeros((1, 64, 64, 3), np.float32)  # zeros after normalization, as before
  padded[0, :47, :61] = normalized
  if config.model.name == "mask_rcnn":
    detect = jax.jit(functools.partial(instances.detect_at_original_size, model=model,
                                       mean=tuple(mean), std=tuple(std)),
                     static_argnames="mask_size")
    want = detect(variables, {"image": padded, "resized_size": np.int32([[47, 61]]),
                              "original_size": np.int32([[47, 61]])}, mask_size=(47, 61))
    _equal(predictor(image), {k: np.asarray(v)[0] for k, v in want.items()})
  else:
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, padded)[0]
    want = np.argmax(np.asarray(logits, np.float32)[:47, :61], -1)
    np.testing.assert_array_equal(predictor(image), want)
    whole = SemanticPredictor(model, variables, dataset.num_classes, mean=config.data.mean,
                              std=config.data.std, mode="whole")
    np.testing.assert_array_equal(np.asarray(whole._whole(image))[:47, :61],
                                  np.asarray(logits)[:47, :61])


def test_prefetch_reads_and_transfers_ahead_in_order():
  log = []

  def source():
    for i in range(5):
      log.append(("read", i))
      yield {"x": np.full((8, 2), i, np.uint8)}

  def transfer(item):
    log.append(("put", int(item["x"][0, 0])))
    return device.put(item)

  got = []
  for item in device.prefetch_to_device(source(), 2, transfer):
    got.append(int(item["x"][0, 0]))
    log.append(("use", got[-1]))
  assert got == list(range(5))
  # Item s + 1 is read and its transfer started before item s is used; never further ahead.
  for s in range(4):
    assert log.index(("put", s + 1)) < log.index(("use", s))
    if s + 2 < 5:
      assert log.index(("read", s + 2)) > log.index(("use", s))
  mesh = sharding.create_mesh((("data", -1),))
  batch_sharding = sharding.batch_sharding(mesh, ("data",))
  batches = [{"image": np.full((8, 4, 4, 3), i, np.uint8)} for i in range(3)]
  out = list(device.prefetch_to_device(iter(batches), 3, sharding=batch_sharding))
  assert len(out) == 3 and all(b["image"].sharding == batch_sharding for b in out)
  _equal(out, batches)
  with pytest.raises(ValueError, match="size must be >= 1"):
    list(device.prefetch_to_device(iter(batches), 0))
