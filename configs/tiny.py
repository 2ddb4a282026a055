"""tiny: the embedded default. Offline, CPU-only, a few minutes on 2 cores.

Text: Debian's python3.11-doc reStructuredText sources (real English prose, installed by the README
set-up command). Same recipe as d20, scaled down: 4 layers of 256, 4096-token vocabulary.
"""
from nanochat_jax.config import base_config


def get_config():
    c = base_config()
    c.run_name, c.base_dir = "tiny", "runs/tiny"
    c.model.depth = 4
    c.model.head_dim = 64  # d_model 256 -> 4 heads
    c.model.sequence_len = 256
    c.tokenizer.vocab_size = 4096
    c.tokenizer.max_chars = 50_000_000  # the whole corpus (~11 MB)
    c.data.source = "embedded"
    c.data.tokenizer_threads = 2
    c.train.device_batch_size = 16
    c.train.total_batch_size = 16 * 256
    c.train.num_iterations = 400
    c.train.eval_every = 100
    c.train.eval_tokens = 32 * 256 * 8
    c.train.sample_every = 200
    c.train.save_every = 100
    c.train.muon_momentum_warmup_steps = 100
    return c
