"""Imports torchvision as a PyTorch reference for parity tests.

The installed torchvision wheel is a CUDA build whose compiled extension
(`torchvision._C`) does not load next to the CPU-only torch here, so its
custom operators (torchvision::nms, roi_align, ...) are never registered. On
import, torchvision's `_meta_registrations` and `_autograd_registrations`
attach kernels to those operators and fail with "operator torchvision::nms
does not exist". Nothing the tests use needs them: the models are plain
Python modules, and `torchvision.ops.roi_align._roi_align` is pure Python. So
both modules are replaced by empty ones in `sys.modules` before the import.

This is the one place that does this; tests call `import_torchvision()`.
"""
import sys
import types

import pytest

_BROKEN_ON_CPU_TORCH = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


def import_torchvision():
  """Returns the torchvision module, skipping the calling test if torch or
  torchvision is not installed."""
  pytest.importorskip("torch")
  if "torchvision" not in sys.modules:
    for name in _BROKEN_ON_CPU_TORCH:
      sys.modules.setdefault(name, types.ModuleType(name))
  return pytest.importorskip("torchvision")
