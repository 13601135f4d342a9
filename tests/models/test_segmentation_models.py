"""PSPNet, DeepLabV3 and FCN-ResNet: output sizes, auxiliary outputs, and
parameter counts against the reference architectures."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.models import build_model


def _param_count(model, shape=(1, 64, 64, 3)):
  variables = jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                         jnp.zeros(shape), train=True))
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))


SMALL = {
    "pspnet": {"backbone": "resnet18", "head_channels": 16, "aux_channels": 8},
    "deeplabv3": {"backbone": "resnet18", "channels": 16, "aux_channels": 8},
    "fcn_resnet": {"backbone": "resnet18", "channels": 16, "aux_channels": 8},
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_logits_at_odd_input_size_and_aux_in_training(name):
  model = build_model(name, 5, SMALL[name])
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 97, 129, 3)), jnp.float32)
  variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, images,
                         train=True)
  logits = model.apply(variables, images, train=False)
  assert logits.shape == (2, 97, 129, 5)
  outputs, _ = model.apply(variables, images, train=True, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.key(2)})
  assert set(outputs) == {"logits", "aux_logits"}
  assert outputs["aux_logits"].shape == (2, 97, 129, 5)


def test_pspnet_r50_d8_parameter_count():
  """mmseg pspnet_r50-d8 with 150 classes, counted from its architecture:
  ResNet-50-v1c 23,527,264 (torchvision's 23,508,032 with the 7x7 stem conv and
  its BN, 9,536, replaced by 3x3 convs 3->32->32->64 and their BNs, 28,768);
  PPM 4 x (2048*512 + 1,024 BN) = 4,198,400; bottleneck 3x3 4096->512 + BN
  18,875,392; classifier 512*150 + 150 = 76,950; aux FCN head 3x3 1024->256 + BN
  2,359,808 and classifier 256*150 + 150 = 38,550. Total 49,076,364."""
  model = build_model("pspnet", 150, {})
  assert _param_count(model) == 49_076_364


@pytest.mark.parametrize("name, reference", [("deeplabv3", "deeplabv3_resnet50"),
                                             ("fcn_resnet", "fcn_resnet50")])
def test_parameter_counts_equal_torchvision(name, reference):
  from tests.torch_reference import import_torchvision
  torchvision = import_torchvision()
  ref = getattr(torchvision.models.segmentation, reference)(
      weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
  expected = sum(p.numel() for p in ref.parameters())
  assert _param_count(build_model(name, 21, {"aux_channels": 256})) == expected


@pytest.mark.parametrize("config_name, model_name", [
    ("pspnet_ade20k", "pspnet"), ("deeplabv3_ade20k", "deeplabv3_mmseg"),
    ("deeplabv3plus_voc", "deeplabv3plus"), ("fcn8s_voc", "fcn8s"),
    ("segnet_camvid", "segnet")])
def test_smoke_config_trains_on_eight_devices(tmp_path, config_name, model_name):
  import importlib
  import json
  from segjax.training import trainer
  config = importlib.import_module(f"configs.{config_name}").get_config("smoke")
  assert config.model.name == model_name
  config.unlock()
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.eval_split = "validation[:32]"
  config.lock()
  assert jax.device_count() == 8
  result = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  kernel = jax.tree.leaves(result["state"].params)[0]
  assert len(kernel.sharding.device_set) == 8
  assert ("aux_head" in result["state"].params) == bool(
      config.model.options.get("aux_channels"))
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert np.mean(losses[-3:]) < 0.95 * np.mean(losses[:3]), losses


@pytest.mark.parametrize("name, reference", [("deeplabv3", "deeplabv3_resnet50"),
                                             ("fcn_resnet", "fcn_resnet50")])
def test_outputs_equal_torchvision_with_converted_weights(name, reference):
  import torch
  from segjax.convert import torch_segmentation_to_flax
  from tests.torch_reference import import_torchvision
  torchvision = import_torchvision()
  torch.manual_seed(0)
  ref = getattr(torchvision.models.segmentation, reference)(
      weights=None, weights_backbone=None, num_classes=21, aux_loss=True).eval()
  with torch.no_grad():  # BatchNorm that is not the identity
    for module in ref.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.2, 0.2)
        module.running_mean.uniform_(-0.2, 0.2)
        module.running_var.uniform_(0.5, 1.5)
  image = np.random.default_rng(0).normal(size=(1, 65, 67, 3)).astype(np.float32)
  with torch.no_grad():
    expected = ref(torch.from_numpy(image).permute(0, 3, 1, 2))["out"].permute(0, 2, 3, 1).numpy()
  model = build_model(name, 21, {"aux_channels": 256})
  variables = torch_segmentation_to_flax(
      {k: v.numpy() for k, v in ref.state_dict().items()}, model)
  ours = np.asarray(model.apply(variables, jnp.asarray(image), train=False))
  assert ours.shape == expected.shape == (1, 65, 67, 21)
  assert np.max(np.abs(ours - expected)) / np.max(np.abs(expected)) <= 1e-4


def test_init_from_loads_converted_encoder_weights(tmp_path):
  import optax
  from segjax.convert import save_variables, torch_resnet_to_flax
  from segjax.training import sharding
  from segjax.training.train_state import create_train_state
  from tests.torch_reference import import_torchvision
  torchvision = import_torchvision()
  state_dict = {k: v.numpy() for k, v in torchvision.models.resnet18(weights=None)
                .state_dict().items()}
  path = str(tmp_path / "resnet18.npz")
  save_variables(torch_resnet_to_flax(state_dict, 18), path)
  mesh = sharding.create_mesh((("data", -1),))
  model = build_model("pspnet", 5, {"backbone": "resnet18", "head_channels": 8,
                                    "aux_channels": 4})
  state, _ = create_train_state(model, optax.sgd(0.1), jax.random.key(0), (1, 64, 64, 3), mesh,
                                (), init_from=path)
  np.testing.assert_array_equal(
      np.asarray(state.params["backbone"]["stage2_block0"]["conv1"]["kernel"]),
      state_dict["layer2.0.conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      np.asarray(state.batch_stats["backbone"]["stem_bn1"]["var"]), state_dict["bn1.running_var"])
  small = build_model("pspnet", 5, {"backbone": "resnet18", "backbone_width": 8,
                                    "head_channels": 8, "aux_channels": 4})
  with pytest.raises(ValueError, match="does not fit this model's encoder"):
    create_train_state(small, optax.sgd(0.1), jax.random.key(0), (1, 64, 64, 3), mesh, (),
                       init_from=path)
  with pytest.raises(ValueError, match=r"nope\.npz' is no file"):
    create_train_state(small, optax.sgd(0.1), jax.random.key(0), (1, 64, 64, 3), mesh, (),
                       init_from=str(tmp_path / "nope.npz"))
