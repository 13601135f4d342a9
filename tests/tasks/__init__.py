"""Tests of segjax.tasks and the package shape they give."""
