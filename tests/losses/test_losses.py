"""Losses against PyTorch/torchvision or NumPy formulas written here, on random
inputs with ignored pixels and class weights; edge cases (all pixels ignored,
ties in OHEM); build_loss; jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.losses import (LOSSES, binary_cross_entropy_with_logits, build_loss, cross_entropy,
                           dice_loss, lovasz_softmax, ohem_cross_entropy, ohem_keep_mask,
                           pixel_cross_entropy, sigmoid_focal_loss, softmax_focal_loss,
                           weighted_pixel_cross_entropy)
from tests.torch_reference import import_torchvision

IGNORE = 255
CLASS_WEIGHTS = np.array([0.5, 1.0, 2.0, 0.1, 3.0], np.float32)

# Jitted once per shape with the Python options static: much faster than eager op-by-op.
CE = jax.jit(cross_entropy, static_argnames=("ignore_index", "label_smoothing"))
WEIGHTED_CE = jax.jit(weighted_pixel_cross_entropy, static_argnames="ignore_index")
OHEM_MASK = jax.jit(ohem_keep_mask, static_argnames=("ignore_index", "thresh", "min_kept"))
OHEM_CE = jax.jit(ohem_cross_entropy, static_argnames=("ignore_index", "thresh", "min_kept"))
DICE = jax.jit(dice_loss, static_argnames=("ignore_index", "smooth", "exponent", "per_image"))
FOCAL = jax.jit(softmax_focal_loss, static_argnames=("ignore_index", "gamma"))
SIGMOID_FOCAL = jax.jit(sigmoid_focal_loss, static_argnames=("alpha", "gamma"))
BCE = jax.jit(binary_cross_entropy_with_logits)
LOVASZ = jax.jit(lovasz_softmax, static_argnames=("ignore_index", "per_image", "classes"))


def _random_case(seed, shape=(2, 6, 7), num_classes=5, ignore_frac=0.3):
  rng = np.random.default_rng(seed)
  logits = (rng.normal(size=shape + (num_classes,)) * 2).astype(np.float32)
  labels = rng.integers(0, num_classes, shape)
  labels[rng.random(shape) < ignore_frac] = IGNORE
  return logits, labels


def _softmax(logits):
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _torch_nchw(logits):
  import torch
  return torch.from_numpy(np.moveaxis(logits, -1, 1).copy())


# --- cross-entropy -------------------------------------------------------------------------------

@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.35])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_matches_torch(smoothing, weighted):
  torch = pytest.importorskip("torch")
  logits, labels = _random_case(0)
  weights = CLASS_WEIGHTS if weighted else None
  ours = CE(logits, labels, IGNORE, weights, smoothing)
  ref = torch.nn.functional.cross_entropy(
      _torch_nchw(logits), torch.from_numpy(labels), ignore_index=IGNORE,
      weight=None if weights is None else torch.from_numpy(weights), label_smoothing=smoothing)
  np.testing.assert_allclose(float(ours), ref.item(), rtol=1e-5)


def test_cross_entropy_gradient_matches_torch():
  torch = pytest.importorskip("torch")
  logits, labels = _random_case(1)
  grad = jax.jit(jax.grad(cross_entropy), static_argnums=(2, 4))(logits, labels, IGNORE,
                                                               CLASS_WEIGHTS, 0.2)
  inputs = _torch_nchw(logits).requires_grad_()
  torch.nn.functional.cross_entropy(inputs, torch.from_numpy(labels), ignore_index=IGNORE,
                                    weight=torch.from_numpy(CLASS_WEIGHTS),
                                    label_smoothing=0.2).backward()
  np.testing.assert_allclose(np.asarray(grad), np.moveaxis(inputs.grad.numpy(), 1, -1),
                             atol=1e-6)


def test_pixel_weights_and_weighted_cross_entropy_match_numpy():
  logits, labels = _random_case(2)
  pixel_w = np.random.default_rng(2).uniform(0.5, 3.0, labels.shape).astype(np.float32)
  valid = labels != IGNORE
  log_p = np.log(_softmax(logits.astype(np.float64)))[valid]
  y = labels[valid]
  w_true = CLASS_WEIGHTS[y] * pixel_w[valid]
  nll = -log_p[np.arange(len(y)), y]
  np.testing.assert_allclose(
      float(WEIGHTED_CE(logits, labels, pixel_w, IGNORE, CLASS_WEIGHTS)),
      (w_true * nll).sum() / w_true.sum(), rtol=1e-5)
  eps = 0.2  # smoothing: every class weighted by its own weight, normalised by the true ones
  smooth = -(log_p * CLASS_WEIGHTS).sum(-1) * pixel_w[valid]
  expected = ((1 - eps) * (w_true * nll).sum() + eps / 5 * smooth.sum()) / w_true.sum()
  np.testing.assert_allclose(float(CE(logits, labels, IGNORE, CLASS_WEIGHTS, eps,
                                      pixel_weights=pixel_w)), expected, rtol=1e-5)
  # Without smoothing or pixel weights it is the trainer's pixel_cross_entropy.
  np.testing.assert_allclose(float(CE(logits, labels, IGNORE, CLASS_WEIGHTS)),
                             float(pixel_cross_entropy(logits, labels, IGNORE, CLASS_WEIGHTS)),
                             rtol=1e-6)


def test_cross_entropy_rejects_bad_inputs():
  logits, labels = _random_case(3)
  with pytest.raises(ValueError, match="labels shape"):
    cross_entropy(logits, labels[:, :-1], IGNORE)
  with pytest.raises(ValueError, match="one entry per class"):
    cross_entropy(logits, labels, IGNORE, CLASS_WEIGHTS[:3])
  with pytest.raises(ValueError, match="label_smoothing"):
    cross_entropy(logits, labels, IGNORE, label_smoothing=1.5)
  with pytest.raises(ValueError, match="integer"):
    cross_entropy(logits, labels.astype(np.float32), IGNORE)


# --- OHEM ----------------------------------------------------------------------------------------

def _two_class_logits(true_probs, labels):
  """Logits whose softmax gives each pixel's label the probability `true_probs`."""
  p = np.asarray(true_probs, np.float64)
  own, other = np.log(p), np.log1p(-np.minimum(p, 1 - 1e-12))
  first = np.where(np.asarray(labels) == 1, other, own)
  second = np.where(np.asarray(labels) == 1, own, other)
  return np.stack([first, second], -1).astype(np.float32)


