"""d26: ~1.08B parameters, the card's 'GPT-2 capability' run; device batch 16 to fit 80 GB."""
from nanochat_jax.config import base_config


def get_config():
    c = base_config()
    c.run_name, c.base_dir = "d26", "runs/d26"
    c.model.depth = 26
    c.train.device_batch_size = 16
    return c
