"""The automatic mask generator against segment_anything 1.0 (utils/amg.py and
SamAutomaticMaskGenerator): each piece, then the whole filtering pipeline run on the
reference's own torch SAM, so that only the post-processing differs."""
import functools

import jax.numpy as jnp
import numpy as np
import pytest

from segjax.inference import sam_automatic as amg
from segjax.ops import regions, rle
from tests.torch_reference import greedy_batched_nms, import_torchvision

torch = pytest.importorskip("torch")
import_torchvision()
ref_amg = pytest.importorskip("segment_anything.utils.amg")
ref_generator = pytest.importorskip("segment_anything.automatic_mask_generator")


@pytest.mark.parametrize("n,layers,scale", [(32, 0, 1), (16, 2, 2), (7, 2, 2), (5, 1, 1)])
def test_point_grids(n, layers, scale):
  ours = amg.layer_point_grids(n, layers, scale)
  ref = ref_amg.build_all_layer_point_grids(n, layers, scale)
  assert len(ours) == len(ref)
  for a, b in zip(ours, ref):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("size", [(80, 120), (333, 500), (1024, 768), (97, 97)])
@pytest.mark.parametrize("layers,ratio", [(0, 512 / 1500), (1, 512 / 1500), (3, 0.2)])
def test_crop_boxes(size, layers, ratio):
  assert amg.crop_boxes(size, layers, ratio) == ref_amg.generate_crop_boxes(size, layers, ratio)


def test_stability_score():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (4, 3, 37, 53)).astype(np.float32)
  logits[0, 0] = -5  # both masks empty: 0 / 0
  ours = np.asarray(amg.stability_score(jnp.asarray(logits), 0.0, 1.0))
  ref = ref_amg.calculate_stability_score(torch.from_numpy(logits), 0.0, 1.0).numpy()
  np.testing.assert_allclose(ours, ref, rtol=1e-6)
  assert np.isnan(ours[0, 0]) and np.isnan(ref[0, 0])
  ours = np.asarray(amg.stability_score(jnp.asarray(logits), 0.5, 2.0))
  ref = ref_amg.calculate_stability_score(torch.from_numpy(logits), 0.5, 2.0).numpy()
  np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_masks_to_boxes():
  rng = np.random.default_rng(1)
  masks = rng.random((3, 5, 31, 45)) > 0.999
  masks[0, 0] = False
  masks[1, 2, 7, 9] = True
  ours = np.asarray(amg.masks_to_boxes(jnp.asarray(masks)))
  np.testing.assert_array_equal(ours, ref_amg.batched_mask_to_box(torch.from_numpy(masks)))
  for m, b in zip(masks.reshape(-1, 31, 45), ours.reshape(-1, 4)):
    np.testing.assert_array_equal(amg._host_box(m), b)


def test_near_crop_edge():
  rng = np.random.default_rng(2)
  crop, image = [50, 40, 180, 160], [0, 0, 200, 160]
  xy = rng.integers(0, 130, (400, 2))
  boxes = np.concatenate([xy, xy + rng.integers(0, 60, (400, 2))], 1)
  ours = np.asarray(amg.near_crop_edge(jnp.asarray(boxes), crop, image))
  ref = ref_amg.is_box_near_crop_edge(torch.from_numpy(boxes), crop, image).numpy()
  np.testing.assert_array_equal(ours, ref)
  assert 0 < ours.sum() < len(ours)


def test_rle():
  rng = np.random.default_rng(3)
  masks = rng.random((4, 23, 17)) > 0.6
  masks[1] = True
  masks[2] = False
  masks[3, 0, 0] = True
  ref = ref_amg.mask_to_rle_pytorch(torch.from_numpy(masks))
  for mask, want in zip(masks, ref):
    got = rle.mask_to_rle(mask)
    assert got == want
    np.testing.assert_array_equal(rle.rle_to_mask(got), mask)
    np.testing.assert_array_equal(rle.rle_to_mask(got), ref_amg.rle_to_mask(want))
    assert rle.rle_area(got) == ref_amg.area_from_rle(want) == mask.sum()
    assert rle.coco_rle(got) == ref_amg.coco_encode_rle(want)
  with pytest.raises(ValueError, match="counts sum"):
    rle.rle_to_mask({"size": [2, 2], "counts": [1, 2]})


@pytest.mark.parametrize("mode", ["holes", "islands"])
@pytest.mark.parametrize("area", [3, 25, 10_000])
def test_remove_small_regions(mode, area):
  pytest.importorskip("cv2")
  rng = np.random.default_rng(4)
  for _ in range(5):
    mask = rng.random((40, 50)) > 0.55  # speckle: many regions of all sizes
    mask[5:25, 10:40] = True
    ours, changed = regions.remove_small_regions(mask, area, mode)
    want, want_changed = ref_amg.remove_small_regions(mask, area, mode)
    assert changed == want_changed
    np.testing.assert_array_equal(ours, want)


