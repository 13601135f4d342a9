"""Tests of segjax.metrics."""
