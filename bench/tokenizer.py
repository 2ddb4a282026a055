"""Tokenizer training benchmark: our Rust trainer against the PyPI package `rustbpe`.

Same text (the .rst.txt / .txt files under --input, every 20th file held out), same split pattern,
same number of merges (our vocab counts the 9 special tokens on top). Reports the median training wall
time over --repeats runs and held-out characters per token (both encoded by tiktoken).

    python bench/tokenizer.py                      # Python docs, vocab 16384 and 4096
    python bench/tokenizer.py --vocab 65536 --input DIR
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import rustbpe
import tiktoken

from nanochat_jax import _rustbpe
from nanochat_jax.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer


def _median_seconds(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _chars_per_token(enc: tiktoken.Encoding, texts: list[str]) -> float:
    return sum(map(len, texts)) / sum(map(len, enc.encode_ordinary_batch(texts)))


def bench(train: list[str], held_out: list[str], vocab_size: int, repeats: int) -> dict:
    n_ranks = vocab_size - len(SPECIAL_TOKENS)
    ours_s, (ranks, _) = _median_seconds(lambda: _rustbpe.train(iter(train), n_ranks), repeats)
    full_s, tok = _median_seconds(lambda: Tokenizer.train(train, vocab_size), repeats)

    def train_rustbpe():
        t = rustbpe.Tokenizer()
        t.train_from_iterator(iter(train), n_ranks, pattern=SPLIT_PATTERN)
        return t

    theirs_s, theirs = _median_seconds(train_rustbpe, repeats)
    their_ranks = {bytes(b): r for b, r in theirs.get_mergeable_ranks()}
    their_enc = tiktoken.Encoding("rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=their_ranks, special_tokens={})
    ours_cpt, theirs_cpt = _chars_per_token(tok.enc, held_out), _chars_per_token(their_enc, held_out)
    return dict(vocab_size=vocab_size, merges=n_ranks - 256, ours_train_s=ours_s, ours_tokenizer_train_s=full_s,
                rustbpe_train_s=theirs_s, speedup=theirs_s / ours_s, ours_chars_per_token=ours_cpt,
                rustbpe_chars_per_token=theirs_cpt, compression_diff=ours_cpt / theirs_cpt - 1,
                identical_merges={bytes(b): r for b, r in ranks} == their_ranks)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", default="/usr/share/doc/python3.11/html/_sources", type=pathlib.Path)
    p.add_argument("--vocab", type=int, nargs="+", default=[16384, 4096])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = p.parse_args(argv)
    files = sorted(f for f in args.input.rglob("*") if f.suffix in (".txt", ".rst") and f.is_file())
    if not files:
        print(f"error: no .txt/.rst files under {args.input} (the default needs: apt-get install python3.11-doc)",
              file=sys.stderr)
        return 2
    texts = [f.read_text(errors="replace") for f in files]
    train = [t for i, t in enumerate(texts) if i % 20]
    held_out = texts[::20]
    print(f"{len(train)} training documents ({sum(map(len, train)):,} chars), {len(held_out)} held out "
          f"({sum(map(len, held_out)):,} chars); {os.cpu_count()} cores; median of {args.repeats}")
    print("| vocab | ours (s) | ours + tiktoken setup (s) | rustbpe (s) | speed-up | chars/token ours | rustbpe "
          "| diff | same merges |\n|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    results = []
    for v in args.vocab:
        r = bench(train, held_out, v, args.repeats)
        results.append(r)
        print(f"| {v:,} | {r['ours_train_s']:.2f} | {r['ours_tokenizer_train_s']:.2f} | {r['rustbpe_train_s']:.2f} "
              f"| {r['speedup']:.1f}x | {r['ours_chars_per_token']:.3f} | {r['rustbpe_chars_per_token']:.3f} "
              f"| {r['compression_diff']:+.2%} | {r['identical_merges']} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
