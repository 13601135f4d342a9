"""benchmarks/torch_models.py against segjax: the PyTorch twins have the same tensors,
the same intermediate shapes, the same outputs from the same weights, the same loss.

Full-size models are compared structurally (segjax through `jax.eval_shape`, PyTorch
on the meta device, both cheap); outputs are compared on scaled-down variants (same
code paths, segjax's options) with random weights and random BatchNorm statistics.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.losses import build_loss
from segjax.models import build_model
from segjax.tasks.semantic import DEFAULT_LOSS

torch = pytest.importorskip("torch")
from benchmarks import torch_models  # noqa: E402  (needs torch)

NUM_CLASSES = 21
KEYS = {"params": jax.random.key(0), "dropout": jax.random.key(1)}


def _segjax_variables(model, size=(64, 64)):
  """Shapes of a model's variables, initialised in training mode (with any aux head)."""
  images = jax.ShapeDtypeStruct((2,) + size + (3,), jnp.float32)
  return jax.eval_shape(functools.partial(model.init, train=True), KEYS, images)


def _path(path):
  return tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)


def _expected_torch_shapes(variables):
  """segjax variables -> {torch state-dict key: shape}, by the twins' naming rule."""
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
          "var": "running_var"}
  shapes = {}
  for path, x in jax.tree_util.tree_flatten_with_path(variables)[0]:
    path = _path(path)
    shape = tuple(x.shape)
    if path[-1] == "kernel":  # HWIO -> OIHW; transposed convs (upscore*) -> (I, O, H, W)
      shape = shape[2:] + shape[:2] if path[-2].startswith("upscore") else (
          shape[3], shape[2]) + shape[:2]
    shapes[".".join(path[1:-1] + (leaf[path[-1]],))] = shape
  return shapes


@pytest.mark.parametrize("name", torch_models.NAMES)
def test_full_size_twin_has_segjax_tensors(name):
  variables = _segjax_variables(build_model(name, NUM_CLASSES, {}))
  with torch.device("meta"):
    twin = torch_models.build(name, NUM_CLASSES)
  torch_shapes = {k: tuple(v.shape) for k, v in twin.state_dict().items()
                  if not k.endswith("num_batches_tracked")}
  assert torch_shapes == _expected_torch_shapes(variables)
  segjax_count = sum(x.size for x in jax.tree.leaves(variables["params"]))
  assert sum(p.numel() for p in twin.parameters()) == segjax_count
  assert segjax_count == {"fcn8s": 134_489_759, "pspnet": 48_977_034,
                          "deeplabv3plus": 39_211_461}[name]


@pytest.mark.parametrize("size", [(64, 64), (97, 129)])
@pytest.mark.parametrize("name", torch_models.NAMES)
def test_every_layer_output_has_segjax_shape(name, size):
  """Training-mode forward of the full-size models: each conv / BatchNorm / block of
  the twin outputs the shape of segjax's module of the same name (NHWC vs NCHW)."""
  model = build_model(name, NUM_CLASSES, {})
  variables = _segjax_variables(model)
  images = jax.ShapeDtypeStruct((2,) + size + (3,), jnp.float32)
  outputs, state = jax.eval_shape(
      functools.partial(model.apply, train=True, capture_intermediates=True,
                        mutable=["batch_stats", "intermediates"]),
      variables, images, rngs={"dropout": KEYS["dropout"]})
  segjax_shapes = {}
  for path, x in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
    path = _path(path)
    if len(path) > 2 and path[-2:] == ("__call__", 0):  # a module's (array) output
      n, h, w, c = x.shape
      segjax_shapes[".".join(path[:-2])] = (n, c, h, w)

  with torch.device("meta"):
    twin = torch_models.build(name, NUM_CLASSES).train()
  torch_shapes = {}

  def record(key):
    def hook(module, inputs, output):
      if isinstance(output, torch.Tensor):
        torch_shapes[key] = tuple(output.shape)
    return hook
  for module_name, module in twin.named_modules():
    module.register_forward_hook(record(module_name))
  with torch.device("meta"):
    torch_outputs = twin(torch.zeros((2, 3) + size))

  with_weights = {k for k, m in twin.named_modules()
                  if any(True for _ in m.parameters(recurse=False))}
  common = set(segjax_shapes) & set(torch_shapes)
  assert with_weights <= common
  assert {k: torch_shapes[k] for k in common} == {k: segjax_shapes[k] for k in common}
  if not isinstance(outputs, dict):
    outputs = {"logits": outputs}
  keys = {"logits": "out", "aux_logits": "aux"}
  assert {keys[k]: v.shape for k, v in outputs.items()} == {
      k: (2,) + size + (NUM_CLASSES,) for k in torch_outputs}
  assert all(v.shape == (2, NUM_CLASSES) + size for v in torch_outputs.values())


