"""Every config and variant builds: its model and options exist, its dataset is
registered with a matching number of classes, and its ops parse."""
import importlib

import jax
import jax.numpy as jnp
import pytest

from segjax.data import sources
from segjax.tasks import get_task

CONFIGS = {
    "unet_shapes": ("", "smoke"),
    "pspnet_ade20k": ("", "160k", "smoke"),
    "deeplabv3_ade20k": ("", "160k", "smoke"),
    "deeplabv3plus_ade20k": ("", "160k", "smoke"),
    "fcn_ade20k": ("", "160k", "smoke"),
    "pspnet_cityscapes": ("", "40k", "smoke"),
    "deeplabv3plus_voc": ("", "40k", "smoke"),
    "deeplabv3plus_cityscapes": ("", "40k", "smoke"),
    "fcn8s_voc": ("", "smoke"),
    "segnet_camvid": ("", "smoke"),
    "unet_cityscapes": ("", "smoke"),
    "maskrcnn_shapes": ("", "smoke"),
    "maskrcnn_coco": ("", "3x", "smoke"),
    "fasterrcnn_coco": ("", "3x", "smoke"),
    "panoptic_fpn_shapes": ("", "smoke"),
    "panoptic_fpn_coco": ("", "3x", "smoke"),
    "panoptic_fpn_cityscapes": ("", "smoke"),
    "sam_vit_b": ("", "smoke"),
}


@pytest.mark.parametrize("module,variant", [(m, v) for m, vs in CONFIGS.items() for v in vs])
def test_config_builds(module, variant):
  """Through its task, as training builds it: the config validates (no setting the task
  ignores), its model gets the dataset's classes (thing classes for detectors)."""
  config = importlib.import_module(f"configs.{module}").get_config(variant)
  assert config.data.name in sources.DATASETS.names()
  task = get_task(config)
  task.validate(config)
  dataset = sources.dataset_classes(config.data.name)
  num_classes = task.num_classes(dataset)
  assert not config.loss.class_weights or len(config.loss.class_weights) == num_classes
  for ops in (config.data.train_ops, config.data.eval_ops):
    task.data_ops(config, ops, dataset)
  model = task.build_model(config, dataset)
  assert model.num_classes == num_classes
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  if config.model.name != "unet_valid":
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    assert "params" in shapes


def test_unknown_variant_names_the_choices():
  for module in CONFIGS:
    with pytest.raises(ValueError, match="Unknown variant 'nope'"):
      importlib.import_module(f"configs.{module}").get_config("nope")
