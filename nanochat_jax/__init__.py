"""nanochat in JAX/Flax."""


def __getattr__(name):
    # `from nanochat_jax import load_model` without importing jax for every `import nanochat_jax`.
    if name == "load_model":
        from nanochat_jax.engine import load_model
        return load_model
    raise AttributeError(f"module 'nanochat_jax' has no attribute {name!r}")
