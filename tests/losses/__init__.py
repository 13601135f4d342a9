"""Tests of segjax.losses."""
