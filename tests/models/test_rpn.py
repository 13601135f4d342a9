"""RPN head and proposal filtering against torchvision's RPNHead and
RegionProposalNetwork.filter_proposals (with a plain greedy NMS in place of the
compiled torchvision::nms, which does not load here)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.convert.rpn import torch_rpn_head_to_flax
from segjax.models.rpn import RPNHead, propose
from segjax.ops import generate_anchors
from tests.torch_reference import import_torchvision

IMAGE = (50, 70)
STRIDES = (8, 16)
SIZES = (32, 64)


def _greedy_batched_nms(torch):
  """Class-aware greedy NMS in plain torch: visit by descending score, drop boxes of the
  same class with IoU > threshold with a kept one; kept indices by descending score."""

  def batched_nms(boxes, scores, idxs, iou_threshold):
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    iou = inter / (area[:, None] + area[None, :] - inter)
    keep = []
    for i in torch.argsort(scores, descending=True, stable=True).tolist():
      if all(idxs[j] != idxs[i] or iou[i, j] <= iou_threshold for j in keep):
        keep.append(i)
    return torch.tensor(keep, dtype=torch.int64)

  return batched_nms


def test_head_matches_torchvision():
  import_torchvision()
  torch = pytest.importorskip("torch")
  from torchvision.models.detection.rpn import RPNHead as TorchRPNHead, permute_and_flatten
  torch.manual_seed(0)
  head = TorchRPNHead(8, 3).eval()
  for p in head.parameters():  # init biases are 0 and weights tiny: make every term count
    p.data = 0.3 * torch.randn(p.shape)
  state = {f"rpn.head.{k}": v.numpy() for k, v in head.state_dict().items()}
  state["backbone.fpn.x.weight"] = np.zeros(1)  # other detector keys are ignored
  variables = torch_rpn_head_to_flax(state)
  feats = [torch.randn(2, 8, 7, 9), torch.randn(2, 8, 4, 5)]
  with torch.no_grad():
    logits, regs = head(feats)
  obj, deltas = jax.jit(RPNHead(num_anchors=3).apply)(
      variables, [jnp.asarray(f.numpy().transpose(0, 2, 3, 1)) for f in feats])
  assert len(obj) == len(deltas) == 2
  for lvl, (f, lg, rg) in enumerate(zip(feats, logits, regs)):
    n, _, h, w = f.shape
    want_obj = permute_and_flatten(lg, n, 3, 1, h, w)[..., 0].numpy()
    want_deltas = permute_and_flatten(rg, n, 3, 4, h, w).numpy()
    assert obj[lvl].shape == (n, h * w * 3) and deltas[lvl].shape == (n, h * w * 3, 4)
    np.testing.assert_allclose(obj[lvl], want_obj, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(deltas[lvl], want_deltas, rtol=1e-4, atol=1e-4)


def test_head_init_and_converter_errors():
  feats = [jnp.zeros((1, 6, 6, 16)), jnp.zeros((1, 3, 3, 16))]
  params = RPNHead(num_anchors=3).init(jax.random.key(0), feats)["params"]
  assert set(params) == {"conv_0", "cls_logits", "bbox_pred"}
  assert params["conv_0"]["kernel"].shape == (3, 3, 16, 16)
  assert params["bbox_pred"]["kernel"].shape == (1, 1, 16, 12)
  kernel = np.asarray(params["conv_0"]["kernel"])
  assert abs(kernel.std() - 0.01) < 0.002 and not np.any(params["conv_0"]["bias"])
  state = {"rpn.head.conv.0.0.weight": np.zeros((16, 16, 3, 3)),
           "rpn.head.conv.0.0.bias": np.zeros(16),
           "rpn.head.cls_logits.weight": np.zeros((3, 16, 1, 1)),
           "rpn.head.cls_logits.bias": np.zeros(3)}
  with pytest.raises(ValueError, match="incomplete"):
    torch_rpn_head_to_flax(state)
  with pytest.raises(ValueError, match="Unknown RPN head key"):
    torch_rpn_head_to_flax({**state, "rpn.head.extra.weight": np.zeros(1)})
  with pytest.raises(ValueError, match="one channel count"):
    RPNHead().init(jax.random.key(0), [jnp.zeros((1, 6, 6, 16)), jnp.zeros((1, 3, 3, 8))])


def _random_inputs(rng, scale):
  anchors = generate_anchors(IMAGE, strides=STRIDES, sizes=SIZES)
  obj = [rng.normal(size=a.shape[0]).astype(np.float32) for a in anchors]
  deltas = [(scale * rng.normal(size=a.shape)).astype(np.float32) for a in anchors]
  return obj, deltas, [np.asarray(a) for a in anchors]


@pytest.mark.parametrize("pre,post,min_size,score_thresh,scale", [
    (100, 40, 1e-3, 0.0, 0.5),  # level 2 (60 anchors) keeps all; output full
    (50, 300, 6.0, 0.3, 1.0),  # more slots than survivors: padding; small/low boxes dropped
])
def test_propose_matches_torchvision(monkeypatch, pre, post, min_size, score_thresh, scale):
  import_torchvision()
  torch = pytest.importorskip("torch")
  from torchvision.models.detection import rpn as tv_rpn
  monkeypatch.setattr(tv_rpn.box_ops, "batched_nms", _greedy_batched_nms(torch))
  obj, deltas, anchors = _random_inputs(np.random.default_rng(pre), scale)
  ref = tv_rpn.RegionProposalNetwork(None, None, 0.7, 0.3, 256, 0.5,
                                     {"training": pre, "testing": pre},
                                     {"training": post, "testing": post}, 0.7, score_thresh).eval()
  ref.min_size = min_size
  proposals = ref.box_coder.decode(torch.from_numpy(np.concatenate(deltas)),
                                   [torch.from_numpy(np.concatenate(anchors))]).view(1, -1, 4)
  want_boxes, want_scores = ref.filter_proposals(
      proposals, torch.from_numpy(np.concatenate(obj))[None], [IMAGE], [len(o) for o in obj])
  want_boxes, want_scores = want_boxes[0].numpy(), want_scores[0].numpy()

  boxes, scores, valid = jax.jit(lambda o, d, a: propose(
      o, d, a, IMAGE, pre_nms_top_n=pre, post_nms_top_n=post, nms_thresh=0.7,
      min_size=min_size, score_thresh=score_thresh))(obj, deltas, anchors)
  n = len(want_scores)
  assert boxes.shape == (post, 4) and scores.shape == valid.shape == (post,)
  assert 0 < n and (n == post) == (pre == 100)  # case 1 fills the slots; case 2 pads
  np.testing.assert_array_equal(valid, np.arange(post) < n)
  np.testing.assert_allclose(boxes[:n], want_boxes, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(scores[:n], want_scores, rtol=1e-6, atol=1e-6)
  assert not np.any(boxes[n:]) and not np.any(scores[n:])


def test_propose_vmap_jit_per_image():
  rng = np.random.default_rng(1)
  images = [_random_inputs(rng, 0.7) for _ in range(2)]
  sizes = np.array([IMAGE, (40, 33)], np.float32)
  stack = [jnp.stack([jnp.asarray(x) for x in level]) for level in zip(*[i[0] for i in images])]
  dstack = [jnp.stack([jnp.asarray(x) for x in level]) for level in zip(*[i[1] for i in images])]
  anchors = images[0][2]
  kw = dict(pre_nms_top_n=80, post_nms_top_n=60)
  batched = jax.jit(jax.vmap(lambda o, d, s: propose(o, d, anchors, s, **kw)))(
      stack, dstack, sizes)
  for b in range(2):
    single = propose([o[b] for o in stack], [d[b] for d in dstack], anchors, tuple(sizes[b]),
                     **kw)
    for got, want in zip(batched, single):
      np.testing.assert_allclose(got[b], want, rtol=1e-6, atol=1e-5)
  boxes, _, valid = batched
  assert np.all(boxes[1][..., 0::2] <= 33) and np.all(boxes[1][..., 1::2] <= 40)
  assert np.any(boxes[1][valid[1]][:, 2] == 33)  # clipped to its own width, not image 0's


def test_propose_rejects_bad_inputs():
  obj, deltas, anchors = _random_inputs(np.random.default_rng(0), 0.5)
  with pytest.raises(ValueError, match="one entry per level"):
    propose(obj[:1], deltas, anchors, IMAGE)
  with pytest.raises(ValueError, match="jax.vmap"):
    propose([o[None] for o in obj], deltas, anchors, IMAGE)
  with pytest.raises(ValueError, match="post_nms_top_n"):
    propose(obj, deltas, anchors, IMAGE, post_nms_top_n=0)