def test_ohem_keeps_the_expected_pixels():
  probs = np.array([0.95, 0.2, 0.9, 0.5, 0.99, 0.8, 0.75, 0.1, 0.01, 0.6])
  labels = np.array([0, 1, 1, 0, 1, 0, 1, 0, IGNORE, 1])
  logits = _two_class_logits(probs, labels)

  def kept(**kwargs):
    return set(np.flatnonzero(np.asarray(OHEM_MASK(logits, labels, IGNORE, **kwargs))))

  # The threshold alone keeps more than min_kept; the ignored pixel 8 never counts.
  assert kept(thresh=0.7, min_kept=2) == {1, 3, 7, 9}
  # min_kept raises the threshold to the 6th hardest probability.
  assert kept(thresh=0.7, min_kept=6) == {1, 3, 7, 9, 6, 5}
  assert kept(thresh=0.7, min_kept=0) == {1, 3, 7, 9}
  # More than the labelled pixels: all of them.
  assert kept(thresh=0.7, min_kept=100) == set(range(10)) - {8}
  assert kept(thresh=0.05, min_kept=3) == {7, 1, 3}
  # The loss is the mean cross-entropy over the kept pixels.
  chosen = [1, 3, 7, 9, 6, 5]
  np.testing.assert_allclose(
      float(OHEM_CE(logits, labels, IGNORE, thresh=0.7, min_kept=6)),
      -np.log(probs[chosen]).mean(), rtol=1e-5)


