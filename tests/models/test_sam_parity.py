"""segjax's SAM against segment_anything 1.0, module for module.

A reduced SAM (ViT of width 48, depth 3 with one global block, 2 heads, window 3 on an
8x8 token grid, so windows are padded; 128x128 input, prompt width 32) is built with
segment_anything.modeling's classes and the same constructor arguments as segjax's
`Sam`; every parameter and buffer gets random values (the zero-initialised position
tables and LayerNorms included), the state dict is saved with torch.save and converted
by segjax/convert/sam.py. Image embeddings, low-resolution masks and IoU predictions
then agree to 1e-4 of the output's largest magnitude for point, box and mask prompts,
alone and combined, multimask on and off, and for a static batch of queries with
padded, invalid slots (each query equal to the reference run on its valid prompts
alone). The pre/post-processing (ResizeLongestSide on images, points and boxes,
Sam.preprocess, Sam.postprocess_masks) is compared too.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.convert import load_peer_checkpoint, read_state_dict
from segjax.convert.sam import torch_sam_to_flax
from segjax.models.sam import Sam
from segjax.models.sam import transforms
from tests.torch_reference import import_torchvision

IMG, GRID, DIM = 128, 8, 32  # input side, token grid, prompt width
MASK = 4 * GRID
ENCODER = dict(depth=3, embed_dim=48, num_heads=2, global_attn_indexes=(1,), window_size=3)
SEGJAX_OPTIONS = dict(
    variant="vit_b", image_size=IMG, encoder_embed_dim=48, encoder_depth=3, encoder_num_heads=2,
    encoder_global_attn_indexes=(1,), window_size=3, prompt_embed_dim=DIM, decoder_num_heads=2,
    decoder_mlp_dim=64, iou_head_hidden_dim=32)


def _reference_sam(seed=0):
  """segment_anything's Sam with SEGJAX_OPTIONS' sizes and random weights, in eval mode."""
  import_torchvision()
  torch = pytest.importorskip("torch")
  pytest.importorskip("segment_anything")
  from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam as
                                         TorchSam, TwoWayTransformer)
  torch.manual_seed(seed)
  sam = TorchSam(
      image_encoder=ImageEncoderViT(
          img_size=IMG, patch_size=16, mlp_ratio=4, out_chans=DIM, qkv_bias=True,
          norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
          **ENCODER),
      prompt_encoder=PromptEncoder(embed_dim=DIM, image_embedding_size=(GRID, GRID),
                                   input_image_size=(IMG, IMG), mask_in_chans=16),
      mask_decoder=MaskDecoder(
          num_multimask_outputs=3, transformer_dim=DIM, iou_head_depth=3, iou_head_hidden_dim=32,
          transformer=TwoWayTransformer(depth=2, embedding_dim=DIM, mlp_dim=64, num_heads=2)),
  ).eval()
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, t in sam.state_dict().items():
      if name.startswith("pixel_"):
        continue
      noise = torch.randn(t.shape, generator=g)
      if name.endswith("pos_embed") or ".rel_pos_" in name:
        t.copy_(0.5 * noise)  # zeros at init
      else:
        t.add_(0.1 * noise)  # LayerNorm ones/zeros, biases, embeddings, weights
  return sam


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """(reference Sam, its .pth path, segjax Sam, converted variables)."""
  import torch
  sam = _reference_sam()
  path = str(tmp_path_factory.mktemp("sam") / "sam_small.pth")
  torch.save(sam.state_dict(), path)
  model = Sam(**SEGJAX_OPTIONS)
  variables = torch_sam_to_flax(read_state_dict(path), model)
  return sam, path, model, variables


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, IMG, IMG, 3)).astype(np.float32)
  return x


@pytest.fixture(scope="module")
def embeddings(models, images):
  import torch
  sam, _, model, variables = models
  with torch.no_grad():
    ref = sam.image_encoder(torch.from_numpy(images).permute(0, 3, 1, 2))
  ref = ref.permute(0, 2, 3, 1).numpy()
  ours = np.asarray(jax.jit(functools.partial(model.apply, method=Sam.embed_image))(
      variables, jnp.asarray(images)))
  return ref, ours


def _close(ours, ref, what):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  scale = np.abs(ref).max()
  err = np.abs(ours - ref).max()
  assert err <= 1e-4 * scale, f"{what}: max error {err} against max magnitude {scale}"


def test_image_embeddings(embeddings):
  ref, ours = embeddings
  assert np.abs(ref).max() > 0.1 and ref.std() > 0.1  # not a degenerate output
  _close(ours, ref, "image embeddings")


def _reference_decode(sam, embedding, points=None, labels=None, box=None, mask=None,
                      multimask=True):
  """The reference mask decoder for one image's embedding [1, C, g, g] and one query."""
  import torch
  t = lambda x: None if x is None else torch.as_tensor(np.asarray(x), dtype=torch.float32)[None]
  with torch.no_grad():
    sparse, dense = sam.prompt_encoder(
        points=None if points is None else (t(points), t(labels)), boxes=t(box),
        masks=None if mask is None else t(mask).permute(0, 3, 1, 2))
    low, iou = sam.mask_decoder(
        image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
        multimask_output=multimask)
  return low[0].numpy(), iou[0].numpy()


