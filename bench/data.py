"""Tokens/s of the training data pipeline (read parquet -> tokenize in threads -> BOS-pack -> batches).

    .venv/bin/python bench/data.py [--source embedded] [--threads 2] [--vocab 4096] [--batch 32] [--seq 2048]

Runs on the embedded corpus (or FineWeb shards with --source fineweb --data-dir DIR), with the project's
Tokenizer trained on the corpus' training shards at --vocab. Prints one line of JSON with the figure.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from nanochat_jax import data
from nanochat_jax.config import base_config
from nanochat_jax.tokenizer import Tokenizer


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
    tok = Tokenizer.train(data.iter_texts(train_files, max_chars=50_000_000), args.vocab)
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
                      "vocab": args.vocab, "tokenizer_train_s": round(train_s, 1),
                      "source": args.source, "bad_input": data.bad_input_counts()}))


if __name__ == "__main__":
    main()
