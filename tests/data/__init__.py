"""Tests of segjax.data: datasets, preprocessing ops, the input pipeline."""
