"""`resolve_init_from`: short names and URLs -> a converted .npz, downloaded, verified and
converted once, against a local HTTP server that the tests start and stop.

The served checkpoint is a real torchvision `mobilenet_v2` state dict (random weights and
BatchNorm statistics) saved with `torch.save` and named with its true sha256 prefix, as
published files are; its converted .npz must give torchvision's features.
"""
import functools
import hashlib
import http.server
import io
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import pspnet_ade20k
from segjax.backbones import MobileNetV2, ResNet
from segjax.convert import CONVERTERS, load_variables, pretrained, save_variables
from segjax.convert.pretrained import Pretrained, PretrainedWeightsError, resolve_init_from
from tests.models.test_mobilenet_deeplabv3plus import PREFIXES
from tests.backbones.test_resnet_parity import STAGES, _randomize_batch_norms, _torch_features
from tests.torch_reference import import_torchvision


class _Server:
  """http.server on 127.0.0.1 (a free port) serving one folder from a thread."""

  def __init__(self, folder: Path):
    self.requests = []  # the paths asked for
    handler = type("Handler", (_LoggingHandler,), {"requests": self.requests})
    self.httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def stop(self):
    if self.thread.is_alive():
      self.httpd.shutdown()
      self.thread.join()
      self.httpd.server_close()  # the port refuses connections from here on


