"""nanochat in JAX/Flax."""