def test_full_size_twins_run_in_training_mode():
  """A real training-mode forward and the loss at 64x64, batch 2 (BatchNorm of the 1x1
  ASPP pooling needs a batch > 1 in PyTorch)."""
  rng = torch.Generator().manual_seed(0)
  images = torch.randn(2, 3, 64, 64, generator=rng)
  labels = torch.randint(0, NUM_CLASSES, (2, 64, 64), generator=rng)
  for name, keys in (("pspnet", {"out", "aux"}), ("deeplabv3plus", {"out"}), ("fcn8s", {"out"})):
    twin = torch_models.build(name, NUM_CLASSES).train()
    with torch.no_grad():
      outputs = twin(images)
    assert set(outputs) == keys
    assert all(v.shape == (2, NUM_CLASSES, 64, 64) for v in outputs.values())
    assert torch.isfinite(torch_models.loss(outputs, labels))


def _random_variables(variables, seed=0):
  """Random values for every variable: kernels N(0, 1 / fan-in) (a transposed conv's
  kernel of twice its stride reads 4 taps per input channel), BatchNorm scales and
  running variances in [0.5, 1.5], biases and running means N(0, 0.1^2)."""
  rng = np.random.default_rng(seed)

  def value(path, x):
    kind = path[-1].key
    if kind == "kernel":
      fan_in = 4 * x.shape[2] if path[-2].key.startswith("upscore") else np.prod(x.shape[:-1])
      return rng.normal(0, 1 / np.sqrt(fan_in), x.shape).astype(np.float32)
    if kind in ("scale", "var"):
      return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
    return rng.normal(0, 0.1, x.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(value, variables)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), 3, 1)))


SMALL = {
    "pspnet": dict(backbone_width=16, head_channels=32, aux_channels=16),
    "deeplabv3plus": dict(backbone_width=16, channels=32, low_level_channels=8,
                          aux_channels=16),
    "deeplabv3plus_v1c_os8": dict(backbone="resnet50_v1c", output_stride=8, backbone_width=16,
                                  channels=16, low_level_channels=8),
    "fcn8s": dict(width=8, fc_width=32),
    "fcn8s_same": dict(width=8, fc_width=32, pad_first=0),
}


@pytest.mark.parametrize("case, size", [("pspnet", (64, 64)),
                                        ("deeplabv3plus", (64, 64)),
                                        ("deeplabv3plus_v1c_os8", (97, 129)),
                                        ("fcn8s", (64, 64)), ("fcn8s_same", (97, 129))])
def test_eval_outputs_match_segjax(case, size):
  name, options = case.split("_")[0], SMALL[case]
  model = build_model(name, 5, options)
  variables = _random_variables(_segjax_variables(model, size))
  images = np.random.default_rng(1).normal(size=(2,) + size + (3,)).astype(np.float32)
  expected = jax.jit(functools.partial(model.apply, train=False))(variables, images)

  twin = torch_models.build(name, 5, **options).eval()
  torch_models.load_segjax_variables(twin, name, variables)
  with torch.no_grad():
    got = twin(_nchw(images))
  assert set(got) == {"out"}
  expected = _nchw(expected)
  assert float(expected.abs().max()) > 0.5  # the outputs are not trivially small
  torch.testing.assert_close(got["out"], expected, rtol=1e-4, atol=1e-4)


