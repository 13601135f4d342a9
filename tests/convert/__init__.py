"""Tests of segjax.convert."""
