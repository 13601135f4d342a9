"""Model shapes, dtypes, registry and input checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.models import MODELS, build_model

TINY = {"unet": {"width": 4, "depth": 3},
        "fcn8s": {"backbone": "vgg16_bn", "width": 4, "fc_width": 16, "pad_first": 0}}


def _init(model, shape):
  return model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                    jnp.zeros(shape), train=False)


@pytest.mark.parametrize("name", sorted(TINY))
def test_logits_at_input_resolution(name):
  model = build_model(name, 5, TINY[name])
  variables = _init(model, (2, 64, 96, 3))
  logits = model.apply(variables, jnp.ones((2, 64, 96, 3)))
  assert logits.shape == (2, 64, 96, 5) and logits.dtype == jnp.float32
  # Training mode updates the BatchNorm statistics.
  _, updates = model.apply(variables, jnp.ones((2, 64, 96, 3)), train=True,
                           mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)})
  assert not jax.tree.all(jax.tree.map(jnp.array_equal, updates["batch_stats"],
                                       variables["batch_stats"]))


@pytest.mark.parametrize("name", sorted(TINY))
def test_bfloat16_compute_float32_params(name):
  model = build_model(name, 3, TINY[name], dtype="bfloat16", param_dtype="float32")
  variables = _init(model, (1, 64, 64, 3))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
  out = jax.jit(lambda v, x: model.apply(v, x))(variables, jnp.ones((1, 64, 64, 3)))
  assert out.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(out)))


def test_unet_structure_follows_the_paper():
  model = build_model("unet", 2, {"width": 8, "depth": 2})
  params = _init(model, (1, 32, 32, 3))["params"]
  # Transposed convs are 2x2 and halve the channels; 1x1 classifier.
  assert params["upsample1"]["kernel"].shape == (2, 2, 32, 16)
  assert params["upsample0"]["kernel"].shape == (2, 2, 16, 8)
  # After concatenation with the encoder feature the first up conv sees 2x channels.
  assert params["up1"]["conv0"]["conv"]["kernel"].shape == (3, 3, 32, 16)
  assert params["classifier"]["kernel"].shape == (1, 1, 8, 2)


def test_registry_and_bad_inputs():
  assert {"unet", "fcn8s"} <= set(MODELS.names())
  with pytest.raises(KeyError, match="Unknown model 'nope'.*fcn8s.*unet"):
    build_model("nope", 3, {})
  with pytest.raises(ValueError, match="no option.*'widht'"):
    build_model("unet", 3, {"widht": 4})
  model = build_model("unet", 3, TINY["unet"])
  variables = _init(model, (1, 32, 32, 3))
  with pytest.raises(ValueError,
                     match=r"shaped \(batch, height, width, 3\), got shape \(32, 32, 3\)"):
    model.apply(variables, jnp.ones((32, 32, 3)))
  with pytest.raises(ValueError, match="dtype uint8"):
    model.apply(variables, jnp.ones((1, 32, 32, 3), jnp.uint8))
  with pytest.raises(ValueError, match="divisible by 8"):
    model.apply(variables, jnp.ones((1, 36, 32, 3)))
