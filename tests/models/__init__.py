"""Tests of segjax.models."""
