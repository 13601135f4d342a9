"""Tests of segjax.training and train.py."""
