"""Tests of segjax.inference and the eval.py / predict.py commands."""
