"""Tests of segjax.layers."""
