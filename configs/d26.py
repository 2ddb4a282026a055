"""d26: ~1.08B parameters, the card's 'GPT-2 capability' run; device batch 16 to fit 80 GB."""
from nanochat_jax.config import base_config


def get_config():
    c = base_config()
    c.run_name, c.base_dir = "d26", "runs/d26"
    c.data.num_shards = 450  # ~23 B tokens (~52M a shard) for the 21.6 B it trains on (20 x params), as the reference
    c.model.depth = 26
    c.train.device_batch_size = 16
    c.mid.device_batch_size = 16  # mid's section was copied from train's defaults (32) before this file ran
    return c
