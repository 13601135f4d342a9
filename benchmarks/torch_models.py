"""Plain-PyTorch twins of segjax's PSPNet, DeepLabV3+ and FCN-8s, for train-step speed
comparisons that are apples to apples.

torchvision has none of these three, so they are written here, layer for layer as
segjax builds them (NCHW, `nn.BatchNorm2d` with momentum 0.1 = flax's 0.9 and eps
1e-5, bilinear resizing with align_corners=False, the same dropout rates). Every
torch parameter and buffer is named like segjax's variable path ('/' -> '.'; conv
`kernel` -> `weight`, BatchNorm `scale` -> `weight`, batch_stats `mean` / `var` ->
`running_mean` / `running_var`), so the two have the same tensors with the same
shapes, and `load_segjax_variables` copies a segjax model's variables in.

  build(name, num_classes, **options) -> nn.Module   # options: segjax's, same defaults
  model(x)  # x: float NCHW -> {"out": logits at x's size, "aux": in training with an aux head}
  loss(outputs, labels, aux_weight=0.4)              # segjax's train-step loss

Models, with segjax's defaults (`build_model(name, num_classes, {})`):

* `pspnet`: ResNet-50 v1c (deep stem) at output stride 8 (stage 3 and 4 dilated 2
  and 4, first block of each at the previous dilation), pyramid pooling (bins 1, 2,
  3, 6 -> 512 channels each), 3x3 conv-BN-ReLU to 512, dropout 0.1, 1x1 classifier;
  in training an aux FCN head on stage 3 (3x3 conv-BN-ReLU to 256, dropout 0.1, 1x1).
* `deeplabv3plus`: ResNet-50 (7x7 stem) at output stride 16 (stage 4 dilated 2, its
  first block at 1), ASPP (1x1, 3x3 at rates 6, 12, 18, image pooling; 256 channels,
  1x1 projection, dropout 0.1), decoder (stage 1 -> 1x1 conv-BN-ReLU to 48, concat
  with the upsampled ASPP, two depthwise-separable 3x3 conv-BN-ReLUs to 256), 1x1
  classifier; no aux head unless `aux_channels` > 0 (the VOC / Cityscapes configs use
  backbone="resnet50_v1c", output_stride=8, aux_channels=256).
* `fcn8s`: VGG-16 (no BatchNorm) with the paper's conv1_1 padding of 100 and
  ceil-mode pools, fc6 (7x7, unpadded) and fc7 (1x1) to 4096 with ReLU and dropout
  0.5, 1x1 scores on fc7, pool4 and pool3, learned bias-free transposed-conv
  upsampling 2x, 2x, 8x with the paper's crops (5, 9, 31); no aux head.

Differences from segjax that change no shapes and no cost: initial values are
PyTorch's defaults (copy segjax's with `load_segjax_variables`); BatchNorm's
running variance is updated with the unbiased batch variance (flax: biased); and
training-mode BatchNorm of a 1x1 map (ASPP's image pooling) needs a batch of 2 or
more, where segjax accepts 1.
"""
import inspect
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NAMES = ("fcn8s", "pspnet", "deeplabv3plus")
IGNORE_INDEX = 255

# backbone name -> (blocks per stage, stem), the Bottleneck ResNets segjax registers.
_RESNETS = {"resnet50": ((3, 4, 6, 3), "torchvision"), "resnet101": ((3, 4, 23, 3), "torchvision"),
            "resnet50_v1c": ((3, 4, 6, 3), "v1c"), "resnet101_v1c": ((3, 4, 23, 3), "v1c")}
