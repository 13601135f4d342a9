"""RoI box/mask heads, their weight conversion and detection postprocessing against
torchvision's TwoMLPHead + FastRCNNPredictor, MaskRCNNHeads + MaskRCNNPredictor and
RoIHeads.postprocess_detections (with a plain greedy NMS in place of the compiled
torchvision::nms, which does not load here)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.convert.roi_heads import roi_heads_config, torch_roi_heads_to_flax
from segjax.models.roi_heads import BoxHead, MaskHead, postprocess_detections
from tests.models.test_rpn import _greedy_batched_nms
from tests.torch_reference import import_torchvision

C, P, REP, K = 8, 7, 32, 3
IMAGE = (48, 64)


def _torch_box_modules(torch):
  import_torchvision()
  from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
  torch.manual_seed(0)
  head, predictor = TwoMLPHead(C * P * P, REP).eval(), FastRCNNPredictor(REP, K + 1).eval()
  return head, predictor


def _torch_mask_modules(torch, width, num_convs, dilation):
  import_torchvision()
  from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
  torch.manual_seed(1)
  head = MaskRCNNHeads(C, [width] * num_convs, dilation).eval()
  predictor = MaskRCNNPredictor(width, width, K + 1).eval()
  for name, p in [*head.named_parameters(), *predictor.named_parameters()]:
    if name.endswith("bias"):  # torchvision zeroes some biases: make every term count
      p.data = 0.1 * torch.randn(p.shape)
  return head, predictor


def _state(prefix, **modules):
  return {f"{prefix}{name}.{k}": v.numpy() for name, m in modules.items()
          for k, v in m.state_dict().items()}


def _box_state(torch, prefix):
  head, predictor = _torch_box_modules(torch)
  return _state(prefix, box_head=head, box_predictor=predictor)


def test_box_head_matches_torchvision():
  import_torchvision()
  torch = pytest.importorskip("torch")
  head, predictor = _torch_box_modules(torch)
  state = {**_state("roi_heads.", box_head=head, box_predictor=predictor),
           "rpn.head.conv.0.0.weight": np.zeros(1)}  # other detector keys are ignored
  converted = torch_roi_heads_to_flax(state, channels=C)
  assert set(converted) == {"box_head"}
  assert roi_heads_config(converted) == dict(num_classes=K, representation_size=REP)
  x = torch.randn(2, 5, C, P, P)
  with torch.no_grad():
    want_logits, want_deltas = predictor(head(x.flatten(0, 1)))
  logits, deltas = jax.jit(BoxHead(num_classes=K, representation_size=REP).apply)(
      converted["box_head"], jnp.asarray(x.numpy().transpose(0, 1, 3, 4, 2)))
  assert logits.shape == (2, 5, K + 1) and deltas.shape == (2, 5, K + 1, 4)
  np.testing.assert_allclose(logits.reshape(10, -1), want_logits.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(deltas.reshape(10, -1), want_deltas.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_convs,dilation,legacy", [(4, 1, False), (2, 2, True)])
def test_mask_head_matches_torchvision(num_convs, dilation, legacy):
  import_torchvision()
  torch = pytest.importorskip("torch")
  width = 12
  box_head, box_predictor = _torch_box_modules(torch)
  head, predictor = _torch_mask_modules(torch, width, num_convs, dilation)
  state = _state("roi_heads.", box_head=box_head, box_predictor=box_predictor, mask_head=head,
                 mask_predictor=predictor)
  if legacy:  # pre-v2 torchvision names: mask_head.mask_fcn{i + 1}
    state = {re.sub(r"mask_head\.(\d+)\.0\.", lambda m: f"mask_head.mask_fcn{int(m[1]) + 1}.",
                    k): v for k, v in state.items()}
    assert "roi_heads.mask_head.mask_fcn2.weight" in state
  converted = torch_roi_heads_to_flax(state, channels=C)
  assert roi_heads_config(converted) == dict(num_classes=K, representation_size=REP,
                                             mask_channels=width, mask_num_convs=num_convs)
  x = torch.randn(2, 3, C, 14, 14)
  with torch.no_grad():
    want = predictor(head(x.flatten(0, 1))).numpy().transpose(0, 2, 3, 1)
  got = jax.jit(MaskHead(num_classes=K, channels=width, num_convs=num_convs,
                         dilation=dilation).apply)(
      converted["mask_head"], jnp.asarray(x.numpy().transpose(0, 1, 3, 4, 2)))
  assert got.shape == (2, 3, 28, 28, K + 1)
  np.testing.assert_allclose(got.reshape(6, 28, 28, K + 1), want, rtol=1e-5, atol=1e-5)


def test_deconv_conversion_is_flipped():
  """The 2x2 stride-2 deconv puts input pixel (i, j) times torch weight [:, :, a, b] at output
  (2i + a, 2j + b): checked on a one-pixel input, independently of torch's implementation."""
  torch = pytest.importorskip("torch")
  weight = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)  # (in, out, ..)
  state = {**_box_state(torch, ""), "mask_predictor.conv5_mask.weight": weight.numpy(),
           "mask_predictor.conv5_mask.bias": np.zeros(3),
           "mask_predictor.mask_fcn_logits.weight": np.eye(K + 1, 3)[:, :, None, None],
           "mask_predictor.mask_fcn_logits.bias": np.zeros(K + 1)}
  converted = torch_roi_heads_to_flax(state, prefix="", channels=C)
  x = np.zeros((1, 1, 1, 2), np.float32)
  x[0, 0, 0] = (1.0, 2.0)
  out = MaskHead(num_classes=K, channels=3, num_convs=0).apply(converted["mask_head"], x)
  want = np.einsum("c,coab->abo", x[0, 0, 0], weight.numpy())
  np.testing.assert_allclose(out[0, ..., :3], want, rtol=1e-6)