def test_ohem_keeps_at_least_min_kept_despite_ties():
  labels = np.zeros((2, 4), np.int64)
  logits = np.zeros((2, 4, 3), np.float32)
  logits[..., 0] = 200.0  # probability exactly 1.0 in float32: all tied
  logits[1, 2] = [0.0, 1.0, 1.0]  # one hard pixel
  labels[0, 0] = IGNORE
  mask = np.asarray(OHEM_MASK(logits, labels, IGNORE, thresh=0.7, min_kept=4))
  assert mask.sum() == 4 and mask[1, 2] and not mask[0, 0]


def test_ohem_matches_mmseg_threshold_rule_without_ties():
  logits, labels = _random_case(4, shape=(2, 10, 12))
  valid = labels != IGNORE
  true_prob = np.take_along_axis(_softmax(logits), np.where(valid, labels, 0)[..., None],
                                 -1)[..., 0]
  for min_kept in (5, 60, 150):
    sorted_prob = np.sort(true_prob[valid])
    threshold = max(sorted_prob[min(min_kept, len(sorted_prob) - 1)], 0.7)  # mmseg
    expected = valid & (true_prob < threshold)
    mask = np.asarray(OHEM_MASK(logits, labels, IGNORE, 0.7, min_kept))
    np.testing.assert_array_equal(mask, expected)
    assert mask.sum() >= min(min_kept, valid.sum() - 1)


# --- Dice ----------------------------------------------------------------------------------------

def _numpy_dice(logits, labels, weights, per_image, smooth=1.0, exponent=2.0):
  probs = _softmax(logits.astype(np.float64))
  num_classes = logits.shape[-1]
  groups = [(probs[i], labels[i]) for i in range(len(labels))] if per_image else [(probs, labels)]
  losses = []
  for p, y in groups:
    valid = y != IGNORE
    p, y = p[valid], y[valid]
    total = 0.0
    for c in range(num_classes):
      t = (y == c).astype(np.float64)
      dice = (2 * (p[:, c] * t).sum() + smooth) / (
          (p[:, c] ** exponent).sum() + (t ** exponent).sum() + smooth)
      total += (1 if weights is None else weights[c]) * (1 - dice)
    losses.append(total / num_classes)
  return np.mean(losses)


@pytest.mark.parametrize("per_image", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_dice_matches_numpy(per_image, weighted):
  logits, labels = _random_case(5)
  labels[1, :3] = IGNORE
  weights = CLASS_WEIGHTS if weighted else None
  ours = DICE(logits, labels, IGNORE, weights, per_image=per_image)
  np.testing.assert_allclose(float(ours), _numpy_dice(logits, labels, weights, per_image),
                             rtol=1e-5)
  ours = DICE(logits, labels, IGNORE, weights, smooth=0.5, exponent=1.0, per_image=per_image)
  np.testing.assert_allclose(float(ours), _numpy_dice(logits, labels, weights, per_image,
                                                      0.5, 1.0), rtol=1e-5)


# --- focal ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [None, 0.25, "per_class"])
def test_softmax_focal_matches_numpy(alpha):
  logits, labels = _random_case(6)
  alpha = np.linspace(0.2, 1.0, 5) if alpha == "per_class" else alpha
  valid = labels != IGNORE
  y = labels[valid]
  p_t = _softmax(logits.astype(np.float64))[valid][np.arange(len(y)), y]
  alpha_t = 1.0 if alpha is None else (alpha if np.isscalar(alpha) else alpha[y])
  per_pixel = -alpha_t * (1 - p_t) ** 2 * np.log(p_t)
  w = CLASS_WEIGHTS[y]
  ours = FOCAL(logits, labels, IGNORE, CLASS_WEIGHTS, gamma=2.0, alpha=alpha)
  np.testing.assert_allclose(float(ours), (w * per_pixel).sum() / w.sum(), rtol=1e-5)


def test_softmax_focal_with_gamma_zero_is_cross_entropy():
  logits, labels = _random_case(7)
  np.testing.assert_allclose(
      float(FOCAL(logits, labels, IGNORE, CLASS_WEIGHTS, gamma=0.0)),
      float(CE(logits, labels, IGNORE, CLASS_WEIGHTS)), rtol=1e-5)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (None, 1.5), (0.6, 0.0)])
