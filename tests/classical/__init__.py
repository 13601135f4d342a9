"""Tests of segjax.classical and its command."""