def test_init_and_converter_errors():
  box = BoxHead(num_classes=9, representation_size=256)
  params = box.init(jax.random.key(0), jnp.zeros((1, P, P, C)))["params"]
  assert params["fc6"]["kernel"].shape == (P * P * C, 256)
  assert params["bbox_pred"]["kernel"].shape == (256, 40)
  bound = 1 / np.sqrt(P * P * C)
  for name, std in (("cls_score", 0.01), ("bbox_pred", 0.001)):
    assert abs(np.std(params[name]["kernel"]) / std - 1) < 0.1 and not np.any(params[name]["bias"])
  fc6 = np.asarray(params["fc6"]["kernel"])
  assert np.abs(fc6).max() <= bound and abs(fc6.std() / (bound / np.sqrt(3)) - 1) < 0.05
  assert 0 < np.abs(params["fc6"]["bias"]).max() <= bound
  mask = MaskHead(num_classes=4, channels=64).init(jax.random.key(0), jnp.zeros((1, 14, 14, C)))
  mask = mask["params"]
  assert sorted(mask) == ["conv5_mask", "mask_fcn_0", "mask_fcn_1", "mask_fcn_2", "mask_fcn_3",
                          "mask_fcn_logits"]
  assert abs(np.std(mask["mask_fcn_1"]["kernel"]) / np.sqrt(2 / (9 * 64)) - 1) < 0.05
  assert abs(np.std(mask["conv5_mask"]["kernel"]) / np.sqrt(2 / (4 * 64)) - 1) < 0.05
  assert not any(np.any(m["bias"]) for m in mask.values())

  torch = pytest.importorskip("torch")
  state = _box_state(torch, "roi_heads.")
  with pytest.raises(ValueError, match="incomplete"):
    torch_roi_heads_to_flax({k: v for k, v in state.items() if "bbox_pred" not in k}, channels=C)
  with pytest.raises(ValueError, match="needs a weight and a bias"):
    torch_roi_heads_to_flax({k: v for k, v in state.items() if k != "roi_heads.box_head.fc7.bias"},
                            channels=C)
  with pytest.raises(ValueError, match="Unknown RoI heads key roi_heads.box_head.fc8.weight"):
    torch_roi_heads_to_flax({**state, "roi_heads.box_head.fc8.weight": np.zeros(1)}, channels=C)
  with pytest.raises(ValueError, match="pass the channel count"):
    torch_roi_heads_to_flax(state)  # 392 inputs are not 256 x P x P
  with pytest.raises(ValueError, match="No key starts with"):
    torch_roi_heads_to_flax(state, prefix="model.roi_heads.")
  conv = {"roi_heads.mask_head.0.0.weight": np.zeros((4, C, 3, 3)),
          "roi_heads.mask_head.0.0.bias": np.zeros(4)}
  with pytest.raises(ValueError, match="incomplete"):  # mask head without its predictor
    torch_roi_heads_to_flax({**state, **conv}, channels=C)
  with pytest.raises(ValueError, match="same parameter"):
    torch_roi_heads_to_flax({**state, **conv, "roi_heads.mask_head.mask_fcn1.bias": np.zeros(4)},
                            channels=C)
  predictor = {"roi_heads.mask_predictor.conv5_mask.weight": np.zeros((4, 4, 2, 2)),
               "roi_heads.mask_predictor.conv5_mask.bias": np.zeros(4),
               "roi_heads.mask_predictor.mask_fcn_logits.weight": np.zeros((K + 2, 4, 1, 1)),
               "roi_heads.mask_predictor.mask_fcn_logits.bias": np.zeros(K + 2)}
  with pytest.raises(ValueError, match="both must be K \\+ 1"):
    torch_roi_heads_to_flax({**state, **conv, **predictor}, channels=C)