def test_sigmoid_focal_matches_torchvision(alpha, gamma):
  torchvision = import_torchvision()
  import torch
  rng = np.random.default_rng(8)
  logits = (rng.normal(size=(2, 5, 6, 3)) * 3).astype(np.float32)
  targets = (rng.random(logits.shape) < 0.3).astype(np.float32)
  inputs = torch.from_numpy(logits).requires_grad_()
  ref = torchvision.ops.sigmoid_focal_loss(inputs, torch.from_numpy(targets),
                                           -1 if alpha is None else alpha, gamma, "mean")
  ref.backward()
  ours, grad = jax.jit(jax.value_and_grad(sigmoid_focal_loss), static_argnums=(2, 3))(
      logits, targets, alpha, gamma)
  np.testing.assert_allclose(float(ours), ref.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), inputs.grad.numpy(), rtol=1e-4, atol=1e-8)
  # With a valid mask: the mean of torchvision's per-element losses over the mask.
  mask = rng.random(logits.shape[:-1]) < 0.6
  per_element = torchvision.ops.sigmoid_focal_loss(
      torch.from_numpy(logits), torch.from_numpy(targets), -1 if alpha is None else alpha,
      gamma).numpy()
  np.testing.assert_allclose(
      float(SIGMOID_FOCAL(logits, targets, alpha, gamma, mask[..., None])),
      per_element[mask].mean(), rtol=1e-5)


# --- binary cross-entropy ------------------------------------------------------------------------

def test_binary_cross_entropy_matches_torch():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(9)
  logits = (rng.normal(size=(3, 7, 4)) * 10).astype(np.float32)  # some saturate
  targets = rng.random(logits.shape).astype(np.float32)
  pos_weight = np.array([0.5, 1.0, 2.0, 4.0], np.float32)
  for pw in (None, pos_weight):
    ref = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(logits), torch.from_numpy(targets),
        pos_weight=None if pw is None else torch.from_numpy(pw))
    np.testing.assert_allclose(float(BCE(logits, targets, pos_weight=pw)),
                               ref.item(), rtol=1e-5)
  mask = rng.random(logits.shape) < 0.5
  per_element = torch.nn.functional.binary_cross_entropy_with_logits(
      torch.from_numpy(logits), torch.from_numpy(targets), reduction="none").numpy()
  np.testing.assert_allclose(float(BCE(logits, targets, mask)),
                             per_element[mask].mean(), rtol=1e-5)
  assert float(BCE(logits, targets, np.zeros_like(mask))) == 0.0


# --- Lovasz-softmax ------------------------------------------------------------------------------

def _numpy_lovasz(logits, labels, per_image, classes, weights=None):
  """The paper's algorithm on the labelled pixels, with its gradient wrt the logits."""
  probs = _softmax(logits.astype(np.float64))
  num_classes = logits.shape[-1]
  weights = np.ones(num_classes) if weights is None else weights
  grad = np.zeros_like(probs)
  groups = [np.s_[i] for i in range(len(labels))] if per_image else [np.s_[...]]
  total = 0.0
  for group in groups:
    valid = labels[group] != IGNORE
    p, y = probs[group][valid], labels[group][valid]
    group_grad = np.zeros_like(p)
    losses, used = [], []
    for c in range(num_classes):
      fg = (y == c).astype(np.float64)
      if len(y) == 0 or (classes == "present" and fg.sum() == 0):
        continue
      errors = np.abs(fg - p[:, c])
      order = np.argsort(-errors, kind="stable")
      fg_sorted = fg[order]
      intersection = fg.sum() - np.cumsum(fg_sorted)
      union = fg.sum() + np.cumsum(1 - fg_sorted)
      jaccard = 1 - intersection / union
      jaccard[1:] = jaccard[1:] - jaccard[:-1]
      losses.append(errors[order] @ jaccard)
      used.append(c)
      slope = np.empty_like(errors)
      slope[order] = jaccard
      group_grad[:, c] += weights[c] * slope * np.where(fg > 0, -1.0, 1.0)
    if losses:
      norm = weights[used].sum()
      total += (weights[used] * np.array(losses)).sum() / norm
      grad_view = grad[group]
      grad_view[valid] = group_grad / norm
  count = len(groups)
  dprobs = grad / count
  # Chain through the softmax: dL/dz_j = p_j (dL/dp_j - sum_c p_c dL/dp_c).
  dlogits = probs * (dprobs - (probs * dprobs).sum(-1, keepdims=True))
  return total / count, dlogits


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("classes", ["present", "all"])
def test_lovasz_matches_numpy_reference(per_image, classes):
  logits, labels = _random_case(10, shape=(3, 5, 6))
  labels[2] = IGNORE  # an image with nothing labelled counts 0 in the per-image mean
  labels[0][labels[0] == 4] = 1  # class 4 absent from image 0
  value, grad = jax.jit(jax.value_and_grad(lovasz_softmax), static_argnums=(2, 4, 5))(
      logits, labels, IGNORE, None, per_image, classes)
  expected, expected_grad = _numpy_lovasz(logits, labels, per_image, classes)
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, atol=1e-6)