def test_box_nms_matches_torchvision_semantics():
  rng = np.random.default_rng(5)
  xy = rng.integers(0, 60, (150, 2))
  boxes = np.concatenate([xy, xy + rng.integers(1, 40, (150, 2))], 1).astype(np.float32)
  scores = rng.integers(0, 4, 150).astype(np.float32)  # many ties, visited in index order
  ref_nms = greedy_batched_nms(torch)
  for threshold in (0.3, 0.7):
    want = ref_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.zeros(150),
                   threshold).numpy()
    np.testing.assert_array_equal(amg.box_nms(boxes, scores, threshold), want)
  assert amg.box_nms(boxes[:0], scores[:0], 0.7).shape == (0,)


# ------------------------------------------------------------- the whole generator, torch SAM

def tiny_torch_sam(seed: int = 0):
  """A reduced SAM of segment_anything's modules (img_size 128, width 32) with random weights,
  reshaped so that random masks pass SAM's filters: sharp logits (the mask hypernetworks'
  output layers x1000, so stability scores reach 0.95) and predicted IoUs spread around 1
  (the IoU head's output layer x5, bias +1)."""
  from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                         TwoWayTransformer)
  torch.manual_seed(seed)
  dim = 32
  sam = Sam(
      ImageEncoderViT(img_size=128, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                      mlp_ratio=2, out_chans=dim, qkv_bias=True,
                      norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
                      use_rel_pos=True, window_size=4, global_attn_indexes=(1,)),
      PromptEncoder(embed_dim=dim, image_embedding_size=(8, 8), input_image_size=(128, 128),
                    mask_in_chans=4),
      MaskDecoder(num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=3,
                  iou_head_hidden_dim=32,
                  transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64,
                                                num_heads=2))).eval()
  sharpen(sam.mask_decoder)
  return sam


def sharpen(decoder):
  """The random-weight reshaping of `tiny_torch_sam`, on a torch MaskDecoder."""
  with torch.no_grad():
    for mlp in decoder.output_hypernetworks_mlps:
      mlp.layers[-1].weight.mul_(1000.0)
    decoder.iou_prediction_head.layers[-1].weight.mul_(5.0)
    decoder.iou_prediction_head.layers[-1].bias.add_(1.0)


def photo(name: str = "astronaut", size=(160, 160)) -> np.ndarray:
  """A scikit-image sample photograph, downscaled (PIL bilinear) to (width, height)."""
  from PIL import Image
  data = pytest.importorskip("skimage.data")
  return np.asarray(Image.fromarray(getattr(data, name)()).resize(size, Image.BILINEAR))


class TorchPrompter:
  """segment_anything's SamPredictor as a PointPrompter (logits as jax arrays)."""
  mask_threshold = 0.0

  def __init__(self, sam):
    from segment_anything import SamPredictor
    self.predictor = SamPredictor(sam)

  def set_image(self, image):
    self.predictor.set_image(image)
    return image.shape[:2]

  def predict_points(self, size, points):
    coords = torch.as_tensor(self.predictor.transform.apply_coords(points, size))
    labels = torch.ones(len(points), 1, dtype=torch.int)
    with torch.no_grad():
      masks, iou, _ = self.predictor.predict_torch(coords[:, None], labels,
                                                   multimask_output=True, return_logits=True)
    return jnp.asarray(masks.numpy()), jnp.asarray(iou.numpy())


def reference_masks(sam, image, **settings):
  """SamAutomaticMaskGenerator's records, with the greedy batched NMS of the torchvision
  shim in place of the compiled kernel."""
  original = ref_generator.batched_nms
  ref_generator.batched_nms = greedy_batched_nms(torch)
  try:
    return ref_generator.SamAutomaticMaskGenerator(sam, **settings).generate(image)
  finally:
    ref_generator.batched_nms = original


def assert_same_records(ours, want):
  """Equal records, in the same order."""
  assert len(ours) == len(want)
  for a, b in zip(ours, want):
    assert a.keys() == b.keys()
    if isinstance(b["segmentation"], dict):
      assert a["segmentation"] == b["segmentation"]
    else:
      np.testing.assert_array_equal(a["segmentation"], b["segmentation"])
    for key in ("area", "bbox", "point_coords", "crop_box", "predicted_iou", "stability_score"):
      assert a[key] == b[key], key


# Settings for random weights: the default filters (IoU 0.88, stability 0.95), with box NMS
# nearly off (random masks are scattered blobs whose boxes span the image, so NMS at 0.7
# leaves one or two); the NMS-on run checks suppression itself.
CROPS = dict(points_per_side=8, points_per_batch=24, box_nms_thresh=1.0, crop_nms_thresh=1.0,
             crop_n_layers=1, crop_n_points_downscale_factor=2, min_mask_region_area=20)