def _random_detections(rng, r, k, spread=2.0):
  logits = (spread * rng.normal(size=(r, k + 1))).astype(np.float32)
  deltas = (0.5 * rng.normal(size=(r, k + 1, 4))).astype(np.float32)
  xy = rng.uniform(-8, [IMAGE[1], IMAGE[0]], size=(r, 2))
  wh = rng.uniform(4, 30, size=(r, 2))
  proposals = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
  return logits, deltas, proposals


def _torchvision_postprocess(monkeypatch, logits, deltas, proposals, sizes, score_thresh,
                             nms_thresh, detections):
  """torchvision's result per image: (boxes, scores, labels) numpy arrays."""
  import_torchvision()
  torch = pytest.importorskip("torch")
  from torchvision.models.detection import roi_heads as tv_roi_heads
  monkeypatch.setattr(tv_roi_heads.box_ops, "batched_nms", _greedy_batched_nms(torch))
  ref = tv_roi_heads.RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, score_thresh,
                              nms_thresh, detections)
  counts = [len(p) for p in proposals]
  out = ref.postprocess_detections(
      torch.from_numpy(np.concatenate(logits)),
      torch.from_numpy(np.concatenate(deltas).reshape(sum(counts), -1)),
      [torch.from_numpy(p) for p in proposals], list(sizes))
  return [tuple(t.numpy() for t in image) for image in zip(*out)]


