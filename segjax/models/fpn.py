"""Feature Pyramid Network (Lin et al., 2017) in torchvision's layout, NHWC.

`FPN` follows torchvision's `FeaturePyramidNetwork` with `LastLevelMaxPool`:
1x1 lateral convs ("inner blocks", with bias) bring every input level to
`channels`; top-down, the coarser merged map is upsampled by nearest-neighbour
interpolation to the exact size of the finer one (PyTorch's
`F.interpolate(size=..., mode="nearest")`, so odd sizes work) and added; a 3x3
conv ("layer block", padding 1, with bias) smooths every merged map; P6 is P5
subsampled by a 1x1 max pool of stride 2.

`ResNetFPN` is the Mask R-CNN / Faster R-CNN backbone (torchvision's
`resnet_fpn_backbone`): a ResNet from `BACKBONES` at output stride 32 whose
stages 1-4 (C2-C5) feed an `FPN`, returning {"p2", ..., "p6"} at strides 4-64.
"""
from typing import Any, Dict, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax.layers import Conv
from segjax.backbones import BACKBONES, ResNet
from segjax.models.registry import check_images

STAGES = ("stage1", "stage2", "stage3", "stage4")
# torchvision's FPN conv init: kaiming_uniform_(a=1), i.e. U(+-sqrt(3 / fan_in)); bias 0.
_fpn_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source rows of PyTorch's nearest resize from `in_size` to `out_size`:
  floor(i * in / out) computed in float32, as its CPU and CUDA kernels do."""
  scale = np.float32(in_size) / np.float32(out_size)
  idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int32)
  return np.minimum(idx, in_size - 1)


def resize_nearest(x, size: Tuple[int, int]):
  """NHWC nearest-neighbour resize to `size` (height, width), like
  `F.interpolate(x, size=size, mode="nearest")`; a static gather."""
  rows = nearest_indices(x.shape[1], size[0])
  cols = nearest_indices(x.shape[2], size[1])
  return jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)


class FPN(nn.Module):
  """Top-down feature pyramid over `in_features` (finest first) of a feature dict.

  Input level i becomes output "p{i + first_level}"; the extra level after the
  last one is the stride-2 subsampling of the coarsest output (LastLevelMaxPool).
  With ResNet's stage1..4 and `first_level=2` this gives {"p2", ..., "p6"}.
  """
  channels: int = 256
  in_features: Sequence[str] = STAGES
  first_level: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Mapping[str, Any]) -> Dict[str, Any]:
    missing = [k for k in self.in_features if k not in features]
    if missing:
      raise ValueError(f"FPN needs features {list(self.in_features)}; {missing} are not among "
                       f"the inputs {sorted(features)}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_fpn_init)
    levels = len(self.in_features)
    merged = [None] * levels
    top_down = None
    for i in reversed(range(levels)):
      x = Conv(self.channels, (1, 1), name=f"inner_{i}", **kw)(features[self.in_features[i]])
      if top_down is not None:
        x = x + resize_nearest(top_down, x.shape[1:3])
      merged[i] = top_down = x
    out = {}
    for i, x in enumerate(merged):
      out[f"p{i + self.first_level}"] = Conv(
          self.channels, (3, 3), padding=((1, 1), (1, 1)), name=f"layer_{i}", **kw)(x)
    # F.max_pool2d(x, kernel_size=1, stride=2): every other row and column from the first.
    out[f"p{levels + self.first_level}"] = out[f"p{levels + self.first_level - 1}"][:, ::2, ::2]
    return out


def frozen_backbone_modules(trainable_layers: int) -> Tuple[str, ...]:
  """Name prefixes of the ResNet modules frozen for torchvision's
  `trainable_layers` (0-5): stages 5 - t .. 4 train, the stem only at t = 5."""
  if not 0 <= trainable_layers <= 5:
    raise ValueError(f"trainable_layers must be 0-5 (trainable ResNet stages counted from the "
                     f"last; 5 also trains the stem), got {trainable_layers}.")
  frozen = [f"stage{s}_" for s in range(1, 5 - trainable_layers)]
  return tuple(frozen if trainable_layers == 5 else ["stem_"] + frozen)


class ResNetFPN(nn.Module):
  """A ResNet with an FPN neck, torchvision's `resnet_fpn_backbone`.

  `frozen_bn=True` makes every backbone BatchNorm use its running statistics,
  also in training, as torchvision's FrozenBatchNorm2d does (Mask R-CNN trains
  with batches too small for batch statistics); `False` gives ordinary BN.

  `trainable_layers` (torchvision's `trainable_backbone_layers`, default 3)
  freezes the stem and the first 4 - t stages (all of the stem and stages at 0;
  none at 5). Frozen parts get zero gradients: their parameters pass through
  `jax.lax.stop_gradient` as the backbone reads them (the ResNet computes all
  stages in one module, so its intermediate outputs cannot be cut). A frozen
  part's BatchNorm still updates its statistics when `frozen_bn=False` and
  `train=True`, as torch's `requires_grad=False` does not stop that either.
  Optimizers with weight decay should skip frozen parameters:
  `frozen_params_mask` marks them, for `optax.masked` or `optax.multi_transform`.

  Returns {"p2": stride 4, ..., "p6": stride 64}, each with `channels` channels.
  Backbone and FPN compute in `dtype`.
  """
  backbone: str = "resnet50"
  channels: int = 256
  frozen_bn: bool = True
  trainable_layers: int = 3
  backbone_width: int = 64  # ResNet base width; smaller for scaled-down variants
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    frozen_backbone_modules(self.trainable_layers)  # validates
    super().__post_init__()

  def resnet_arch(self) -> Tuple[int, str]:
    """(depth, stem) of the ResNet named by `backbone`."""
    model = BACKBONES.get(self.backbone)(parent=None)  # unbound: only its fields are read
    if not isinstance(model, ResNet):
      raise ValueError(f"ResNetFPN needs a ResNet backbone, got {self.backbone!r} "
                       f"({type(model).__name__}); use e.g. 'resnet50'.")
    return model.depth, model.stem

  @nn.compact
  def __call__(self, images, train: bool = False) -> Dict[str, Any]:
    check_images(images, "ResNetFPN")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    depth, stem = self.resnet_arch()
    frozen = frozen_backbone_modules(self.trainable_layers)

    def stop_frozen(variables):  # {"params": {module name: ...}}
      return {col: {k: jax.tree.map(jax.lax.stop_gradient, v) if k.startswith(frozen) else v
                    for k, v in tree.items()}
              for col, tree in variables.items()}

    body_cls = nn.map_variables(ResNet, "params", trans_in_fn=stop_frozen,
                                init=self.is_initializing())
    body = body_cls(depth=depth, stem=stem, width=self.backbone_width, name="backbone", **kw)
    features = body(images.astype(self.dtype), train and not self.frozen_bn)
    return FPN(self.channels, name="fpn", **kw)(features)

  def frozen_params_mask(self, params: Mapping[str, Any]) -> Any:
    """A pytree like `params` (this module's "params"), True on the frozen ones."""
    frozen = frozen_backbone_modules(self.trainable_layers)

    def mark(tree, value: bool):
      return jax.tree.map(lambda _: value, tree)

    return {top: {k: mark(v, top == "backbone" and k.startswith(frozen)) for k, v in sub.items()}
            for top, sub in params.items()}