def test_lovasz_class_weights_and_ignored_pixels():
  logits, labels = _random_case(11)
  value = LOVASZ(logits, labels, IGNORE, CLASS_WEIGHTS, per_image=True)
  expected, _ = _numpy_lovasz(logits, labels, True, "present", CLASS_WEIGHTS)
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)
  # Ignored pixels do not matter, even with logits that would sort them first.
  perturbed = logits.copy()
  perturbed[labels == IGNORE] = np.array([50.0, -50.0, 0.0, 0.0, 0.0])
  np.testing.assert_allclose(float(LOVASZ(perturbed, labels, IGNORE)),
                             float(LOVASZ(logits, labels, IGNORE)), rtol=1e-6)


# --- all pixels ignored --------------------------------------------------------------------------

ALL_LOSSES_SPEC = [{"name": name, "weight": 1.0} for name in LOSSES.names()]


def test_all_ignored_gives_zero_and_finite_gradients():
  logits, labels = _random_case(12)
  labels[:] = IGNORE
  loss_fn = build_loss(ALL_LOSSES_SPEC)
  pixel_w = np.ones(labels.shape, np.float32)

  def total(x):
    return loss_fn(x, labels, IGNORE, CLASS_WEIGHTS, pixel_w)

  (value, terms), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(logits)
  assert set(terms) == set(LOSSES.names())
  for name, term in terms.items():
    assert float(term) == 0.0, name
  assert float(value) == 0.0
  assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad) == 0)


def test_ignored_pixels_get_zero_gradient_in_every_loss():
  logits, labels = _random_case(13)
  saturated = logits.copy()
  saturated[..., 0] += 100.0  # probabilities of exactly 0 and 1 must not give NaN
  for name in LOSSES.names():
    loss_fn = build_loss([{"name": name}])
    grad_fn = jax.jit(jax.grad(lambda z, fn=loss_fn: fn(z, labels, IGNORE)[0]))
    for x in (saturated, logits):
      grad = np.asarray(grad_fn(jnp.asarray(x)))
      assert np.all(np.isfinite(grad)), name
      assert np.all(grad[labels == IGNORE] == 0), name
    assert np.any(grad[labels != IGNORE] != 0), name  # of the unsaturated logits


def test_focal_gamma_below_one_has_finite_gradients_at_certainty():
  logits = np.array([[[100.0, -100.0], [0.3, 0.1]]], np.float32)  # p_t = 1 exactly at [0, 0]
  labels = np.array([[0, 1]])
  grad = jax.grad(FOCAL)(logits, labels, IGNORE, None, 0.5)
  assert np.all(np.isfinite(np.asarray(grad))) and np.any(np.asarray(grad) != 0)
  targets = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)
  grad = jax.grad(SIGMOID_FOCAL)(logits, targets, 0.25, 0.5)
  assert np.all(np.isfinite(np.asarray(grad))) and np.any(np.asarray(grad) != 0)


# --- build_loss ----------------------------------------------------------------------------------

