"""Every config and variant builds: its model and options exist, its dataset is
registered with a matching number of classes, and its ops parse."""
import importlib

import jax
import jax.numpy as jnp
import pytest

from segjax.data import sources, transforms
from segjax.models import MODELS, build_model

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
}


def _classes(name, model_name):
  """(number of model classes, extra constructor options): the dataset's classes, or its
  thing classes for an instance model, plus thing/stuff ids for a panoptic one."""
  if name == "segjax_shapes":
    from segjax.data import shapes
    names, things = shapes.CLASS_NAMES, shapes.THING_CLASSES
  else:
    dataset = sources.archive_dataset(name)
    names, things = dataset.class_names, dataset.thing_classes
  task = getattr(MODELS.get(model_name), "task", "semantic")
  if task == "semantic":
    return len(names), {}
  extra = {}
  if task == "panoptic":
    extra = dict(thing_classes=tuple(things),
                 stuff_classes=tuple(c for c in range(len(names)) if c not in things))
  return len(things), extra


@pytest.mark.parametrize("module,variant", [(m, v) for m, vs in CONFIGS.items() for v in vs])
def test_config_builds(module, variant):
  config = importlib.import_module(f"configs.{module}").get_config(variant)
  assert config.data.name in sources.DATASETS.names()
  num_classes, extra = _classes(config.data.name, config.model.name)
  assert not config.loss.class_weights or len(config.loss.class_weights) == num_classes
  for ops in (config.data.train_ops, config.data.eval_ops):
    transforms.parse_pipeline(ops)
  model = build_model(config.model.name, num_classes, {**config.model.options, **extra})
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  if config.model.name != "unet_valid":
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    assert "params" in shapes


def test_unknown_variant_names_the_choices():
  for module in CONFIGS:
    with pytest.raises(ValueError, match="Unknown variant 'nope'"):
      importlib.import_module(f"configs.{module}").get_config("nope")