class _LoggingHandler(http.server.SimpleHTTPRequestHandler):
  """Serves files; logs each request's path into the class's `requests`, not stderr."""
  requests: ClassVar[list]

  def log_message(self, *args):
    self.requests.append(self.path)

  def do_GET(self):
    """/cut/NAME: announces NAME's full length, sends half of it, then hangs up."""
    if not self.path.startswith("/cut/"):
      return super().do_GET()
    data = (Path(self.directory) / self.path[len("/cut/"):]).read_bytes()
    self.send_response(200)
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data[:len(data) // 2])
    self.close_connection = True


@pytest.fixture(scope="module")
def checkpoint():
  """(bytes of a torch.save'd mobilenet_v2 state dict, its sha256, the torch model)."""
  tv = import_torchvision()
  import torch
  torch.manual_seed(0)
  model = _randomize_batch_norms(tv.models.mobilenet_v2(weights=None), torch)
  buffer = io.BytesIO()
  torch.save(model.state_dict(), buffer)
  data = buffer.getvalue()
  return data, hashlib.sha256(data).hexdigest(), model


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("SEGJAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.delenv("SEGJAX_PRETRAINED_BASE_URL", raising=False)
  return tmp_path / "cache" / "pretrained"


@pytest.fixture
def served(tmp_path, checkpoint):
  """A running server whose folder holds the checkpoint as mobilenet_v2-<sha256[:8]>.pth."""
  folder = tmp_path / "www"
  folder.mkdir()
  data, digest, _ = checkpoint
  name = f"mobilenet_v2-{digest[:8]}.pth"
  (folder / name).write_bytes(data)
  server = _Server(folder)
  server.folder, server.name = folder, name
  yield server
  server.stop()


def _assert_mobilenet_features(npz_path, torch_model):
  """The converted file gives torchvision's features at every stage."""
  import torch
  x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
  got = jax.jit(MobileNetV2().apply)(load_variables(npz_path),
                                     jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  for name, k in PREFIXES.items():
    with torch.no_grad():
      ref = torch_model.features[:k](x).permute(0, 2, 3, 1).numpy()
    err = np.max(np.abs(np.asarray(got[name]) - ref)) / np.max(np.abs(ref))
    assert err <= 1e-4, f"{name}: max relative error {err:.2e}"


def _assert_same_weights(npz_path, torch_model):
  """The file holds the torch model's weights, as the converter maps them (the forward
  check above shows that mapping right once; this one is cheap)."""
  want = traverse_util.flatten_dict(CONVERTERS.get("mobilenet_v2")(torch_model.state_dict()))
  got = traverse_util.flatten_dict(load_variables(npz_path))
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg="/".join(key))


def _only_sentence(message: str) -> None:
  assert message.endswith(".") and ". " not in message, message


def test_download_converts_and_caches_then_works_offline(served, cache, checkpoint):
  data, _, model = checkpoint
  url = f"{served.url}/{served.name}"
  path = resolve_init_from(url)
  assert path == str(cache / f"{served.name[:-4]}.mobilenet_v2.npz")
  assert (cache / served.name).read_bytes() == data
  assert sorted(os.listdir(cache)) == sorted([served.name, os.path.basename(path)])
  assert served.requests == [f"/{served.name}"]
  assert os.stat(path).st_mode & 0o777 == os.stat(cache / served.name).st_mode & 0o777 == 0o644
  _assert_mobilenet_features(path, model)

  served.stop()
  mtime = os.stat(path).st_mtime_ns
  assert resolve_init_from(url) == path  # from the cache, no server
  assert os.stat(path).st_mtime_ns == mtime
  os.remove(path)  # the download is still there: converted again, offline
  assert resolve_init_from(url) == path
  _assert_same_weights(path, model)
  assert served.requests == [f"/{served.name}"]


def test_converted_npz_by_url_is_used_as_it_is(served, cache, checkpoint, tmp_path):
  _, _, model = checkpoint
  save_variables(CONVERTERS.get("mobilenet_v2")(model.state_dict()), str(tmp_path / "c.npz"))
  data = (tmp_path / "c.npz").read_bytes()
  digest = hashlib.sha256(data).hexdigest()
  (served.folder / f"converted-{digest[:10]}.npz").write_bytes(data)
  path = resolve_init_from(f"{served.url}/converted-{digest[:10]}.npz")
  assert path == str(cache / f"converted-{digest[:10]}.npz")
  assert os.listdir(cache) == [f"converted-{digest[:10]}.npz"]
  _assert_same_weights(path, model)


def test_wrong_checksum_stops_and_leaves_no_file(served, cache, checkpoint):
  data, digest, _ = checkpoint
  wrong = ("0" if digest[0] != "0" else "1") + digest[1:8]
  name = f"mobilenet_v2-{wrong}.pth"
  (served.folder / name).write_bytes(data)
  url = f"{served.url}/{name}"
  with pytest.raises(PretrainedWeightsError) as error:
    resolve_init_from(url)
  message = str(error.value)
  assert url in message and str(cache / name) in message and digest in message
  _only_sentence(message)
  assert os.listdir(cache) == []  # neither the file nor a temporary one

  # A full sha256 given with the URL is checked in full.
  good = f"{served.url}/{served.name}"
  with pytest.raises(PretrainedWeightsError, match="not " + digest[:63]):
    resolve_init_from(f"{good}#sha256={digest[:63]}{'0' if digest[63] != '0' else '1'}")
  assert os.listdir(cache) == []
  assert resolve_init_from(f"{good}#sha256={digest}").startswith(str(cache))


def test_unreachable_host_and_http_errors_stop_with_one_sentence(served, cache):
  with pytest.raises(PretrainedWeightsError) as error:
    resolve_init_from(f"{served.url}/mobilenet_v2-0123abcd.pth")  # not served: HTTP 404
  message = str(error.value)
  assert "HTTP 404" in message and str(cache / "mobilenet_v2-0123abcd.pth") in message
  _only_sentence(message)

  served.stop()
  url = f"{served.url}/{served.name}"
  with pytest.raises(PretrainedWeightsError) as error:
    resolve_init_from(url)
  message = str(error.value)
  assert message.startswith(f"Could not download {url} (")
  assert f"put it at {cache / served.name}, where it is used without network." in message
  _only_sentence(message)
  assert os.listdir(cache) == []


def test_cut_download_leaves_no_file(served, cache):
  url = f"{served.url}/cut/{served.name}"
  with pytest.raises(PretrainedWeightsError) as error:
    resolve_init_from(url)
  size = served.folder.joinpath(served.name).stat().st_size
  assert str(error.value) == (
      f"Download of {url} stopped after {size // 2} of {size} bytes; run again, or fetch it some "
      f"other way and put it at {cache / served.name}.")
  assert os.listdir(cache) == []


def test_file_placed_by_hand_is_used_offline(served, cache, checkpoint):
  data, _, model = checkpoint
  served.stop()
  url = f"{served.url}/{served.name}"
  with pytest.raises(PretrainedWeightsError, match="put it at (.*), where") as error:
    resolve_init_from(url)
  where = Path(str(error.value).split("put it at ")[1].split(", where")[0])
  corrupt = bytearray(data)
  corrupt[len(data) // 2] ^= 1
  where.write_bytes(bytes(corrupt))  # a corrupt copy is refused, by its checksum
  with pytest.raises(PretrainedWeightsError, match="replace it with the file from") as error:
    resolve_init_from(url)
  assert url in str(error.value) and str(where) in str(error.value)
  _only_sentence(str(error.value))
  where.write_bytes(data)
  path = resolve_init_from(url)
  _assert_same_weights(path, model)
  assert served.requests == []


def test_short_names_and_the_base_url_override(served, cache, checkpoint, monkeypatch):
  data, digest, model = checkpoint
  published = pretrained.PRETRAINED["mobilenet_v2"].url.rsplit("/", 1)[1]
  assert published == "mobilenet_v2-b0353104.pth"
  (served.folder / published).write_bytes(data)
  monkeypatch.setenv("SEGJAX_PRETRAINED_BASE_URL", served.url + "/")
  # The mirror's file is not the published one: the short name's checksum refuses it.
  with pytest.raises(PretrainedWeightsError, match=f"{served.url}/{published} downloaded"):
    resolve_init_from("mobilenet_v2")
  assert os.listdir(cache) == []

  monkeypatch.setitem(pretrained.PRETRAINED, "mobilenet_v2",
                      Pretrained(f"https://example.invalid/{served.name}", "mobilenet_v2",
                                 sha256=digest))
  path = resolve_init_from("mobilenet_v2")
  assert served.requests[-1] == f"/{served.name}"
  _assert_same_weights(path, model)
  with pytest.raises(ValueError, match="a short name takes no #options"):
    resolve_init_from("mobilenet_v2#arch=vgg16")


def test_published_names_carry_their_sha256_prefix():
  """Each short name's file name has the hash torch.hub checks, and its arch converts."""
  for name, entry in pretrained.PRETRAINED.items():
    file_name = entry.url.rsplit("/", 1)[1]
    assert len(pretrained._hash_in_name(file_name)) == 8, name
    assert entry.arch in CONVERTERS and entry.arch == name
    assert pretrained._arch({}, file_name, None, name) == entry.arch  # from the name, too


def test_file_url_and_resnet_forward_matches_torch(tmp_path, cache):
  """A file:// URL with its arch given; the converted ResNet-18 gives torchvision's features."""
  tv = import_torchvision()
  import torch
  torch.manual_seed(0)
  model = _randomize_batch_norms(tv.models.resnet18(weights=None), torch)
  source = tmp_path / "my weights.pth"
  torch.save({"state_dict": model.state_dict()}, source)  # wrapped, as mmcv saves
  url = source.as_uri() + "#arch=resnet18"
  path = resolve_init_from(url)
  assert path == str(cache / "my weights.resnet18.npz")
  x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
  expected = _torch_features(model, x, torch)
  got = jax.jit(ResNet(depth=18).apply)(load_variables(path),
                                        jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  for name in STAGES:
    err = np.max(np.abs(np.asarray(got[name]) - expected[name])) / np.max(np.abs(expected[name]))
    assert err <= 1e-4, f"{name}: max relative error {err:.2e}"
  source.unlink()
  assert resolve_init_from(url) == path  # cached; the source is no longer needed


def test_local_files(tmp_path, cache, checkpoint):
  data, digest, model = checkpoint
  converted = tmp_path / "converted.npz"
  save_variables({"params": {"w": np.ones(2, np.float32)}}, str(converted))
  assert resolve_init_from(str(converted)) == str(converted)  # already converted: as is
  home = os.path.expanduser("~")
  if str(converted).startswith(home + os.sep):
    assert resolve_init_from("~" + str(converted)[len(home):]) == str(converted)

  source = tmp_path / "encoder.pth"
  source.write_bytes(data)
  with pytest.raises(ValueError, match=r"no converter arch in its file name; append #arch="):
    resolve_init_from(str(source))
  path = resolve_init_from(str(source), arch="mobilenet_v2")  # e.g. the model's backbone
  assert path == str(cache.parent / "converted" / f"encoder-{digest[:16]}.mobilenet_v2.npz")
  _assert_same_weights(path, model)
  assert resolve_init_from(f"{source}#arch=mobilenet_v2") == path
  with pytest.raises(PretrainedWeightsError, match="not the 00000000 given"):
    resolve_init_from(f"{source}#arch=mobilenet_v2&sha256=00000000")
  data_parallel = tmp_path / "data_parallel.pth"  # keys 'module.features...', mmcv-wrapped
  torch = pytest.importorskip("torch")
  torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
             data_parallel)
  _assert_same_weights(resolve_init_from(f"{data_parallel}#arch=mobilenet_v2"), model)
  with pytest.raises(ValueError, match="State dict does not fit vgg16"):
    resolve_init_from(f"{source}#arch=vgg16")
  assert not list((cache.parent / "converted").glob("*vgg16*"))


def test_unwritable_cache_is_named(tmp_path, monkeypatch):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  monkeypatch.setenv("SEGJAX_CACHE", str(blocker / "cache"))
  with pytest.raises(PretrainedWeightsError,
                     match=f"Cannot create the cache folder {blocker}/cache/pretrained .*; set "
                           r"\$SEGJAX_CACHE to a writable folder."):
    resolve_init_from("http://127.0.0.1:9/mobilenet_v2-0123abcd.pth")


@pytest.mark.parametrize("value, message", [
    ("no_such_file.npz", "is no file, no http.s./file/gs URL and no short name .resnet50_v1c, "),
    ("w.pth#color=red", r"unknown options \['color'\]"),
    ("http://127.0.0.1:9/w.pth#arch=resnet7", "arch 'resnet7' is not one of"),
    ("http://127.0.0.1:9/w.pth#sha256=xyz", "sha256 must be 8 to 64 hex digits"),
    ("http://127.0.0.1:9/", "names no file"),
])
def test_bad_values(value, message, cache):
  with pytest.raises(ValueError, match=message):
    resolve_init_from(value)


def test_train_py_offline_stops_naming_the_url_and_path_before_reading_data(tmp_path):
  """The design card's command, with no network: one sentence naming the URL of the
  recipe's ImageNet encoder and where to put the file, before any dataset is touched."""
  assert pspnet_ade20k.get_config().model.init_from == "resnet50_v1c"
  with socket.socket() as s:  # a port nothing listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=repo, SEGJAX_CACHE=str(tmp_path / "cache"),
             SEGJAX_PRETRAINED_BASE_URL=f"http://127.0.0.1:{port}",
             TFDS_DATA_DIR=str(tmp_path / "tfds"))
  run = subprocess.run([sys.executable, os.path.join(repo, "train.py"),
                        "--config=configs/pspnet_ade20k.py", f"--workdir={tmp_path / 'run'}"],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 1
  errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
  url = f"http://127.0.0.1:{port}/resnet50_v1c-2cccc1ad.pth"
  path = tmp_path / "cache" / "pretrained" / "resnet50_v1c-2cccc1ad.pth"
  assert f"Could not download {url}" in errors[0] and f"put it at {path}" in errors[0]
  assert not (tmp_path / "tfds").exists() and not path.exists()


def test_the_recipe_starts_from_the_served_imagenet_encoder(tmp_path, cache):
  """PSPNet-ADE20K's train state as the trainer creates it, with the recipe's encoder
  (mmseg's ResNet-50-V1c layout, random weights here) served from a local URL: the
  backbone holds exactly the converted weights."""
  from tests import mmseg_reference
  mmseg_reference.import_mmseg()
  import torch
  from mmseg.models.backbones import ResNetV1c
  from segjax.data.sources import dataset_classes
  from segjax.tasks import get_task
  from segjax.training import optimizers, sharding
  from segjax.training.train_state import create_train_state
  torch.manual_seed(0)
  encoder = ResNetV1c(depth=50)
  _randomize_batch_norms(encoder, torch)  # (mmseg's ResNet.train returns None)
  buffer = io.BytesIO()
  torch.save(encoder.state_dict(), buffer)
  data = buffer.getvalue()
  folder = tmp_path / "www"
  folder.mkdir()
  name = f"resnet50_v1c-{hashlib.sha256(data).hexdigest()[:8]}.pth"
  (folder / name).write_bytes(data)
  server = _Server(folder)
  try:
    config = pspnet_ade20k.get_config()
    task = get_task(config)
    model = task.build_model(config, dataset_classes("ade20k"))
    tx, _ = optimizers.create_optimizer(config.optimizer, 10)
    mesh = sharding.create_mesh((("data", -1),))
    state, _ = create_train_state(model, tx, jax.random.key(0), (1, 64, 64, 3), mesh, (),
                                  init_from=f"{server.url}/{name}")
  finally:
    server.stop()
  assert server.requests == [f"/{name}"]
  expected = load_variables(str(cache / f"resnet50_v1c-{name.split('-')[1][:8]}.resnet50_v1c.npz"))
  got = {"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]}
  flat_got = traverse_util.flatten_dict(jax.device_get(got))
  flat_expected = traverse_util.flatten_dict(expected)
  assert set(flat_got) == set(flat_expected)
  for key, value in flat_expected.items():
    np.testing.assert_array_equal(np.asarray(flat_got[key]), value)
  torch_stem = encoder.stem[0].weight.detach().numpy().transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(np.asarray(state.params["backbone"]["stem_conv1"]["kernel"]),
                                torch_stem)
  assert {"ppm", "bottleneck", "classifier", "aux_head"} <= set(state.params)  # initialized
