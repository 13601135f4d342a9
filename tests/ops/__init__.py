"""Tests of segjax.ops (and the RoIAlign test reference)."""
