"""Imports mmsegmentation as a reference for parity tests (tests/test_mmseg_parity.py).

mmseg 1.2.2 runs on CPU torch from `mmcv-lite`, the build of mmcv without its
compiled extension `mmcv.ops` (requirements-reference.txt installs it without
dependencies). mmseg's own modules import a few names from `mmcv.ops` at import
time (point_sample, PSAMask, CrissCrossAttention, DeformConv,
sigmoid_focal_loss) for heads and losses these tests never build. So, as in
tests/torch_reference.py, an `mmcv.ops` module is put in `sys.modules` before
the import; any name taken from it is a function that raises if called, so a
test that reached compiled mmcv code would fail loudly rather than compute
something else.

This is the one place that does this; tests call `import_mmseg()`, which skips
the calling test when torch or mmseg is not installed. `config_path(name)`
finds a config shipped inside the mmseg package; `randomize_batch_norms` gives
a model random BatchNorm parameters and running statistics (so none is an
identity) and puts it in eval mode.
"""
import importlib
import os
import sys
import types
import warnings

import pytest

_OPS = "mmcv.ops"


def _missing_op(name: str):
  def op(*args, **kwargs):
    raise NotImplementedError(f"mmcv.ops.{name} is compiled code that mmcv-lite lacks; "
                              "the mmseg parity tests do not use it.")
  op.__name__ = name
  return op


def _ops_stub() -> types.ModuleType:
  module = types.ModuleType(_OPS)
  module.__doc__ = "Stand-in for mmcv's compiled ops (see tests/mmseg_reference.py)."

  def getattr_(name):
    if name.startswith("__"):
      raise AttributeError(name)
    return _missing_op(name)
  module.__getattr__ = getattr_
  return module


def import_mmseg():
  """Returns the `mmseg` module (with mmseg.apis imported), skipping the calling test if
  torch, mmcv or mmsegmentation is not installed."""
  pytest.importorskip("torch")
  pytest.importorskip("mmcv")
  if _OPS not in sys.modules:
    try:
      import mmcv.ops  # noqa: F401  (the full mmcv, if installed, is used as it is)
    except ImportError:
      sys.modules[_OPS] = _ops_stub()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # mmcv-lite warns that its deformable attention is absent
    mmseg = pytest.importorskip("mmseg")
    for part in ("apis", "evaluation", "datasets"):
      importlib.import_module(f"mmseg.{part}")
  # Transforms are built in mmseg's registry scope, as its pipelines build them (mmcv's
  # RandomResize then resizes with mmseg's Resize, which handles `seg_fields`).
  from mmengine.registry import init_default_scope
  init_default_scope("mmseg")
  return mmseg


def config_path(name: str) -> str:
  """Path of a config shipped in the mmseg package, e.g.
  'pspnet/pspnet_r50-d8_4xb4-80k_ade20k-512x512.py'."""
  mmseg = import_mmseg()
  path = os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs", name)
  if not os.path.exists(path):
    pytest.skip(f"mmseg {mmseg.__version__} ships no config {name}")
  return path


def init_model(name: str, seed: int = 0, **test_cfg):
  """mmseg's segmentor of config `name` on CPU with random weights (torch seed `seed`) and
  randomized BatchNorms, in eval mode; `test_cfg` overrides model.test_cfg (e.g.
  mode='slide', crop_size=(h, w), stride=(h, w))."""
  import torch
  mmseg = import_mmseg()
  torch.manual_seed(seed)
  options = {"model.test_cfg": dict(test_cfg)} if test_cfg else None
  model = mmseg.apis.init_model(config_path(name), None, device="cpu", cfg_options=options)
  return randomize_batch_norms(model, seed)


def randomize_batch_norms(model, seed: int = 0):
  """Random BatchNorm scale, bias and running statistics (SyncBN included); eval mode."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
        n = m.num_features
        m.weight.copy_(torch.rand(n, generator=g) + 0.5)
        m.bias.copy_(0.2 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
        m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
  return model.eval()
