"""Panoptic FPN (Kirillov et al., 2019): Mask R-CNN plus a semantic FPN head on the same FPN.

The instance branch is `MaskRCNN`; `SemanticFPNHead` turns P2-P5 into stride-4 semantic
logits, upsampled 4x to the image for the loss (cross-entropy, ignore 255) and for fusion.
With `fusion="heuristic"` (detectron2) the semantic head predicts the stuff classes plus one
"things" class (index 0; the data op `panoptic_semantic` makes that target); with
`fusion="parameter_free"` (UPSNet) it predicts every dataset class, so each detection can add
the semantic logit of its own class inside its box.
"""
from typing import Dict, Mapping, Sequence

import jax
import jax.numpy as jnp

from segjax.losses.cross_entropy import cross_entropy
from segjax.models.mask_rcnn import MaskRCNN
from segjax.models.registry import MODELS
from segjax.models.semantic_fpn import SemanticFPNHead, upsample_logits

FUSIONS = ("heuristic", "parameter_free")


@MODELS.register("panoptic_fpn")
class PanopticFPN(MaskRCNN):
  """Mask R-CNN + semantic FPN head; `losses` adds "semantic", `__call__` adds "semantic"
  (stride-4 logits) and "mask_logits" (RoI mask logits of each detection's class).

  `thing_classes` / `stuff_classes` are the dataset's class ids (the panoptic task fills them in
  from the dataset); `num_classes` counts the things.
  """
  thing_classes: Sequence[int] = ()
  stuff_classes: Sequence[int] = ()
  fusion: str = "heuristic"
  semantic_channels: int = 128
  semantic_norm: str = "GN"
  ignore_index: int = 255

  task = "panoptic"

  def setup(self):
    super().setup()
    if self.fusion not in FUSIONS:
      raise ValueError(f"Unknown fusion {self.fusion!r}; use one of {FUSIONS}.")
    if len(self.thing_classes) != self.num_classes or not self.stuff_classes:
      raise ValueError(f"PanopticFPN needs its dataset's thing_classes ({self.num_classes}) "
                       f"and stuff_classes, got {tuple(self.thing_classes)} and "
                       f"{tuple(self.stuff_classes)}.")
    if not self.mask:
      raise ValueError("PanopticFPN needs the mask branch (mask=True).")
    self.semantic_head = SemanticFPNHead(self.semantic_classes, self.semantic_channels,
                                         norm=self.semantic_norm, dtype=self.dtype,
                                         param_dtype=self.param_dtype)

  @property
  def semantic_classes(self) -> int:
    """Channels of the semantic logits: stuff + "things" (heuristic) or every class."""
    if self.fusion == "heuristic":
      return len(self.stuff_classes) + 1
    return len(self.thing_classes) + len(self.stuff_classes)

  def __call__(self, images, train: bool = False, image_sizes=None) -> Dict[str, jax.Array]:
    features, objectness, deltas, anchors = self._features(images, train)
    out = self._detect(features, objectness, deltas, anchors, images, image_sizes)
    out["semantic"] = self.semantic_head(features)
    return out

  def losses(self, images, targets: Mapping[str, jax.Array], rng: jax.Array,
             train: bool = True) -> Dict[str, jax.Array]:
    """Mask R-CNN's losses plus "semantic": cross-entropy of the upsampled semantic logits
    against `targets["label"]` [B, H, W] (ignore_index ignored)."""
    if "label" not in targets:
      raise ValueError("Panoptic FPN training needs the semantic `label` map in the batch.")
    features, objectness, deltas, anchors = self._features(images, train)
    out = self._detector_losses(features, objectness, deltas, anchors, images, targets, rng)
    labels = targets["label"].astype(jnp.int32)
    logits = upsample_logits(self.semantic_head(features), labels.shape[1:3])
    out["semantic"] = cross_entropy(logits, labels, self.ignore_index)
    return out
