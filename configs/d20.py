"""d20: the model card's 561M-parameter run (SPEC.md), 8 GPUs x device batch 32."""
from nanochat_jax.config import base_config


def get_config():
    return base_config()  # the schema's defaults are d20's numbers
