"""d32: ~1.88B parameters; device batch 8 to fit 80 GB (gradient accumulation keeps 524,288 tokens)."""
from nanochat_jax.config import base_config


def get_config():
    c = base_config()
    c.run_name, c.base_dir = "d32", "runs/d32"
    c.data.num_shards = 800  # ~41 B tokens (~52M a shard) for the 37.6 B it trains on (20 x params), as the reference
    c.model.depth = 32
    c.train.device_batch_size = 8
    c.mid.device_batch_size = 8  # mid's section was copied from train's defaults (32) before this file ran
    return c
