"""Image encoders for segmentation models, built by name.

Each entry of `BACKBONES` is a constructor `(**kwargs) -> nn.Module`; keyword
arguments (output_stride, multi_grid, dtype, ...) pass through to the module.
"""
from segjax.backbones.mobilenet_v2 import MobileNetV2
from segjax.backbones.resnet import ResNet
from segjax.backbones.vgg import VGG16
from segjax.registry import Registry

BACKBONES: Registry = Registry("backbone")


def _register_resnet(name: str, depth: int, stem: str = "torchvision") -> None:
  def build(**kwargs) -> ResNet:
    return ResNet(depth=depth, stem=stem, **kwargs)
  BACKBONES.register(name)(build)


for _depth in (18, 34, 50, 101):
  _register_resnet(f"resnet{_depth}", _depth)
for _depth in (50, 101):
  _register_resnet(f"resnet{_depth}_v1c", _depth, stem="v1c")
BACKBONES.register("vgg16")(lambda **kwargs: VGG16(batch_norm=False, **kwargs))
BACKBONES.register("vgg16_bn")(lambda **kwargs: VGG16(batch_norm=True, **kwargs))


@BACKBONES.register("mobilenet_v2")
def _build_mobilenet_v2(width: int = 64, **kwargs) -> MobileNetV2:
  """MobileNetV2 from the models' ResNet-style `width` (64 = full network):
  width_mult = width / 64, so every backbone is full-size at the default."""
  return MobileNetV2(width_mult=width / 64, **kwargs)


__all__ = ["BACKBONES", "MobileNetV2", "ResNet", "VGG16"]
