"""`model.init_from` values -> a converted .npz: short names and URLs are downloaded,
checksum-verified and converted once, into a cache.

`resolve_init_from(value)` returns the path of an .npz in the format of
`segjax.convert.save_variables` (what `load_pretrained` reads). `value` is one of:

  * a short name of a standard ImageNet-1k encoder of the mmseg / torchvision recipes:

      name           converter arch  file (IMAGENET1K_V1 for torchvision)
      resnet50_v1c   resnet50_v1c    https://download.openmmlab.com/pretrain/third_party/
                                       resnet50_v1c-2cccc1ad.pth  (mmcv's open-mmlab://)
      resnet101_v1c  resnet101_v1c   .../third_party/resnet101_v1c-e67eebb6.pth
      resnet18       resnet18        https://download.pytorch.org/models/resnet18-f37072fd.pth
      resnet34       resnet34        https://download.pytorch.org/models/resnet34-b627a593.pth
      resnet50       resnet50        https://download.pytorch.org/models/resnet50-0676ba61.pth
      resnet101      resnet101       https://download.pytorch.org/models/resnet101-63fe2227.pth
      vgg16          vgg16           https://download.pytorch.org/models/vgg16-397923af.pth
      vgg16_bn       vgg16_bn        https://download.pytorch.org/models/vgg16_bn-6c64b313.pth
      mobilenet_v2   mobilenet_v2    https://download.pytorch.org/models/mobilenet_v2-b0353104.pth

    With `$SEGJAX_PRETRAINED_BASE_URL` set (a mirror, or a folder as file:///...), a
    short name downloads `<base>/<file name>` instead; the checksum stays the same.
  * an http://, https://, file:// or gs:// URL of a PyTorch checkpoint (.pth/.pt,
    .safetensors; a state-dict .npz with #arch=) or of a converted .npz (downloaded, used
    as it is; a gs:// .npz is read where it is);
  * a local path: a converted .npz is returned as it is; a .pth/.pt/.safetensors is
    converted (into the cache, keyed by its sha256, so an edited file converts again).

The converter arch (a name of `segjax.convert.CONVERTERS`) of a URL or local checkpoint
is, in this order: `#arch=NAME` appended to the value; the file name without its hash
('resnet50_v1c-2cccc1ad.pth' -> resnet50_v1c) when that is an arch; the `arch`
argument (the trainer may pass the model's backbone). A URL's checksum is
`#sha256=HEX` (all 64 hex digits, or a prefix of at least 8) appended to the value,
else the hex digits of its file name after the last '-' (torch.hub's convention:
'name-<first 8+ hex digits of the sha256>.ext'); a URL with neither is not verified.
E.g. `https://host/weights.pth#arch=resnet50&sha256=0676ba61`. (No full sha256 is in
the table yet: the files could not be fetched where this was written; their names'
prefixes are checked.)

Downloads go to `$SEGJAX_CACHE/pretrained/<file name>` (default ~/.cache/segjax; a
gs:// cache works too), via a temporary file in the same folder that is renamed once
complete and verified (in a bucket: uploaded once complete), so a file under the final
name is always whole; the converted .npz is written beside it
the same way, as `<file stem>.<arch>.npz`, and later calls return it without network.
Converting needs no PyTorch (`read_state_dict` falls back on torch_pickle.py).
When a download is impossible (offline, unreachable host, HTTP error) or the
checksum differs, `PretrainedWeightsError` (a ValueError) says in one sentence which
URL to fetch and the exact path to put it at; a file put there by hand is used
without network once its checksum matches.
"""
import contextlib
import dataclasses
import hashlib
import http.client
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from absl import logging

from segjax import paths
from segjax.convert.common import CONVERTERS, read_state_dict, save_variables

CACHE_ENV = "SEGJAX_CACHE"
BASE_URL_ENV = "SEGJAX_PRETRAINED_BASE_URL"
DEFAULT_CACHE = "~/.cache/segjax"
_TIMEOUT_S = 60  # per connect / read, not for the whole file
_CHUNK = 1 << 20
_HASH_IN_NAME = re.compile(r"(.+)-([0-9a-f]{8,64})$")
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors", ".npz")


