"""segjax's SAM beyond parity: registry and options, input errors, bf16, sharding over the
8-device test mesh, the fine-tuning freeze mask, and the official checkpoints' key sets."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from segjax.convert.sam import check_shapes, torch_name
from segjax.models import build_model
from segjax.models.sam import VARIANTS, Sam
from segjax.training import sharding

TINY = dict(image_size=64, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
            encoder_global_attn_indexes=(1,), window_size=3, prompt_embed_dim=32,
            decoder_depth=1, decoder_num_heads=2, decoder_mlp_dim=32, iou_head_hidden_dim=32)


def _random_variables(model, seed=0):
  """Random values in the shapes of `model`'s variables (compiling `init` costs seconds)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(model.input_shape))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(scale=0.3, size=s.shape), s.dtype), shapes)


@pytest.fixture(scope="module")
def tiny():
  model = Sam(**TINY)
  return model, _random_variables(model)


@pytest.fixture(scope="module")
def tiny_outputs(tiny):
  """(images, prompts, float32 outputs of `__call__`) shared by the bf16 and sharding tests."""
  model, variables = tiny
  images = jnp.asarray(np.random.default_rng(2).normal(size=(8, 64, 64, 3)), jnp.float32)
  prompts = _prompts(8, 2, seed=3)
  return images, prompts, jax.jit(model.apply)(variables, images, **prompts)


def _prompts(b, q, n=2, seed=0):
  rng = np.random.default_rng(seed)
  return dict(point_coords=jnp.asarray(rng.uniform(0, 64, (b, q, n, 2)), jnp.float32),
              point_labels=jnp.asarray(rng.integers(0, 2, (b, q, n)), jnp.int32),
              boxes=jnp.asarray(np.sort(rng.uniform(0, 64, (b, q, 2, 2)), 2).reshape(b, q, 4),
                                jnp.float32),
              box_valid=jnp.asarray(rng.random((b, q)) < 0.5))


def test_registry_builds_variants():
  model = build_model("sam", 0, {"variant": "vit_l"})
  assert isinstance(model, Sam)
  assert model.encoder_settings() == (1024, 24, 16, (5, 11, 17, 23))
  assert Sam(variant="vit_h").encoder_settings() == VARIANTS["vit_h"]
  assert model.input_shape == (1, 1024, 1024, 3) and model.mask_input_size == 256
  assert Sam.task == "promptable"
  with pytest.raises(ValueError, match="Unknown SAM variant 'vit_x'"):
    Sam(variant="vit_x").encoder_settings()
  with pytest.raises(ValueError, match="no option"):
    build_model("sam", 0, {"varient": "vit_b"})


def test_bad_inputs_are_named(tiny):
  model, variables = tiny
  emb = jnp.zeros((1, 4, 4, 32))
  decode = functools.partial(model.apply, variables, method=Sam.decode)
  with pytest.raises(ValueError, match="point_labels must have shape"):
    decode(emb, point_coords=jnp.zeros((1, 2, 3, 2)), point_labels=jnp.zeros((1, 2, 2)))
  with pytest.raises(ValueError, match="point_coords and point_labels together"):
    decode(emb, point_coords=jnp.zeros((1, 2, 3, 2)))
  with pytest.raises(ValueError, match="mask_inputs must have shape"):
    decode(emb, mask_inputs=jnp.zeros((1, 1, 32, 32, 1)))
  with pytest.raises(ValueError, match="box_valid without boxes"):
    decode(emb, box_valid=jnp.ones((1, 1), bool))
  with pytest.raises(ValueError, match="image_embeddings must have shape"):
    decode(jnp.zeros((1, 8, 8, 32)))
  embed = functools.partial(model.apply, variables, method=Sam.embed_image)
  with pytest.raises(ValueError, match="resize their longest side"):
    embed(jnp.zeros((1, 65, 64, 3)))
  with pytest.raises(ValueError, match="floating-point"):
    embed(jnp.zeros((1, 64, 64, 3), jnp.uint8))