@functools.lru_cache(maxsize=None)
def _decoder(model, multimask):
  return jax.jit(lambda v, e, kw: model.apply(v, e, **kw, multimask_output=multimask,
                                                method=Sam.decode))


def _decode(models, emb, multimask, **prompts):
  _, _, model, variables = models
  prompts = {k: jnp.asarray(v) for k, v in prompts.items() if v is not None}
  low, iou = _decoder(model, multimask)(variables, jnp.asarray(emb), prompts)
  return np.asarray(low), np.asarray(iou)


# Query j of each image in the static batch of test_prompt_kinds: which prompts are valid
# (a number: that many of the N=3 point slots).
QUERIES = [dict(points=1), dict(points=3), dict(box=True), dict(mask=True),
           dict(points=2, box=True), dict(points=1, mask=True), dict(box=True, mask=True),
           dict(points=3, box=True, mask=True), dict()]


@pytest.mark.parametrize("multimask", [True, False])
def test_prompt_kinds(models, embeddings, multimask):
  """Points, boxes and masks alone and combined, as Q=9 queries per image in one static
  batch with invalid slots; each query equals the reference run on its valid prompts alone
  (with points and no box the reference appends its padding point)."""
  import torch
  sam = models[0]
  ref_emb, ours_emb = embeddings
  b, q, n = 2, len(QUERIES), 3
  rng = np.random.default_rng(7)
  coords = rng.uniform(0, IMG, size=(b, q, n, 2)).astype(np.float32)
  labels = rng.integers(0, 2, size=(b, q, n)).astype(np.int32)
  labels[:, 1, 1] = -1  # a not-a-point given by the user is attended, as in the reference
  boxes = np.sort(rng.uniform(0, IMG, size=(b, q, 2, 2)), axis=2).reshape(b, q, 4)
  boxes = boxes.astype(np.float32)
  masks = rng.normal(scale=3.0, size=(b, q, MASK, MASK, 1)).astype(np.float32)
  point_valid = np.array([[np.arange(n) < c.get("points", 0) for c in QUERIES]] * b)
  box_valid = np.array([[c.get("box", False) for c in QUERIES]] * b)
  mask_valid = np.array([[c.get("mask", False) for c in QUERIES]] * b)
  ours_low, ours_iou = _decode(models, ours_emb, multimask, point_coords=coords,
                               point_labels=labels, point_valid=point_valid, boxes=boxes,
                               box_valid=box_valid, mask_inputs=masks, mask_valid=mask_valid)
  m = 3 if multimask else 1
  assert ours_low.shape == (b, q, m, MASK, MASK) and ours_iou.shape == (b, q, m)
  for i in range(b):
    emb = torch.from_numpy(ref_emb[i:i + 1]).permute(0, 3, 1, 2)
    for j in range(q):
      keep = point_valid[i, j]
      ref_low, ref_iou = _reference_decode(
          sam, emb, coords[i, j][keep] if keep.any() else None,
          labels[i, j][keep] if keep.any() else None, boxes[i, j] if box_valid[i, j] else None,
          masks[i, j] if mask_valid[i, j] else None, multimask)
      _close(ours_low[i, j], ref_low, f"masks of query {j} ({QUERIES[j]}), image {i}")
      _close(ours_iou[i, j], ref_iou, f"IoU of query {j} ({QUERIES[j]}), image {i}")


@pytest.mark.parametrize("kinds", [("points",), ("box", "mask")])
def test_absent_prompt_arrays(models, embeddings, kinds):
  """Prompt kinds left out altogether (None, not masked): points alone (the automatic
  generator's case), box and mask without points. (No prompt at all is query 8 of
  test_prompt_kinds.)"""
  import torch
  sam = models[0]
  ref_emb, ours_emb = embeddings
  rng = np.random.default_rng(len(kinds))
  points = rng.uniform(0, IMG, size=(2, 2, 2)).astype(np.float32)  # [Q, N, 2]
  labels = np.array([[1, 0], [1, 1]], np.float32)
  boxes = np.array([[5.0, 9.0, 70.0, 101.0], [30.0, 2.0, 127.0, 60.0]], np.float32)
  masks = rng.normal(scale=3.0, size=(2, MASK, MASK, 1)).astype(np.float32)
  use = lambda kind, x: x if kind in kinds else None
  ours_low, ours_iou = _decode(
      models, ours_emb[1:], True, point_coords=use("points", points[None]),
      point_labels=use("points", labels[None]), boxes=use("box", boxes[None]),
      mask_inputs=use("mask", masks[None]))
  q = 2
  assert ours_low.shape == (1, q, 3, MASK, MASK)
  emb = torch.from_numpy(ref_emb[1:]).permute(0, 3, 1, 2)
  for j in range(q):
    ref_low, ref_iou = _reference_decode(
        sam, emb, use("points", points[j]), use("points", labels[j]), use("box", boxes[j]),
        use("mask", masks[j]))
    _close(ours_low[0, j], ref_low, f"{kinds} masks, query {j}")
    _close(ours_iou[0, j], ref_iou, f"{kinds} IoU, query {j}")