# output stride -> how many of the last stages trade their stride for dilation.
_DILATED_STAGES = {32: 0, 16: 1, 8: 2}
_STAGE_WIDTHS = (64, 128, 256, 512)
_VGG_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
_PAPER_PAD = 100
_SKIP_CROPS = {"pool4": 5, "pool3": 9}  # FCN paper-mode crop offsets (segjax.models.fcn)
_FCN8S_OUTPUT_CROP = 31


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
  """Bilinear resize to `size` (height, width) with align_corners=False, as segjax."""
  if tuple(x.shape[-2:]) == tuple(size):
    return x
  return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1,
          groups: int = 1, bias: bool = False) -> nn.Conv2d:
  """A conv padded by `dilation * (kernel // 2)` on every side, as segjax's."""
  return nn.Conv2d(cin, cout, kernel, stride, dilation * (kernel // 2), dilation, groups,
                   bias=bias)


class ConvBNAct(nn.Module):
  """segjax's `ConvBNAct`: bias-free conv (`conv`), BatchNorm (`bn`), ReLU."""

  def __init__(self, cin: int, cout: int, kernel: int, dilation: int = 1, groups: int = 1):
    super().__init__()
    self.conv = _conv(cin, cout, kernel, dilation=dilation, groups=groups)
    self.bn = nn.BatchNorm2d(cout)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided, dilated), 1x1 expand to 4x `width`, plus the shortcut
  (a strided 1x1 conv-BN where the shape changes), as segjax's ResNet v1.5 block."""

  def __init__(self, cin: int, width: int, stride: int, dilation: int):
    super().__init__()
    cout = 4 * width
    self.conv1, self.bn1 = _conv(cin, width, 1), nn.BatchNorm2d(width)
    self.conv2, self.bn2 = _conv(width, width, 3, stride, dilation), nn.BatchNorm2d(width)
    self.conv3, self.bn3 = _conv(width, cout, 1), nn.BatchNorm2d(cout)
    self.projects = stride != 1 or cin != cout
    if self.projects:
      self.downsample_conv = _conv(cin, cout, 1, stride)
      self.downsample_bn = nn.BatchNorm2d(cout)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    shortcut = self.downsample_bn(self.downsample_conv(x)) if self.projects else x
    return F.relu(y + shortcut)