@pytest.fixture(scope="module")
def torch_sam():
  return tiny_torch_sam()


@pytest.fixture(scope="module")
def crops_reference(torch_sam):
  """(image, the reference's records with CROPS settings), shared by both generators."""
  image = photo()
  return image, reference_masks(torch_sam, image, **CROPS)


def test_generator_matches_reference_on_its_model(torch_sam, crops_reference):
  """Crop layers, edge filtering, small-region removal: equal records, in order."""
  image, want = crops_reference
  ours = amg.AutomaticMaskGenerator(TorchPrompter(torch_sam), **CROPS).generate(image)
  assert len(want) >= 10  # a meaningful number of masks
  assert_same_records(ours, want)


def test_generator_nms_and_coco_rle_match_reference(torch_sam):
  """Box NMS within and across crops at the default thresholds, COCO RLE output."""
  settings = dict(points_per_side=8, points_per_batch=64, crop_n_layers=1,
                  output_mode="coco_rle")
  image = photo(size=(128, 96))
  want = reference_masks(torch_sam, image, **settings)
  ours = amg.AutomaticMaskGenerator(TorchPrompter(torch_sam), **settings).generate(image)
  assert_same_records(ours, want)


def test_generator_rejects_bad_settings():
  with pytest.raises(ValueError, match="exactly one"):
    amg.AutomaticMaskGenerator(None, points_per_side=None)
  with pytest.raises(ValueError, match="no points in crop layer 3"):
    amg.AutomaticMaskGenerator(None, points_per_side=7, crop_n_layers=3,
                               crop_n_points_downscale_factor=2)
  with pytest.raises(ValueError, match="output_mode"):
    amg.AutomaticMaskGenerator(None, output_mode="polygons")
  with pytest.raises(ValueError, match="RGB uint8"):
    amg.AutomaticMaskGenerator(None).generate(np.zeros((4, 4), np.uint8))


# ------------------------------------------------------------ the whole generator, segjax SAM

def segjax_sam(torch_sam, tmp_path_factory):
  """segjax's Sam of `tiny_torch_sam`'s sizes with its weights (converted from a .pth)."""
  from segjax.convert import read_state_dict
  from segjax.convert.sam import torch_sam_to_flax
  from segjax.models.sam import Sam
  path = str(tmp_path_factory.mktemp("sam") / "tiny_sam.pth")
  torch.save(torch_sam.state_dict(), path)
  model = Sam(**TINY_OPTIONS)
  return model, torch_sam_to_flax(read_state_dict(path), model)


# segjax Sam options of `tiny_torch_sam` (configs/sam_vit_b.py:smoke has the same sizes).
TINY_OPTIONS = dict(
    variant="vit_b", image_size=128, patch_size=16, encoder_embed_dim=32, encoder_depth=2,
    encoder_num_heads=2, encoder_global_attn_indexes=(1,), window_size=4, mlp_ratio=2.0,
    prompt_embed_dim=32, mask_in_chans=4, decoder_depth=2, decoder_num_heads=2,
    decoder_mlp_dim=64, iou_head_hidden_dim=32)


def matched_ious(ours, want):
  """Greedy one-to-one matching of two record lists by mask IoU; the matched IoUs."""
  a = np.stack([r["segmentation"] for r in ours]).reshape(len(ours), -1)
  b = np.stack([r["segmentation"] for r in want]).reshape(len(want), -1)
  inter = a.astype(np.float64) @ b.T.astype(np.float64)
  union = a.sum(1)[:, None] + b.sum(1)[None] - inter
  iou = inter / np.maximum(union, 1)
  found = []
  while iou.size and iou.max() >= 0:
    i, j = np.unravel_index(np.argmax(iou), iou.shape)
    found.append(iou[i, j])
    iou[i, :], iou[:, j] = -1, -1
  return np.asarray(found)


def test_generator_on_segjax_sam_matches_reference(torch_sam, crops_reference,
                                                   tmp_path_factory):
  """The generator on segjax's SAM equals segment_anything's on the same weights (crop
  layers and small-region removal on): as many masks, each matched to one of the
  reference's with IoU >= 0.99."""
  from segjax.inference.sam_predictor import SamPredictor
  model, variables = segjax_sam(torch_sam, tmp_path_factory)
  image, want = crops_reference
  ours = amg.AutomaticMaskGenerator(SamPredictor(model, variables), **CROPS).generate(image)
  assert len(want) >= 10
  assert len(ours) == len(want)
  ious = matched_ious(ours, want)
  assert len(ious) == len(want) and ious.min() >= 0.99, np.sort(ious)[:5]