def test_end_to_end_call(models, images, embeddings):
  """`Sam.__call__` = decode(embed_image(...)); a smaller image is zero-padded as the
  reference's preprocess pads."""
  import torch
  sam, _, model, variables = models
  points = np.array([[20.0, 30.0], [90.0, 15.0]], np.float32)
  labels = np.array([1, 0], np.float32)
  box = np.array([10.0, 12.0, 80.0, 95.0], np.float32)
  low, iou = jax.jit(model.apply)(variables, jnp.asarray(images[:1, :100, :90]),
                                  jnp.asarray(points[None, None]), jnp.asarray(labels[None, None]),
                                  jnp.asarray(box[None, None]))
  padded = np.zeros((1, IMG, IMG, 3), np.float32)
  padded[:, :100, :90] = images[:1, :100, :90]
  with torch.no_grad():
    emb = sam.image_encoder(torch.from_numpy(padded).permute(0, 3, 1, 2))
  ref_low, ref_iou = _reference_decode(sam, emb, points, labels, box)
  _close(low[0, 0], ref_low, "end-to-end masks")
  _close(iou[0, 0], ref_iou, "end-to-end IoU")


def test_peer_checkpoint_loading(models):
  """load_peer_checkpoint (the --checkpoint x.pth path) converts the same variables; the
  torch-free reader gives the same state dict."""
  from segjax.convert.torch_pickle import read_torch_checkpoint
  _, path, model, variables = models
  loaded = load_peer_checkpoint(path, model)
  assert loaded["batch_stats"] == {}
  for a, b in zip(jax.tree.leaves(loaded["params"]), jax.tree.leaves(variables["params"])):
    np.testing.assert_array_equal(a, b)
  plain = read_torch_checkpoint(path)
  again = torch_sam_to_flax(plain, model)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)


def test_conversion_errors_in_one_message(models):
  sam, _, model, _ = models
  state = {k: v.numpy() for k, v in sam.state_dict().items()}
  del state["mask_decoder.iou_token.weight"]
  state["mask_decoder.extra.weight"] = np.zeros(3)
  state["prompt_encoder.no_mask_embed.weight"] = np.zeros((1, DIM + 1))
  with pytest.raises(ValueError) as e:
    torch_sam_to_flax(state, model)
  message = str(e.value)
  for key in ("mask_decoder.iou_token.weight", "mask_decoder.extra.weight",
              "prompt_encoder.no_mask_embed.weight"):
    assert key in message
  with pytest.raises(ValueError, match="does not fit SAM"):
    torch_sam_to_flax(state, Sam(variant="vit_b"))


def test_resize_longest_side():
  """Images, points and boxes resized as segment_anything's ResizeLongestSide."""
  import_torchvision()
  from segment_anything.utils.transforms import ResizeLongestSide
  rng = np.random.default_rng(1)
  for (h, w), side in (((37, 53), IMG), ((90, 41), IMG), ((300, 200), 1024), ((64, 64), 256)):
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    ref = ResizeLongestSide(side)
    expected = ref.apply_image(image)
    got = transforms.resize_longest_side(image, side)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    assert transforms.preprocess_shape(h, w, side) == ref.get_preprocess_shape(h, w, side)
    coords = rng.uniform(0, max(h, w), size=(4, 5, 2))
    np.testing.assert_array_equal(transforms.apply_coords(coords, (h, w), side),
                                  ref.apply_coords(coords, (h, w)))
    boxes = rng.uniform(0, max(h, w), size=(6, 4))
    np.testing.assert_array_equal(transforms.apply_boxes(boxes, (h, w), side),
                                  ref.apply_boxes(boxes, (h, w)))


def test_preprocess_and_postprocess(models):
  import torch
  sam, _, _, _ = models
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, size=(45, 70, 3), dtype=np.uint8)
  padded, input_size = transforms.preprocess(image, IMG)
  resized = transforms.resize_longest_side(image, IMG)
  assert input_size == resized.shape[:2] == (82, 128)
  with torch.no_grad():
    expected = sam.preprocess(torch.from_numpy(resized.copy()).permute(2, 0, 1).float())
  np.testing.assert_allclose(padded, expected.permute(1, 2, 0).numpy(), rtol=0, atol=1e-6)

  low = rng.normal(scale=4.0, size=(2, 3, MASK, MASK)).astype(np.float32)
  for original in ((45, 70), (300, 466)):  # down- and upscaled from the input frame
    with torch.no_grad():
      ref = sam.postprocess_masks(torch.from_numpy(low), input_size, original).numpy()
    got = np.asarray(transforms.postprocess_masks(low, input_size, original, IMG))
    assert got.shape == ref.shape
    # Float32 sampling positions round differently (PyTorch's own float32 result is as far
    # from its float64 one).
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