class ResNet(nn.Module):
  """segjax's Bottleneck `ResNet` encoder: returns {"stage1": stride 4, ..., "stage4":
  `output_stride`}. Dilated stages keep stride 1; with `contract_dilation` the first
  block of such a stage uses the previous stage's dilation (torchvision's
  `replace_stride_with_dilation`)."""

  def __init__(self, backbone: str, output_stride: int, contract_dilation: bool, width: int):
    super().__init__()
    if backbone not in _RESNETS:
      raise ValueError(f"Unsupported backbone {backbone!r} for the PyTorch twin; use one of "
                       f"{sorted(_RESNETS)}.")
    if output_stride not in _DILATED_STAGES:
      raise ValueError(f"Unknown output_stride {output_stride}; use one of "
                       f"{sorted(_DILATED_STAGES)}.")
    blocks_per_stage, stem = _RESNETS[backbone]
    stem_convs = ([(3, width, 7, 2)] if stem == "torchvision" else
                  [(3, width // 2, 3, 2), (width // 2, width // 2, 3, 1),
                   (width // 2, width, 3, 1)])
    for i, (cin, cout, kernel, stride) in enumerate(stem_convs, start=1):
      self.add_module(f"stem_conv{i}", _conv(cin, cout, kernel, stride))
      self.add_module(f"stem_bn{i}", nn.BatchNorm2d(cout))
    self.stem_layers = len(stem_convs)
    first_dilated = len(_STAGE_WIDTHS) - _DILATED_STAGES[output_stride]
    self.stage_blocks = []
    self.channels = {}
    channels, dilation = width, 1
    for s, (base, blocks) in enumerate(zip(_STAGE_WIDTHS, blocks_per_stage)):
      stage_width = base * width // 64
      stride = 1 if s == 0 else 2
      previous = dilation
      if s >= first_dilated:
        dilation, stride = dilation * stride, 1
      rates = [previous if contract_dilation else dilation] + [dilation] * (blocks - 1)
      names = []
      for b, rate in enumerate(rates):
        names.append(f"stage{s + 1}_block{b}")
        self.add_module(names[-1], Bottleneck(channels, stage_width, stride if b == 0 else 1,
                                              rate))
        channels = 4 * stage_width
      self.stage_blocks.append(names)
      self.channels[f"stage{s + 1}"] = channels

  def forward(self, x) -> Dict[str, torch.Tensor]:
    for i in range(1, self.stem_layers + 1):
      x = F.relu(getattr(self, f"stem_bn{i}")(getattr(self, f"stem_conv{i}")(x)))
    x = F.max_pool2d(x, 3, 2, 1)
    features = {}
    for s, names in enumerate(self.stage_blocks, start=1):
      for name in names:
        x = getattr(self, name)(x)
      features[f"stage{s}"] = x
    return features


class FCNHead(nn.Module):
  """segjax's `FCNHead` (the aux head): 3x3 conv-BN-ReLU (`conv0`), dropout, 1x1
  classifier with bias."""

  def __init__(self, cin: int, num_classes: int, channels: int, dropout: float):
    super().__init__()
    self.conv0 = ConvBNAct(cin, channels, 3)
    self.dropout = nn.Dropout(dropout)
    self.classifier = nn.Conv2d(channels, num_classes, 1)

  def forward(self, x):
    return self.classifier(self.dropout(self.conv0(x)))


class PyramidPoolingModule(nn.Module):
  """PSPNet's PPM: per bin count, adaptive average pooling, 1x1 conv-BN-ReLU, bilinear
  upsampling; returns the input concatenated with every branch."""

  def __init__(self, cin: int, bins: Sequence[int], channels: int):
    super().__init__()
    self.bins = tuple(bins)
    for i in range(len(self.bins)):
      self.add_module(f"branch{i}", ConvBNAct(cin, channels, 1))

  def forward(self, x):
    outs = [x]
    for i, bins in enumerate(self.bins):
      y = getattr(self, f"branch{i}")(F.adaptive_avg_pool2d(x, bins))
      outs.append(_resize(y, x.shape[-2:]))
    return torch.cat(outs, dim=1)


class ASPP(nn.Module):
  """torchvision-layout ASPP as segjax's: 1x1 branch, a 3x3 branch per rate, image
  pooling, concatenated, 1x1 conv-BN-ReLU projection, dropout."""

  def __init__(self, cin: int, rates: Sequence[int], channels: int, dropout: float):
    super().__init__()
    self.branch0 = ConvBNAct(cin, channels, 1)
    self.num_rates = len(rates)
    for k, rate in enumerate(rates, start=1):
      self.add_module(f"branch{k}", ConvBNAct(cin, channels, 3, dilation=rate))
    self.pool_branch = ConvBNAct(cin, channels, 1)
    self.project = ConvBNAct((len(rates) + 2) * channels, channels, 1)
    self.dropout = nn.Dropout(dropout)

  def forward(self, x):
    branches = [getattr(self, f"branch{k}")(x) for k in range(self.num_rates + 1)]
    pooled = self.pool_branch(F.adaptive_avg_pool2d(x, 1))
    branches.append(_resize(pooled, x.shape[-2:]))
    return self.dropout(self.project(torch.cat(branches, dim=1)))


class SeparableConvBNAct(nn.Module):
  """Depthwise 3x3 conv-BN-ReLU then pointwise 1x1 conv-BN-ReLU (DeepLabV3+ decoder)."""

  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.depthwise = ConvBNAct(cin, cin, 3, groups=cin)
    self.pointwise = ConvBNAct(cin, cout, 1)

  def forward(self, x):
    return self.pointwise(self.depthwise(x))


def _with_aux(out, features, input_size, aux_head: Optional[FCNHead], training: bool):
  """{"out": logits at the input size} plus "aux" from stage 3 in training (segjax's
  `outputs_at_input_size`)."""
  outputs = {"out": _resize(out, input_size)}
  if training and aux_head is not None:
    outputs["aux"] = _resize(aux_head(features["stage3"]), input_size)
  return outputs


class PSPNet(nn.Module):
  """segjax's `PSPNet` (mmseg pspnet_r50-d8); options and defaults as segjax's."""

  def __init__(self, num_classes: int, backbone: str = "resnet50_v1c", output_stride: int = 8,
               contract_dilation: bool = True, backbone_width: int = 64,
               pool_bins: Sequence[int] = (1, 2, 3, 6), head_channels: int = 512,
               dropout: float = 0.1, aux_channels: int = 256):
    super().__init__()
    self.backbone = ResNet(backbone, output_stride, contract_dilation, backbone_width)
    cin = self.backbone.channels["stage4"]
    self.ppm = PyramidPoolingModule(cin, pool_bins, head_channels)
    self.bottleneck = ConvBNAct(cin + len(pool_bins) * head_channels, head_channels, 3)
    self.dropout = nn.Dropout(dropout)
    self.classifier = nn.Conv2d(head_channels, num_classes, 1)
    self.aux_head = (FCNHead(self.backbone.channels["stage3"], num_classes, aux_channels,
                             dropout) if aux_channels else None)

  def forward(self, x):
    features = self.backbone(x)
    y = self.dropout(self.bottleneck(self.ppm(features["stage4"])))
    return _with_aux(self.classifier(y), features, x.shape[-2:], self.aux_head, self.training)


class DeepLabV3Plus(nn.Module):
  """segjax's `DeepLabV3Plus`; options and defaults as segjax's."""

  def __init__(self, num_classes: int, backbone: str = "resnet50", output_stride: int = 16,
               backbone_width: int = 64, aspp_rates: Optional[Sequence[int]] = None,
               channels: int = 256, low_level_channels: int = 48, aux_channels: int = 0):
    super().__init__()
    self.backbone = ResNet(backbone, output_stride, True, backbone_width)
    rates = aspp_rates or tuple(r * 16 // output_stride for r in (6, 12, 18))
    self.aspp = ASPP(self.backbone.channels["stage4"], rates, channels, dropout=0.1)
    self.low_level_project = ConvBNAct(self.backbone.channels["stage1"], low_level_channels, 1)
    self.decoder_conv0 = SeparableConvBNAct(channels + low_level_channels, channels)
    self.decoder_conv1 = SeparableConvBNAct(channels, channels)
    self.classifier = nn.Conv2d(channels, num_classes, 1)
    self.aux_head = (FCNHead(self.backbone.channels["stage3"], num_classes, aux_channels, 0.1)
                     if aux_channels else None)

  def forward(self, x):
    features = self.backbone(x)
    y = self.aspp(features["stage4"])
    low = self.low_level_project(features["stage1"])
    y = torch.cat([_resize(y, low.shape[-2:]), low], dim=1)
    y = self.decoder_conv1(self.decoder_conv0(y))
    return _with_aux(self.classifier(y), features, x.shape[-2:], self.aux_head, self.training)


class VGG16(nn.Module):
  """segjax's `VGG16` encoder: convs `conv{b}_{i}` with bias (and `bn{b}_{i}` for
  vgg16_bn), ReLU, a 2x2/2 max pool per block; returns {"pool1".."pool5"}."""

  def __init__(self, batch_norm: bool, width: int, pad_first: int, ceil_mode: bool):
    super().__init__()
    self.layers = []
    self.ceil_mode = ceil_mode
    cin = 3
    for b, channels in enumerate(_VGG_BLOCKS, start=1):
      names = []
      for i, c in enumerate(channels, start=1):
        cout = c * width // 64
        pad = pad_first if (b, i) == (1, 1) and pad_first else 1
        self.add_module(f"conv{b}_{i}", nn.Conv2d(cin, cout, 3, padding=pad))
        if batch_norm:
          self.add_module(f"bn{b}_{i}", nn.BatchNorm2d(cout))
        names.append(f"{b}_{i}")
        cin = cout
      self.layers.append(names)
    self.batch_norm = batch_norm
    self.channels = {f"pool{b}": channels[-1] * width // 64
                     for b, channels in enumerate(_VGG_BLOCKS, start=1)}

  def forward(self, x) -> Dict[str, torch.Tensor]:
    features = {}
    for b, names in enumerate(self.layers, start=1):
      for name in names:
        x = getattr(self, f"conv{name}")(x)
        if self.batch_norm:
          x = getattr(self, f"bn{name}")(x)
        x = F.relu(x)
      x = features[f"pool{b}"] = F.max_pool2d(x, 2, 2, ceil_mode=self.ceil_mode)
    return features


class FCN8s(nn.Module):
  """segjax's `FCN8s` on VGG-16, paper mode (`pad_first=100`) or "same" mode (0)."""

  def __init__(self, num_classes: int, backbone: str = "vgg16", width: int = 64,
               fc_width: int = 4096, pad_first: int = _PAPER_PAD):
    super().__init__()
    if backbone not in ("vgg16", "vgg16_bn"):
      raise ValueError(f"FCN-8s needs backbone 'vgg16' or 'vgg16_bn', got {backbone!r}.")
    if pad_first not in (0, _PAPER_PAD):
      raise ValueError(f"FCN-8s needs pad_first 0 ('same' mode) or {_PAPER_PAD} (the "
                       f"paper's), got {pad_first}.")
    self.paper = pad_first == _PAPER_PAD
    self.backbone = VGG16(backbone == "vgg16_bn", width, pad_first, ceil_mode=self.paper)
    channels = self.backbone.channels
    self.fc6 = nn.Conv2d(channels["pool5"], fc_width, 7, padding=0 if self.paper else 3)
    self.fc7 = nn.Conv2d(fc_width, fc_width, 1)
    self.dropout = nn.Dropout(0.5)
    self.score_fr = nn.Conv2d(fc_width, num_classes, 1)
    self.score_pool4 = nn.Conv2d(channels["pool4"], num_classes, 1)
    self.score_pool3 = nn.Conv2d(channels["pool3"], num_classes, 1)
    up = lambda factor: nn.ConvTranspose2d(
        num_classes, num_classes, 2 * factor, factor,
        padding=0 if self.paper else factor // 2, bias=False)
    self.upscore2, self.upscore_pool4, self.upscore8 = up(2), up(2), up(8)

  def forward(self, x):
    h, w = x.shape[-2:]
    if not self.paper:
      x = F.pad(x, (0, -w % 32, 0, -h % 32))
    features = self.backbone(x)
    y = self.dropout(F.relu(self.fc6(features["pool5"])))
    y = self.score_fr(self.dropout(F.relu(self.fc7(y))))
    for up, pool in ((self.upscore2, "pool4"), (self.upscore_pool4, "pool3")):
      y = up(y)
      skip = getattr(self, f"score_{pool}")(features[pool])
      if self.paper:
        offset = _SKIP_CROPS[pool]
        skip = skip[:, :, offset:offset + y.shape[2], offset:offset + y.shape[3]]
      y = y + skip
    offset = _FCN8S_OUTPUT_CROP if self.paper else 0
    return {"out": self.upscore8(y)[:, :, offset:offset + h, offset:offset + w]}


_MODELS = {"fcn8s": FCN8s, "pspnet": PSPNet, "deeplabv3plus": DeepLabV3Plus}


def build(name: str, num_classes: int, **options) -> nn.Module:
  """The PyTorch twin of `segjax.models.build_model(name, num_classes, options)`.

  `options` are segjax's model options of the same name (defaults as segjax's);
  ResNet backbones are resnet50 / resnet101 with either stem, VGG ones vgg16(_bn).
  """
  if name not in _MODELS:
    raise ValueError(f"No PyTorch twin of model {name!r}; use one of {list(NAMES)}.")
  cls = _MODELS[name]
  known = set(inspect.signature(cls).parameters) - {"num_classes"}
  unknown = sorted(set(options) - known)
  if unknown:
    raise ValueError(f"Model {name!r} has no option(s) {unknown}; its options are "
                     f"{sorted(known)}.")
  return cls(num_classes, **options)


def _pixel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  """Mean cross-entropy over pixels whose label is not 255; 0 when all are ignored."""
  if labels.shape != logits.shape[:1] + logits.shape[2:]:
    raise ValueError(f"Labels of shape {tuple(labels.shape)} do not match logits of shape "
                     f"{tuple(logits.shape)}; labels must be (N, H, W) at the logits' size.")
  total = F.cross_entropy(logits.float(), labels.long(), ignore_index=IGNORE_INDEX,
                          reduction="sum")
  return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def loss(outputs: Mapping[str, torch.Tensor], labels: torch.Tensor,
         aux_weight: float = 0.4) -> torch.Tensor:
  """segjax's train-step loss with its default loss spec: pixel-mean cross-entropy of
  `out` (ignore index 255) plus `aux_weight` (config default 0.4) times that of `aux`
  when present."""
  total = _pixel_cross_entropy(outputs["out"], labels)
  if "aux" in outputs:
    total = total + aux_weight * _pixel_cross_entropy(outputs["aux"], labels)
  return total


def _flatten(tree: Mapping[str, Any], prefix: Tuple[str, ...] = ()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "scale"): "weight",
               ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
               ("batch_stats", "var"): "running_var"}


def load_segjax_variables(torch_model: nn.Module, name: str,
                          variables: Mapping[str, Any]) -> None:
  """Copies segjax variables {"params", "batch_stats"} of model `name` into its twin.

  Kernels go from HWIO to OIHW; transposed-conv kernels (flax's, not transposed) are
  flipped spatially into PyTorch's (in, out, kh, kw). Every segjax variable and every
  torch parameter and running statistic must meet its counterpart: initialise segjax
  in training mode (as its trainer does) so that an aux head has variables.
  """
  if name not in _MODELS or not isinstance(torch_model, _MODELS[name]):
    raise ValueError(f"load_segjax_variables: expected a {name!r} twin from build(), got "
                     f"{type(torch_model).__name__}.")
  modules = dict(torch_model.named_modules())
  targets = {k: v for k, v in torch_model.state_dict(keep_vars=True).items()
             if not k.endswith("num_batches_tracked")}
  copied = set()
  for path, value in _flatten({k: variables[k] for k in ("params", "batch_stats")
                               if k in variables}):
    leaf = _LEAF_NAMES.get((path[0], path[-1]))
    key = ".".join(path[1:-1] + (leaf,)) if leaf else "/".join(path)
    if key not in targets:
      raise ValueError(f"segjax variable {'/'.join(path)} has no PyTorch counterpart {key!r}; "
                       f"was the twin built with the same options?")
    array = np.asarray(value, np.float32)
    module = modules[".".join(path[1:-1])]
    if path[-1] == "kernel":
      array = (array[::-1, ::-1].transpose(2, 3, 0, 1)
               if isinstance(module, nn.ConvTranspose2d) else array.transpose(3, 2, 0, 1))
    target = targets[key]
    if tuple(target.shape) != array.shape:
      raise ValueError(f"segjax variable {'/'.join(path)} has shape {array.shape} (converted), "
                       f"but PyTorch's {key} has {tuple(target.shape)}.")
    with torch.no_grad():
      target.copy_(torch.from_numpy(np.ascontiguousarray(array)))
    copied.add(key)
  missing = sorted(set(targets) - copied)
  if missing:
    raise ValueError(f"No segjax variable for PyTorch's {missing[:5]} ({len(missing)} in all); "
                     "initialise segjax with train=True and the same options.")
