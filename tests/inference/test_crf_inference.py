"""The dense CRF in SemanticPredictor (predict.py / eval.py `--crf`): off by
default, the plain argmax when its pairwise weights are 0, a refinement that
changes labels otherwise; batched evaluation refuses it with a sentence."""
import jax
import numpy as np
import pytest

from configs import unet_shapes
from segjax.inference import per_image
from segjax.inference.semantic import SemanticPredictor
from segjax.models import build_model
from segjax.tasks import get_task

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def _predictor(crf=None):
  model = build_model("unet", 3, {"width": 4, "depth": 2})
  variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
  return SemanticPredictor(model, variables, 3, mean=MEAN, std=STD, crf=crf)


def _image():
  rng = np.random.default_rng(0)
  image = np.zeros((30, 37, 3), np.uint8)
  image[:, 18:] = 200
  return np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)


def test_crf_with_zero_weights_is_the_plain_prediction_and_otherwise_refines():
  image = _image()
  plain = _predictor().predict(image)
  neutral = _predictor(dict(gaussian_weight=0.0, bilateral_weight=0.0, window=2, stride=2))
  np.testing.assert_array_equal(neutral.predict(image), plain)
  strong = _predictor(dict(gaussian_weight=10.0, bilateral_weight=20.0, bilateral_srgb=30.0,
                           num_iterations=10, window=4, stride=2))
  refined = strong.predict(image)
  assert refined.shape == image.shape[:2] and refined.dtype == np.int32
  probabilities = strong.probabilities(image)
  np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(refined, probabilities.argmax(-1))
  assert (refined != plain).any()
  # Strong smoothing makes each flat half more uniform than the raw prediction.
  spread = lambda labels: sum(len(np.unique(labels[:, s])) for s in (slice(0, 18),
                                                                      slice(18, None)))
  assert spread(refined) <= spread(plain)


def test_crf_options_from_the_config():
  config = unet_shapes.get_config()
  assert per_image.crf_options(config) is None
  config.inference.crf.enabled = True
  options = per_image.crf_options(config)
  assert options["window"] == 10 and "enabled" not in options
  config.inference.crf.window = 0
  assert per_image.crf_options(config)["window"] is None  # exact filtering


def test_batched_evaluation_refuses_the_crf():
  config = unet_shapes.get_config()
  config.inference.crf.enabled = True
  assert config.inference.mode == "batched"
  with pytest.raises(ValueError, match="refines one image at a time.*inference.mode=whole"):
    get_task(config).validate(config)
