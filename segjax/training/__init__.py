"""Training: optimizers, sharding, the stateless steps, checkpoints and the loop."""
