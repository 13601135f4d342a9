"""Image encoders for segmentation models, built by name.

Each entry of `BACKBONES` is a constructor `(**kwargs) -> nn.Module`; keyword
arguments (output_stride, multi_grid, dtype, ...) pass through to the module.
"""
from segjax.backbones.resnet import ResNet
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

__all__ = ["BACKBONES", "ResNet"]
