"""Tokens/s of the training data pipeline (read parquet -> tokenize in threads -> BOS-pack -> batches).

    .venv/bin/python bench/data.py [--source embedded] [--threads 2] [--vocab 4096] [--batch 32] [--seq 2048]

Runs on the embedded corpus (or an existing FineWeb dir with --source fineweb --data-dir DIR). Uses the
project's Tokenizer (nanochat_jax.tokenizer) trained on the corpus when that module exists, otherwise an
equivalent tiktoken Encoding built from PyPI rustbpe's ranks (same SPEC §5 regex, same inference engine).
Prints one line of JSON with the figure.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from nanochat_jax import data
from nanochat_jax.config import base_config

SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")


class _TiktokenBPE:
    """Fallback: rustbpe-trained ranks served by tiktoken, with <|bos|> as the one special token."""

    def __init__(self, texts, vocab_size):
        import rustbpe
        import tiktoken
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), vocab_size - 1, pattern=SPLIT_PATTERN)
        ranks = {bytes(k): v for k, v in trainer.get_mergeable_ranks()}
        self.bos_id = len(ranks)
        self.enc = tiktoken.Encoding("bench", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                                     special_tokens={"<|bos|>": self.bos_id})

    def encode(self, texts, prepend_bos=False, num_threads=None):
        ids = self.enc.encode_ordinary_batch(texts, num_threads=num_threads or 1)
        return [[self.bos_id] + x for x in ids] if prepend_bos else ids


def _tokenizer(train_files, vocab_size):
    texts = list(data.iter_texts(train_files))
    try:
        from nanochat_jax.tokenizer import Tokenizer
    except ImportError:
        return _TiktokenBPE(texts, vocab_size), "tiktoken Encoding of rustbpe (PyPI) ranks"
    return Tokenizer.train(texts, vocab_size), "nanochat_jax.tokenizer.Tokenizer"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="embedded", choices=["embedded", "fineweb"])
    ap.add_argument("--data-dir", default=base_config().data.dir)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--seconds", type=float, default=20.0, help="measure for about this long")
    args = ap.parse_args()
    c = base_config()
    c.data.source, c.data.dir = args.source, args.data_dir
    files = data.ensure_corpus(c)
    train_files, _ = data.split_files(files)
    t0 = time.time()
    tok, tok_name = _tokenizer(train_files, args.vocab)
    train_s = time.time() - t0

    it = data.make_train_iterator(train_files, tok, args.batch, args.seq, num_threads=args.threads)
    next(it)  # warm-up: thread pool start and the first row groups
    n_tokens, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        batch = next(it)
        n_tokens += batch.size
    elapsed = time.perf_counter() - t0
    assert batch.dtype == np.int32
    print(json.dumps({"tokens_per_s": round(n_tokens / elapsed), "tokens": n_tokens, "seconds": round(elapsed, 2),
                      "threads": args.threads, "cpus": os.cpu_count(), "batch": [args.batch, args.seq + 1],
                      "tokenizer": tok_name, "vocab": args.vocab, "tokenizer_train_s": round(train_s, 1),
                      "source": args.source, "bad_input": data.bad_input_counts()}))


if __name__ == "__main__":
    main()