def test_build_loss_is_the_weighted_sum_and_jits():
  logits, labels = _random_case(14)
  pixel_w = np.random.default_rng(14).uniform(0.5, 2.0, labels.shape).astype(np.float32)
  spec = [{"name": "cross_entropy", "weight": 1.0, "label_smoothing": 0.1},
          {"name": "dice", "weight": 0.5},
          {"name": "ohem_cross_entropy", "weight": 0.3, "thresh": 0.6, "min_kept": 20},
          {"name": "lovasz_softmax", "weight": 0.2, "per_image": True},
          {"name": "cross_entropy", "weight": 2.0}]
  loss_fn = build_loss(spec)
  total, terms = jax.jit(loss_fn, static_argnums=2)(logits, labels, IGNORE, CLASS_WEIGHTS,
                                                    pixel_w)
  expected = {
      "cross_entropy": CE(logits, labels, IGNORE, CLASS_WEIGHTS, 0.1, pixel_weights=pixel_w),
      "dice": DICE(logits, labels, IGNORE, CLASS_WEIGHTS),
      "ohem_cross_entropy": OHEM_CE(logits, labels, IGNORE, CLASS_WEIGHTS, 0.6, 20),
      "lovasz_softmax": LOVASZ(logits, labels, IGNORE, CLASS_WEIGHTS, per_image=True),
      "cross_entropy_2": WEIGHTED_CE(logits, labels, pixel_w, IGNORE, CLASS_WEIGHTS),
  }
  assert set(terms) == set(expected)
  for key, value in expected.items():
    np.testing.assert_allclose(float(terms[key]), float(value), rtol=1e-5, err_msg=key)
  weights = [1.0, 0.5, 0.3, 0.2, 2.0]
  np.testing.assert_allclose(float(total), sum(w * float(v) for w, v in
                                               zip(weights, expected.values())), rtol=1e-5)


def test_build_loss_sigmoid_terms_use_one_hot_targets():
  logits, labels = _random_case(15)
  valid = (labels != IGNORE)[..., None]
  targets = np.eye(5, dtype=np.float32)[np.where(labels == IGNORE, 0, labels)]
  weights = np.broadcast_to(valid * CLASS_WEIGHTS, logits.shape)
  _, terms = build_loss([{"name": "binary_cross_entropy"},
                         {"name": "sigmoid_focal", "alpha": 0.5, "gamma": 1.0}])(
                             logits, labels, IGNORE, CLASS_WEIGHTS)
  np.testing.assert_allclose(float(terms["binary_cross_entropy"]),
                             float(BCE(logits, targets, weights)),
                             rtol=1e-6)
  np.testing.assert_allclose(float(terms["sigmoid_focal"]),
                             float(SIGMOID_FOCAL(logits, targets, 0.5, 1.0, weights)),
                             rtol=1e-6)
  # One channel: the 0/1 labels themselves are the targets.
  binary = np.where(labels == IGNORE, IGNORE, labels % 2)
  total, _ = build_loss([{"name": "binary_cross_entropy"}])(logits[..., :1], binary, IGNORE)
  keep = binary != IGNORE
  np.testing.assert_allclose(float(total), float(BCE(logits[..., 0][keep],
                                                     binary[keep].astype(np.float32))), rtol=1e-6)


def test_build_loss_errors_name_the_choices():
  with pytest.raises(ValueError, match="known losses: binary_cross_entropy, cross_entropy"):
    build_loss([{"name": "crossentropy"}])
  with pytest.raises(ValueError, match=r"no option\(s\) \['smoothing'\]; its options are "
                                       r"\['label_smoothing'\]"):
    build_loss([{"name": "cross_entropy", "smoothing": 0.1}])
  with pytest.raises(ValueError, match="non-empty list"):
    build_loss([])
  with pytest.raises(ValueError, match="non-empty list"):
    build_loss({"name": "dice"})
  with pytest.raises(ValueError, match="weight must be a number"):
    build_loss([{"name": "dice", "weight": "1"}])
  logits, labels = _random_case(16)
  with pytest.raises(ValueError, match="none of the losses"):
    build_loss([{"name": "dice"}])(logits, labels, IGNORE,
                                   pixel_weights=np.ones(labels.shape, np.float32))