def _check_same(got, want):
  boxes, scores, classes, valid = (np.asarray(g) for g in got)
  want_boxes, want_scores, want_labels = want
  n = len(want_scores)
  np.testing.assert_array_equal(valid, np.arange(len(valid)) < n)
  np.testing.assert_allclose(boxes[:n], want_boxes, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(scores[:n], want_scores, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(classes[:n], want_labels - 1)
  assert not np.any(boxes[n:]) and not np.any(scores[n:]) and not np.any(classes[n:])
  return n


@pytest.mark.parametrize("top_k,detections", [(None, 300), (None, 25), (60, 25), (20, 25)])
def test_postprocess_matches_torchvision(monkeypatch, top_k, detections):
  rng = np.random.default_rng(0)
  r = 80
  logits, deltas, proposals = _random_detections(rng, r, K)
  (want,) = _torchvision_postprocess(monkeypatch, [logits], [deltas], [proposals], [IMAGE],
                                     0.05, 0.5, detections)
  got = jax.jit(lambda *a: postprocess_detections(
      *a, IMAGE, score_thresh=0.05, nms_thresh=0.5, detections_per_img=detections,
      pre_nms_top_k=top_k))(logits, deltas, proposals, np.ones(r, bool))
  passing = np.sum(jax.nn.softmax(logits, -1)[:, 1:] > 0.05)
  assert top_k is None or passing > top_k  # the top-k cut is exercised
  if top_k == 20:  # too few candidates survive NMS in the top k: a prefix of torchvision's
    n = int(np.sum(got[3]))
    assert 0 < n < detections <= len(want[1])
    want = tuple(w[:n] for w in want)
  n = _check_same(got, want)
  if detections == 300:
    assert 10 < n < 300  # padding rows
  elif top_k != 20:
    assert n == detections

def test_postprocess_invalid_proposals_and_vmap_jit(monkeypatch):
  rng = np.random.default_rng(1)
  r, sizes = 50, np.array([IMAGE, (30, 41)], np.float32)
  images = [_random_detections(rng, r, K) for _ in range(2)]
  valid = rng.uniform(size=(2, r)) < 0.6
  # torchvision on the valid proposals only (its proposals are variable-length)
  want = _torchvision_postprocess(
      monkeypatch, [im[0][v] for im, v in zip(images, valid)],
      [im[1][v] for im, v in zip(images, valid)], [im[2][v] for im, v in zip(images, valid)],
      [tuple(int(s) for s in size) for size in sizes], 0.05, 0.5, 40)
  stacked = [np.stack(x) for x in zip(*images)]
  got = jax.jit(jax.vmap(lambda lg, d, p, v, s: postprocess_detections(
      lg, d, p, v, s, detections_per_img=40, pre_nms_top_k=None)))(*stacked, valid, sizes)
  for b in range(2):
    n = _check_same([g[b] for g in got], want[b])
    assert n > 5
  boxes, _, _, kept = got
  assert np.any(boxes[1][kept[1]][:, 2] == 41)  # clipped to its own width, not image 0's


def test_postprocess_nothing_passes(monkeypatch):
  rng = np.random.default_rng(2)
  logits, deltas, proposals = _random_detections(rng, 30, K, spread=0.1)
  (want,) = _torchvision_postprocess(monkeypatch, [logits], [deltas], [proposals], [IMAGE],
                                     0.5, 0.5, 10)
  assert len(want[1]) == 0
  run = jax.jit(lambda v, t: postprocess_detections(logits, deltas, proposals, v, IMAGE,
                                                    score_thresh=t, detections_per_img=10))
  for got in (run(np.ones(30, bool), 0.5), run(np.zeros(30, bool), 0.0)):
    _check_same(got, want)
    assert got[0].shape == (10, 4) and got[2].dtype == jnp.int32


def test_postprocess_rejects_bad_inputs():
  logits, deltas, proposals = _random_detections(np.random.default_rng(0), 6, K)
  valid = np.ones(6, bool)
  with pytest.raises(ValueError, match="jax.vmap"):
    postprocess_detections(logits[None], deltas, proposals, valid, IMAGE)
  with pytest.raises(ValueError, match="box_deltas must be"):
    postprocess_detections(logits, deltas[:, 1:], proposals, valid, IMAGE)
  with pytest.raises(ValueError, match="pre_nms_top_k"):
    postprocess_detections(logits, deltas, proposals, valid, IMAGE, pre_nms_top_k=0)
  with pytest.raises(ValueError, match="detections_per_img"):
    postprocess_detections(logits, deltas, proposals, valid, IMAGE, detections_per_img=2.0)