def test_training_outputs_and_statistics_match_segjax():
  """PSPNet in training mode with dropout 0 at an odd size: batch-statistics BatchNorm,
  the aux head, and the running means after one step (PyTorch momentum 0.1 = flax's
  0.9). The tolerance is wider than in eval mode: batch statistics are computed in
  float32 in different orders (flax: E[x^2] - E[x]^2), and 20-odd normalisations
  amplify the rounding to ~1e-4 of outputs of size ~2."""
  options = dict(SMALL["pspnet"], dropout=0.0)
  model = build_model("pspnet", 5, options)
  variables = _random_variables(_segjax_variables(model))
  images = np.random.default_rng(2).normal(size=(2, 97, 129, 3)).astype(np.float32)
  outputs, updates = jax.jit(functools.partial(model.apply, train=True,
                                               mutable=["batch_stats"]))(
      variables, images, rngs={"dropout": KEYS["dropout"]})

  twin = torch_models.build("pspnet", 5, **options).train()
  torch_models.load_segjax_variables(twin, "pspnet", variables)
  with torch.no_grad():
    got = twin(_nchw(images))
  for key, expected in (("out", outputs["logits"]), ("aux", outputs["aux_logits"])):
    expected = _nchw(expected)
    assert float(expected.abs().max()) > 0.5
    torch.testing.assert_close(got[key], expected, rtol=1e-4, atol=5e-4)
  means = {".".join(_path(p)[:-1]): np.asarray(x) for p, x in
           jax.tree_util.tree_flatten_with_path(updates["batch_stats"])[0]
           if _path(p)[-1] == "mean"}
  assert len(means) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in twin.modules())
  for key, mean in means.items():
    np.testing.assert_allclose(twin.get_submodule(key).running_mean.numpy(), mean,
                               rtol=1e-4, atol=1e-5, err_msg=key)


def test_loss_is_segjax_train_step_loss():
  rng = np.random.default_rng(3)
  logits, aux = (rng.normal(size=(2, 5, 6, 7)).astype(np.float32) for _ in range(2))
  labels = rng.integers(0, 5, (2, 6, 7))
  labels[rng.random(labels.shape) < 0.3] = 255
  segjax_loss = build_loss(DEFAULT_LOSS)
  nhwc = lambda x: jnp.asarray(np.moveaxis(x, 1, 3))
  expected = (segjax_loss(nhwc(logits), jnp.asarray(labels), 255)[0]
              + 0.25 * segjax_loss(nhwc(aux), jnp.asarray(labels), 255)[0])
  outputs = {"out": torch.from_numpy(logits), "aux": torch.from_numpy(aux)}
  got = torch_models.loss(outputs, torch.from_numpy(labels), aux_weight=0.25)
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)
  # A numpy formula for the main term alone: mean -log softmax over labelled pixels.
  shifted = logits - logits.max(1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
  valid = labels != 255
  nll = -np.take_along_axis(log_probs, np.where(valid, labels, 0)[:, None], 1)[:, 0]
  main = torch_models.loss({"out": outputs["out"]}, torch.from_numpy(labels))
  np.testing.assert_allclose(float(main), nll[valid].mean(), rtol=1e-5)
  ignored = torch.full((2, 6, 7), 255)
  assert float(torch_models.loss(outputs, ignored)) == 0.0


def test_bad_requests_raise_clear_errors():
  with pytest.raises(ValueError, match="No PyTorch twin of model 'unet'"):
    torch_models.build("unet", 3)
  with pytest.raises(ValueError, match=r"has no option\(s\) \['width'\]"):
    torch_models.build("pspnet", 3, width=8)
  with pytest.raises(ValueError, match="Unsupported backbone 'resnet18'"):
    torch_models.build("pspnet", 3, backbone="resnet18")
  with pytest.raises(ValueError, match="do not match logits"):
    torch_models.loss({"out": torch.zeros(1, 3, 4, 4)}, torch.zeros(1, 4, 5))
  options = SMALL["fcn8s"]
  variables = _random_variables(_segjax_variables(build_model("fcn8s", 3, options)))
  with pytest.raises(ValueError, match="expected a 'pspnet' twin"):
    torch_models.load_segjax_variables(torch_models.build("fcn8s", 3, **options), "pspnet",
                                       variables)
  with pytest.raises(ValueError, match="has shape"):
    torch_models.load_segjax_variables(torch_models.build("fcn8s", 3, width=16, fc_width=32),
                                       "fcn8s", variables)
  pspnet = build_model("pspnet", 3, SMALL["pspnet"])
  eval_only = jax.eval_shape(functools.partial(pspnet.init, train=False), KEYS,
                             jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
  with pytest.raises(ValueError, match="No segjax variable for PyTorch's"):
    torch_models.load_segjax_variables(torch_models.build("pspnet", 3, **SMALL["pspnet"]),
                                       "pspnet", _random_variables(eval_only))
