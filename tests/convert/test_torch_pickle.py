"""The torch-free checkpoint reader against `torch.load`, on files `torch.save` writes in
both of its formats (zip and legacy), and `read_state_dict` / `resolve_init_from` with
PyTorch hidden."""
import collections
import io
import os
import pickle
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

from segjax.convert import CONVERTERS, load_variables, read_state_dict, resolve_init_from
from segjax.convert.torch_pickle import Opaque, read_torch_checkpoint
from tests.torch_reference import import_torchvision


class Metadata:
  """An object a training framework might store beside the weights."""

  def __init__(self, epoch):
    self.epoch = epoch


def _tensors(torch):
  """Tensors of every kind a state dict holds: dtypes, strided views, an offset into a
  shared storage, a scalar, an empty tensor and a parameter."""
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 5, generator=g)
  return collections.OrderedDict([
      ("float32", torch.randn(2, 3, 4, generator=g)),
      ("float16", torch.randn(7, generator=g).half()),
      ("bfloat16", torch.randn(3, 2, generator=g).bfloat16()),
      ("float64", torch.randn(4, generator=g).double()),
      ("int64", torch.tensor(12345678901)),
      ("int32", torch.arange(-3, 3, dtype=torch.int32)),
      ("uint8", torch.arange(250, 256, dtype=torch.uint8)),
      ("bool", torch.tensor([True, False, True])),
      ("transposed", base.t()),  # shares `base`'s storage, strides (1, 5)
      ("offset_slice", base[2:4, 1:]),  # offset 11 into the same storage
      ("empty", torch.zeros(0, 3)),
      ("parameter", torch.nn.Parameter(torch.randn(2, 2, generator=g))),
  ])


def _as_numpy(torch, value):
  if value.dtype == torch.bfloat16:
    return value.detach().float().numpy().astype(ml_dtypes.bfloat16)
  return value.detach().numpy()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reads_what_torch_saves(tmp_path, zip_format):
  torch = pytest.importorskip("torch")
  tensors = _tensors(torch)
  path = str(tmp_path / "checkpoint.pth")
  torch.save({"state_dict": tensors, "meta": {"epoch": 3, "note": "x", "obj": Metadata(3)},
              "list": [tensors["float32"], (1, 2.5)]}, path,
             _use_new_zipfile_serialization=zip_format)
  assert zipfile.is_zipfile(path) == zip_format
  got = read_torch_checkpoint(path)
  assert isinstance(got["state_dict"], collections.OrderedDict)
  assert list(got["state_dict"]) == list(tensors)
  for name, value in tensors.items():
    want, ours = _as_numpy(torch, value), got["state_dict"][name]
    assert ours.dtype == want.dtype and ours.shape == want.shape, name
    np.testing.assert_array_equal(ours, want, err_msg=name)
  assert got["meta"]["epoch"] == 3 and got["meta"]["note"] == "x"
  assert isinstance(got["meta"]["obj"], Opaque)  # unknown classes: inert placeholders
  np.testing.assert_array_equal(got["list"][0], tensors["float32"].numpy())
  assert got["list"][1] == (1, 2.5)


def test_read_state_dict_falls_back_when_torch_load_refuses(tmp_path):
  """torch.load(weights_only=True) refuses unknown classes; the plain reader takes over."""
  torch = pytest.importorskip("torch")
  tensors = _tensors(torch)
  path = str(tmp_path / "mmcv_style.pth")
  torch.save({"meta": Metadata(7), "state_dict": tensors}, path)
  with pytest.raises(pickle.UnpicklingError):
    torch.load(path, weights_only=True)
  got = read_state_dict(path)
  for name, value in tensors.items():
    want = value.detach().float() if value.is_floating_point() else value
    assert got[name].dtype == want.numpy().dtype, name
    np.testing.assert_array_equal(got[name], want.detach().numpy(), err_msg=name)


def test_nothing_in_the_file_is_executed(tmp_path):
  marker = tmp_path / "ran"
  payload = pickle.dumps(_Exploit(str(marker)), protocol=2)
  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("evil/data.pkl", payload)
  got = read_torch_checkpoint(str(path))
  assert isinstance(got, Opaque) and not marker.exists()
  with pytest.raises(ValueError, match="holds a .*, not a state dict"):
    _read_state_dict_without_torch(str(path))


class _Exploit:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (os.system, (f"touch {self.path}",))


def _read_state_dict_without_torch(path):
  saved = sys.modules.get("torch")
  sys.modules["torch"] = None  # `import torch` raises ImportError
  try:
    return read_state_dict(path)
  finally:
    if saved is None:
      del sys.modules["torch"]
    else:
      sys.modules["torch"] = saved


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_converts_a_torchvision_checkpoint_without_torch(tmp_path, monkeypatch, zip_format):
  tv = import_torchvision()
  import torch
  model = tv.models.mobilenet_v2(weights=None)
  path = tmp_path / "mobilenet_v2.pth"
  torch.save(model.state_dict(), path, _use_new_zipfile_serialization=zip_format)
  want = CONVERTERS.get("mobilenet_v2")(read_state_dict(str(path)))  # via torch.load
  monkeypatch.setenv("SEGJAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setitem(sys.modules, "torch", None)
  got = load_variables(resolve_init_from(str(path)))
  monkeypatch.undo()
  flat_want, flat_got = dict(_flat(want)), dict(_flat(got))
  assert sorted(flat_got) == sorted(flat_want)
  for key, value in flat_want.items():
    np.testing.assert_array_equal(flat_got[key], value, err_msg=key)


def _flat(tree, prefix=""):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flat(v, f"{prefix}{k}/")
    else:
      yield prefix + k, v


def test_bad_files(tmp_path):
  torch = pytest.importorskip("torch")
  text = tmp_path / "notes.pth"
  text.write_text("not a checkpoint")
  with pytest.raises(ValueError, match="is not a torch.save checkpoint"):
    read_torch_checkpoint(str(text))
  buffer = io.BytesIO()
  torch.save({"w": torch.ones(1000)}, buffer, _use_new_zipfile_serialization=False)
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(buffer.getvalue()[:-100])
  with pytest.raises(ValueError, match="is truncated"):
    read_torch_checkpoint(str(truncated))
  other_zip = tmp_path / "other.pth"
  with zipfile.ZipFile(other_zip, "w") as archive:
    archive.writestr("readme.txt", "hi")
  with pytest.raises(ValueError, match="no <name>/data.pkl"):
    read_torch_checkpoint(str(other_zip))