class PretrainedWeightsError(ValueError):
  """Pretrained weights could not be fetched or failed their checksum."""


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A published checkpoint: where it is, which converter reads it and, where known,
  its full sha256 (else the hash prefix in its file name is checked)."""
  url: str
  arch: str
  sha256: str = ""


_OPENMMLAB = "https://download.openmmlab.com/pretrain/third_party/"
_TORCHVISION = "https://download.pytorch.org/models/"
# URLs: mmcv's model zoo (mmcv/model_zoo/open_mmlab.json, the open-mmlab:// names that
# mmseg's ResNetV1c configs load) and torchvision's IMAGENET1K_V1 weights.
PRETRAINED: dict[str, Pretrained] = {
    "resnet50_v1c": Pretrained(_OPENMMLAB + "resnet50_v1c-2cccc1ad.pth", "resnet50_v1c"),
    "resnet101_v1c": Pretrained(_OPENMMLAB + "resnet101_v1c-e67eebb6.pth", "resnet101_v1c"),
    "resnet18": Pretrained(_TORCHVISION + "resnet18-f37072fd.pth", "resnet18"),
    "resnet34": Pretrained(_TORCHVISION + "resnet34-b627a593.pth", "resnet34"),
    "resnet50": Pretrained(_TORCHVISION + "resnet50-0676ba61.pth", "resnet50"),
    "resnet101": Pretrained(_TORCHVISION + "resnet101-63fe2227.pth", "resnet101"),
    "vgg16": Pretrained(_TORCHVISION + "vgg16-397923af.pth", "vgg16"),
    "vgg16_bn": Pretrained(_TORCHVISION + "vgg16_bn-6c64b313.pth", "vgg16_bn"),
    "mobilenet_v2": Pretrained(_TORCHVISION + "mobilenet_v2-b0353104.pth", "mobilenet_v2"),
}


def cache_dir() -> Any:
  """`$SEGJAX_CACHE` (a local folder or a gs:// URL), else ~/.cache/segjax, as an
  etils.epath.Path."""
  return paths.absolute(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def resolve_init_from(value: str, arch: str | None = None) -> str:
  """The path of a converted .npz for a `model.init_from` value (see the module
  docstring); downloads and converts only what the cache lacks.

  `arch` is the converter arch to fall back on when neither the value nor its file
  name gives one. Raises `PretrainedWeightsError` when a download fails or a checksum
  differs, and ValueError for a value that is no file, URL or short name.
  """
  location, options = _split_options(value)
  if location in PRETRAINED:
    if options:
      raise ValueError(f"model.init_from {value!r}: a short name takes no #options; give the "
                       "URL or a file to choose its arch or checksum.")
    entry = PRETRAINED[location]
    url = entry.url
    if os.environ.get(BASE_URL_ENV):
      url = os.environ[BASE_URL_ENV].rstrip("/") + "/" + url.rsplit("/", 1)[1]
    return _resolve_url(url, entry.arch, entry.sha256 or _hash_in_name(_url_file_name(url)))
  if location.startswith("gs://") and location.endswith(".npz") and "arch" not in options:
    if not paths.path(location).is_file():
      raise ValueError(f"model.init_from {value!r}: no such file in the bucket.")
    return location  # already converted; read where it is
  if urllib.parse.urlsplit(location).scheme in ("http", "https", "file", "gs"):
    name = _url_file_name(location)
    converted = name.endswith(".npz") and "arch" not in options
    return _resolve_url(location, None if converted else _arch(options, name, arch, value),
                        options.get("sha256") or _hash_in_name(name))
  location = os.path.expanduser(location)
  if os.path.isfile(location):
    if location.endswith(".npz") and "arch" not in options:
      return location  # already converted
    return _convert_local(location, _arch(options, os.path.basename(location), arch, value),
                          options.get("sha256", ""))
  raise ValueError(f"model.init_from {value!r} is no file, no http(s)/file/gs URL and no "
                   f"short name ({', '.join(PRETRAINED)}).")


def _split_options(value: str) -> tuple[str, dict[str, str]]:
  """'loc#arch=a&sha256=h' -> ('loc', {'arch': 'a', 'sha256': 'h'}); a '#' not followed
  by key=value pairs stays part of the location."""
  location, sep, fragment = value.rpartition("#")
  if not sep or "=" not in fragment:
    return value, {}
  options = dict(item.partition("=")[::2] for item in fragment.split("&"))
  unknown = sorted(set(options) - {"arch", "sha256"})
  if unknown:
    raise ValueError(f"model.init_from {value!r} has unknown options {unknown}; use "
                     "#arch=NAME and/or #sha256=HEX (joined by &).")
  if "arch" in options and options["arch"] not in CONVERTERS:
    raise ValueError(f"model.init_from {value!r}: arch {options['arch']!r} is not one of "
                     f"{', '.join(CONVERTERS.names())}.")
  if "sha256" in options:
    options["sha256"] = options["sha256"].lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", options["sha256"]):
      raise ValueError(f"model.init_from {value!r}: sha256 must be 8 to 64 hex digits.")
  return location, options


def _url_file_name(url: str) -> str:
  name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
  if not name or name in (".", ".."):
    raise ValueError(f"URL {url} names no file; give the URL of the checkpoint itself.")
  return name


def _stem(name: str) -> str:
  for suffix in _CHECKPOINT_SUFFIXES:
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return name


def _hash_in_name(name: str) -> str:
  """The sha256 prefix of a 'name-<hex>.ext' file name (torch.hub's convention), or ''."""
  m = _HASH_IN_NAME.fullmatch(_stem(name))
  return m[2] if m else ""


def _arch(options: dict[str, str], file_name: str, fallback: str | None, value: str) -> str:
  """The converter arch: #arch=, else the file name without its hash, else `fallback`."""
  if "arch" in options:
    return options["arch"]
  stem = _stem(file_name)
  m = _HASH_IN_NAME.fullmatch(stem)
  for candidate in (m[1] if m else None, stem, fallback):
    if candidate in CONVERTERS:
      return candidate
  raise ValueError(f"model.init_from {value!r}: no converter arch in its file name; append "
                   f"#arch=NAME, one of {', '.join(CONVERTERS.names())}.")


def _sha256(path) -> str:
  digest = hashlib.sha256()
  with paths.path(path).open("rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _resolve_url(url: str, arch: str | None, expected: str) -> str:
  """Downloads `url` (if not cached) and converts it with `arch` (None: it is converted)."""
  folder = cache_dir() / "pretrained"
  name = _url_file_name(url)
  path = folder / name
  converted = folder / f"{_stem(name)}.{arch}.npz" if arch else path
  if converted.exists():
    return str(converted)
  if path.exists():
    digest = _sha256(str(path))
    if expected and not digest.startswith(expected):
      raise PretrainedWeightsError(
          f"{path} has sha256 {digest}, not the {expected} of {url}; replace it with the file "
          f"from {url} (or delete it to download again).")
  else:
    _make_folder(folder)
    _download(url, path, expected)
  if arch:
    _save_converted(str(path), arch, converted)
  return str(converted)


def _make_folder(folder) -> None:
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except paths.storage_errors() as e:
    raise PretrainedWeightsError(
        f"Cannot create the cache folder {folder} ({getattr(e, 'strerror', '') or e}); set "
        f"${CACHE_ENV} to a writable folder.") from e


@contextlib.contextmanager
def _temporary_beside(path):
  """A local temporary file name that becomes `path` by `_commit(tmp, path)`: in `path`'s
  folder when that is local (then renamed), else in a local temporary folder (then
  uploaded whole); removed unless committed."""
  folder = str(path.parent) if not paths.is_url(path) else None
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".part")
  os.close(fd)
  try:
    yield tmp
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _commit(tmp: str, path) -> None:
  if paths.is_url(path):
    with open(tmp, "rb") as f:
      path.write_bytes(f.read())
    os.remove(tmp)
    return
  os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
  os.replace(tmp, str(path))


def _open_url(url: str):
  """A readable binary stream of `url` and its length (None when unknown)."""
  if url.startswith("gs://"):
    location = paths.path(url)
    return location.open("rb"), location.stat().length
  request = urllib.request.Request(url, headers={"User-Agent": "segjax"})
  response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
  return response, response.headers.get("Content-Length")


def _download(url: str, path, expected: str) -> None:
  """Downloads to a temporary file beside `path`, checks the sha256 and renames; any
  failure removes the temporary file and leaves nothing at `path`."""
  logging.info("Downloading %s to %s.", url, path)
  with _temporary_beside(path) as tmp:
    digest, size = hashlib.sha256(), 0
    with open(tmp, "wb") as out:
      try:
        response, length = _open_url(url)
        with response:
          for chunk in iter(lambda: response.read(_CHUNK), b""):
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
      except (*paths.storage_errors(), http.client.HTTPException) as e:
        raise PretrainedWeightsError(
            f"Could not download {url} ({_reason(e)}); fetch it some other way and put it at "
            f"{path}, where it is used without network.") from e
    if length is not None and size != int(length):
      raise PretrainedWeightsError(
          f"Download of {url} stopped after {size} of {length} bytes; run again, or fetch it "
          f"some other way and put it at {path}.")
    if expected and not digest.hexdigest().startswith(expected):
      raise PretrainedWeightsError(
          f"{url} downloaded with sha256 {digest.hexdigest()}, not {expected}; put the right "
          f"file (sha256 {expected}...) at {path}.")
    _commit(tmp, path)


def _reason(error: BaseException) -> str:
  if isinstance(error, urllib.error.HTTPError):
    return f"HTTP {error.code} {error.reason}"
  if isinstance(error, urllib.error.URLError):
    return str(error.reason)
  return str(error) or type(error).__name__


def _save_converted(source, arch: str, path) -> None:
  """Converts `source` and writes the .npz to a temporary file beside `path`, then
  renames it, so that `path` never holds a partial file."""
  with paths.local_copy(str(source)) as local:
    variables = CONVERTERS.get(arch)(read_state_dict(local))
  with _temporary_beside(path) as tmp:
    save_variables(variables, tmp)
    _commit(tmp, path)


def _convert_local(path: str, arch: str, expected: str) -> str:
  """Converts a local checkpoint into the cache, keyed by its content."""
  digest = _sha256(path)
  if expected and not digest.startswith(expected):
    raise PretrainedWeightsError(f"{path} has sha256 {digest}, not the {expected} given.")
  folder = cache_dir() / "converted"
  converted = folder / f"{_stem(paths.path(path).name)}-{digest[:16]}.{arch}.npz"
  if not converted.exists():
    _make_folder(folder)
    _save_converted(path, arch, converted)
  return str(converted)
