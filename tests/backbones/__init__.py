"""Tests of segjax.backbones."""
