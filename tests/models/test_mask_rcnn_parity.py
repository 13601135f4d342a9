"""segjax's MaskRCNN end to end against torchvision's Mask R-CNN and Faster R-CNN.

torchvision's `maskrcnn_resnet50_fpn` / `fasterrcnn_resnet50_fpn` (weights=None, K + 1 classes)
get random weights everywhere: BatchNorm scales, biases and running statistics (with
weights=None torchvision builds BatchNorm2d, which in eval mode computes what the pretrained
models' FrozenBatchNorm2d does), conv and linear biases, and head weights scaled so that
objectness and class scores are spread out (distinct, some confident) and boxes move. The FPN's
lateral weights are divided by the standard deviation of their ResNet input on the test image,
which keeps the pyramid O(1) (an unnormalised random ResNet-50 grows its activations by ~100x).
`torch_mask_rcnn_to_flax` converts the state dict; segjax runs `MaskRCNN` with torchvision's
settings (RoIAlign sampling 2, aligned=False; no pre-NMS cut of the box candidates) on the image
torchvision's transform produces (H x W is kept by min_size=H, max_size=W and is a multiple of
32, so the resize and the padding are identities). RPN pre/post-NMS counts are 300/200 in both
models to keep the file fast.

torchvision runs inside `plain_torch_detection_ops()` (greedy NMS in plain torch and the
pure-Python RoIAlign with the C++ kernel's out-of-map rule), as its compiled ops do not load here.
Tie-breaking: torchvision's NMS kernel orders boxes with the unstable `torch.sort`, while segjax
and the greedy reference sort stably (equal scores: lower index first); with continuous random
weights no two candidate scores are equal (checked on the detections), so the orders agree.
Detections are matched one to one by label and box before comparing, so two detections whose
scores differ by less than the float32 discrepancy may swap places without failing the test.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from scipy.optimize import linear_sum_assignment

from segjax.convert import CONVERTERS, load_variables, main
from segjax.convert.mask_rcnn import mask_rcnn_options, torch_mask_rcnn_to_flax
from segjax.models.mask_rcnn import MaskRCNN
from segjax.ops import paste_masks
from tests.torch_reference import import_torchvision, plain_torch_detection_ops

K = 5  # foreground classes; torchvision's num_classes is K + 1
H, W = 256, 384
PRE, POST = 300, 200  # rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test
# Weight gains (x 1/sqrt(fan_in)) of the head layers; 1.4 elsewhere outside the ResNet body.
GAINS = {"rpn.head.cls_logits": 1.0, "rpn.head.bbox_pred": 0.1,
         "roi_heads.box_predictor.cls_score": 0.5, "roi_heads.box_predictor.bbox_pred": 0.5}


def _torchvision_detector(builder, seed, **kwargs):
  """A randomised torchvision detector in eval mode and the test image (3, H, W) in [0, 1]."""
  tv = import_torchvision()
  import torch
  torch.manual_seed(seed)
  model = getattr(tv.models.detection, builder)(
      weights=None, weights_backbone=None, num_classes=K + 1, min_size=H, max_size=W,
      rpn_pre_nms_top_n_test=PRE, rpn_post_nms_top_n_test=POST, **kwargs).eval()
  g = torch.Generator().manual_seed(seed + 1)
  for name, m in model.named_modules():
    if isinstance(m, (torch.nn.BatchNorm2d, tv.ops.FrozenBatchNorm2d)):
      n = m.weight.shape[0]
      m.weight.data = torch.rand(n, generator=g) + 0.5
      m.bias.data = 0.2 * torch.randn(n, generator=g)
      m.running_mean.data = 0.2 * torch.randn(n, generator=g)
      m.running_var.data = torch.rand(n, generator=g) + 0.5
    elif (isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.ConvTranspose2d))
          and not name.startswith("backbone.body.")):
      transposed = isinstance(m, torch.nn.ConvTranspose2d)  # weight (in, out, kh, kw)
      fan_in = m.weight[:, 0].numel() if transposed else m.weight[0].numel()
      m.weight.data = GAINS.get(name, 1.4) * torch.randn(m.weight.shape, generator=g) / fan_in**0.5
      m.bias.data = 0.1 * torch.randn(m.bias.shape, generator=g)
  image = torch.rand(3, H, W, generator=g)
  with torch.no_grad():
    body = model.backbone.body(model.transform([image])[0].tensors)
    for block, c in zip(model.backbone.fpn.inner_blocks, body.values()):
      block[0].weight.data /= c.std()
  return model, image


def _run_torchvision(model, image):
  """(normalized NHWC batch as torchvision's transform makes it, detections as numpy)."""
  import torch
  with plain_torch_detection_ops(), torch.no_grad():
    images, _ = model.transform([image])
    out = model([image])[0]
  assert images.image_sizes == [(H, W)] and images.tensors.shape == (1, 3, H, W)
  mean, std = (torch.tensor(v)[:, None, None] for v in (model.transform.image_mean,
                                                         model.transform.image_std))
  np.testing.assert_allclose(images.tensors[0].numpy(), ((image - mean) / std).numpy(),
                             rtol=1e-6, atol=1e-6)  # an identity resize: only normalization
  return images.tensors.numpy().transpose(0, 2, 3, 1), {k: v.numpy() for k, v in out.items()}


def _run_segjax(variables, normalized, **options):
  model = MaskRCNN(**mask_rcnn_options(variables), rpn_pre_nms_top_n_test=PRE,
                   rpn_post_nms_top_n_test=POST, box_pre_nms_top_k=None, **options)
  out = jax.jit(model.apply)(variables, jnp.asarray(normalized))
  return {k: np.asarray(v[0]) for k, v in out.items()}


def _matched(got, want):
  """Checks counts, padding and distinct scores; returns segjax rows matching torchvision's."""
  n = len(want["scores"])
  np.testing.assert_array_equal(got["valid"], np.arange(len(got["valid"])) < n)
  assert not np.any(got["boxes"][n:]) and not np.any(got["scores"][n:])
  assert len(np.unique(want["scores"])) == n  # no score ties (see the module docstring)
  cost = (np.abs(got["boxes"][:n, None] - want["boxes"][None]).max(-1)
          + 1e6 * (got["classes"][:n, None] + 1 != want["labels"][None]))
  rows, cols = linear_sum_assignment(cost)
  order = rows[np.argsort(cols)]
  # Coordinates come from differences of numbers of the image's size: float32 errors are
  # absolute, ~1e-6 x 384 px here.
  np.testing.assert_allclose(got["boxes"][order], want["boxes"], rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(got["scores"][order], want["scores"], rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(got["classes"][order] + 1, want["labels"])
  return order


def _state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def mask_rcnn():
  """The randomised torchvision Mask R-CNN, its test image and numpy state dict."""
  model, image = _torchvision_detector("maskrcnn_resnet50_fpn", seed=0)
  return model, image, _state_dict(model)


def test_mask_rcnn_matches_torchvision(mask_rcnn):
  model, image, state = mask_rcnn
  normalized, want = _run_torchvision(model, image)
  got = _run_segjax(torch_mask_rcnn_to_flax(state), normalized)
  assert len(want["scores"]) == 100  # detections_per_img, all slots used
  order = _matched(got, want)
  masks = got["masks"][order]
  assert masks.shape == (100, 28, 28)
  assert np.mean((masks > 0.05) & (masks < 0.95)) > 0.5  # not saturated: a real comparison
  pasted = np.asarray(paste_masks(masks, got["boxes"][order], (H, W)))
  assert want["masks"].shape == (100, 1, H, W)
  np.testing.assert_allclose(pasted, want["masks"][:, 0], rtol=1e-4, atol=1e-4)
  assert np.mean(want["masks"] > 0.5) > 0.01


def test_faster_rcnn_matches_torchvision():
  """Faster R-CNN with box_score_thresh 0.75, so fewer than 100 detections and padding rows."""
  model, image = _torchvision_detector("fasterrcnn_resnet50_fpn", seed=3, box_score_thresh=0.75)
  normalized, want = _run_torchvision(model, image)
  variables = torch_mask_rcnn_to_flax(_state_dict(model))
  assert set(variables["params"]) == {"backbone", "rpn_head", "box_head"}
  assert mask_rcnn_options(variables) == dict(
      num_classes=K, mask=False, backbone="resnet50", fpn_channels=256, representation_size=1024)
  got = _run_segjax(variables, normalized, box_score_thresh=0.75)
  assert "masks" not in got
  assert 10 < len(want["scores"]) < 100
  _matched(got, want)


def test_command_line_conversion_gives_the_model_tree(mask_rcnn, tmp_path):
  """`python -m segjax.convert --arch maskrcnn_resnet50_fpn` writes the variables of
  MaskRCNN(num_classes=K) exactly; Faster R-CNN's entry is the same converter."""
  import torch
  model, _, state = mask_rcnn
  torch.save(model.state_dict(), tmp_path / "model.pth")
  main(["--arch", "maskrcnn_resnet50_fpn", "--input", str(tmp_path / "model.pth"),
        "--output", str(tmp_path / "model.npz")])
  written = traverse_util.flatten_dict(load_variables(str(tmp_path / "model.npz")))
  shapes = jax.eval_shape(lambda: MaskRCNN(num_classes=K).init(jax.random.key(0),
                                                               jnp.zeros((1, 64, 64, 3))))
  expected = traverse_util.flatten_dict(shapes)
  assert sorted(written) == sorted(expected)
  assert all(written[k].shape == v.shape and written[k].dtype == v.dtype
             for k, v in expected.items())
  direct = traverse_util.flatten_dict(torch_mask_rcnn_to_flax(state))
  assert all(np.array_equal(written[k], direct[k]) for k in expected)
  assert mask_rcnn_options({"params": load_variables(str(tmp_path / "model.npz"))["params"]}) \
      == dict(num_classes=K, mask=True, backbone="resnet50", fpn_channels=256,
              representation_size=1024, mask_channels=256, mask_num_convs=4)
  assert CONVERTERS.get("fasterrcnn_resnet50_fpn") is torch_mask_rcnn_to_flax
  assert CONVERTERS.get("maskrcnn_resnet50_fpn") is torch_mask_rcnn_to_flax
  # fc6 reads (C, 7, 7)-flattened features in torch and (7, 7, C) in segjax.
  fc6 = state["roi_heads.box_head.fc6.weight"].T.reshape(256, 7, 7, -1).transpose(1, 2, 0, 3)
  np.testing.assert_array_equal(direct[("params", "box_head", "fc6", "kernel")],
                                fc6.reshape(7 * 7 * 256, -1))


def test_converter_errors(mask_rcnn):
  _, _, state = mask_rcnn
  with pytest.raises(ValueError, match=r"Unknown keys \['module.x'\]"):
    torch_mask_rcnn_to_flax({**state, "module.x": np.zeros(1)})
  with pytest.raises(ValueError, match="cls_logits needs a weight and a bias"):
    torch_mask_rcnn_to_flax({k: v for k, v in state.items() if k != "rpn.head.cls_logits.bias"})
  deeper_rpn = {**state, "rpn.head.conv.1.0.weight": state["rpn.head.conv.0.0.weight"],
                "rpn.head.conv.1.0.bias": state["rpn.head.conv.0.0.bias"]}
  with pytest.raises(ValueError, match="rpn_head/conv_1/bias not in the model"):
    torch_mask_rcnn_to_flax(deeper_rpn)
  with pytest.raises(ValueError, match="lacks"):
    mask_rcnn_options({"params": {"backbone": {}}})