def test_bfloat16_follows_float32(tiny, tiny_outputs):
  """dtype=bfloat16 computes with the same float32 parameters and stays close; bfloat16
  parameters initialise too."""
  model, variables = tiny
  images, prompts, (low, iou) = tiny_outputs
  bf16 = Sam(**TINY, dtype=jnp.bfloat16)
  low16, iou16 = jax.jit(bf16.apply)(variables, images, **prompts)
  assert low16.dtype == jnp.float32 and low16.shape == low.shape == (8, 2, 3, 16, 16)
  rel = float(jnp.linalg.norm(low16 - low) / jnp.linalg.norm(low))
  assert rel < 0.05, rel
  rel = float(jnp.linalg.norm(iou16 - iou) / jnp.linalg.norm(iou))
  assert rel < 0.05, rel
  params16 = jax.eval_shape(Sam(**TINY, param_dtype=jnp.bfloat16).init, jax.random.key(0),
                            jnp.zeros((1, 64, 64, 3)))["params"]
  dtypes = {x.dtype for x in jax.tree.leaves(params16)}
  assert dtypes == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}  # the PE matrix: float32


def test_sharded_equals_unsharded(tiny, tiny_outputs):
  """FSDP-sharded parameters and a data-sharded batch over 8 devices give the unsharded
  result."""
  model, variables = tiny
  images, prompts, expected = tiny_outputs
  mesh = sharding.create_mesh((("data", -1),))
  shardings = sharding.tree_shardings(variables, mesh, ((".*", "fsdp"),), fsdp_min_size=256)
  assert any(s.spec != P() for s in jax.tree.leaves(shardings))
  batch = NamedSharding(mesh, P("data"))
  got = jax.jit(model.apply)(jax.device_put(variables, shardings),
                             jax.device_put(images, batch),
                             **jax.device_put(prompts, batch))
  assert got[0].sharding.spec[0] == "data"
  for a, b in zip(got, expected):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_frozen_params_mask(tiny):
  model, variables = tiny
  flat = jax.tree_util.tree_flatten_with_path(model.frozen_params_mask(variables["params"]))[0]
  frozen = {"/".join(k.key for k in path): f for path, f in flat}
  assert all(f for name, f in frozen.items() if name.startswith("image_encoder/"))
  assert frozen["prompt_encoder/pe_layer/positional_encoding_gaussian_matrix"]
  assert not frozen["prompt_encoder/no_mask_embed/embedding"]
  assert not any(f for name, f in frozen.items() if name.startswith("mask_decoder/"))
  thawed = Sam(**TINY, freeze_image_encoder=False).frozen_params_mask(variables["params"])
  assert not thawed["image_encoder"]["blocks_0"]["attn"]["qkv"]["kernel"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_official_key_sets(variant):
  """segment_anything's sam_model_registry[variant] (built on the meta device: shapes only)
  has exactly the keys and shapes segjax's Sam(variant) converts."""
  torch = pytest.importorskip("torch")
  from tests.torch_reference import import_torchvision
  import_torchvision()
  from segment_anything import sam_model_registry
  with torch.device("meta"):
    reference = sam_model_registry[variant]()
  shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  check_shapes(shapes, Sam(variant=variant))
  if variant == "vit_b":
    with pytest.raises(ValueError, match="is SAM vit_b; use that"):
      check_shapes(shapes, Sam(variant="vit_l"))


def test_torch_names():
  assert torch_name(("image_encoder", "blocks_11", "attn", "qkv", "kernel")) == \
      "image_encoder.blocks.11.attn.qkv.weight"
  assert torch_name(("mask_decoder", "output_hypernetworks_mlps_2", "layers_0", "bias")) == \
      "mask_decoder.output_hypernetworks_mlps.2.layers.0.bias"
  assert torch_name(("prompt_encoder", "pe_layer", "positional_encoding_gaussian_matrix")) == \
      "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"


def test_cli_refuses_a_checkpoint_of_another_size(tmp_path):
  """`python -m segjax.convert --arch sam_vit_b` on a state dict of other sizes exits with
  the one message listing the misshapen keys."""
  from segjax.convert import main
  model = Sam(**TINY)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  state = {torch_name(tuple(k.key for k in path)): np.zeros(leaf.shape, np.float32)
           for path, leaf in flat}
  np.savez(tmp_path / "tiny.npz", **state)
  with pytest.raises(SystemExit) as e:
    main(["--arch", "sam_vit_b", "--input", str(tmp_path / "tiny.npz"),
          "--output", str(tmp_path / "out.npz")])
  assert "misshapen keys" in str(e.value) and "image_encoder.pos_embed" in str(e.value)
