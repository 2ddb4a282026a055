"""Decode speed of the engine: random-init model, a fixed prompt, a fixed number of new tokens.

    python bench/decode.py                          # d20, bf16, 128-token prompt, 256 new tokens, top-k 50
    python bench/decode.py --depth 2 --vocab 4096   # a CPU smoke run

Rows: the on-device driver (`Engine.generate_batch`, one lax.while_loop) for each --samples count
(num_samples rows sharing one prefill), and the streaming driver (`Engine.generate`, one jitted step
per token, as the chat front ends use it) for one sample. Each time covers the whole call: prefill +
all decode steps + fetching the tokens. tok/s = rows * new tokens / median time; ms/step = median
time / new tokens; compile s = first call minus the median. No token stops a row (the stand-in
tokenizer's special ids lie outside the vocabulary), so every row produces exactly --new-tokens tokens.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from nanochat_jax import model as model_lib
from nanochat_jax.engine import Engine


class _NoStopTokenizer:
    """What the engine asks of a tokenizer, with special ids that can never be sampled."""

    SPECIALS = ("<|bos|>", "<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>",
                "<|output_end|>")

    def __init__(self, vocab_size: int):
        self.bos_id = vocab_size

    def encode_special(self, name: str) -> int:
        return self.bos_id + self.SPECIALS.index(name)


def _timed(fn, repeats: int) -> tuple[float, list[float]]:
    """(first call's seconds, the following calls' seconds)."""
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times[0], times[1:]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--samples", default="1,32", help="comma-separated num_samples for the on-device driver")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", default=None, help="trace one more call of each driver into DIR/<driver>")
    args = p.parse_args(argv)

    cfg = model_lib.ModelConfig.from_depth(args.depth, vocab_size=args.vocab, sequence_len=2048,
                                           compute_dtype=args.dtype, attention="xla")
    engine = Engine(model_lib.init_params(cfg, jax.random.key(0)), cfg, _NoStopTokenizer(args.vocab))
    prompt = np.random.default_rng(0).integers(0, args.vocab, args.prompt_len).tolist()
    kw = dict(max_tokens=args.new_tokens, temperature=1.0, top_k=args.top_k)

    def on_device(n):
        rows, _ = engine.generate_batch(prompt, num_samples=n, **kw)
        assert len(rows) == n and all(len(r) == args.new_tokens for r in rows)

    def streamed():
        steps = sum(1 for _ in engine.generate(prompt, num_samples=1, use_tools=False, **kw))
        assert steps == args.new_tokens

    cases = [(f"on-device x{n}", n, lambda n=n: on_device(n)) for n in map(int, args.samples.split(","))]
    cases.append(("streaming x1", 1, streamed))
    print(f"d{cfg.depth} {args.dtype} on {jax.devices()[0].device_kind}: prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, top-k {args.top_k}, median of {args.repeats}")
    print(f"{'driver':<16}{'tok/s':>10}{'ms/step':>10}{'compile s':>11}")
    results = []
    for name, n, fn in cases:
        first, times = _timed(fn, args.repeats)
        if args.profile:
            with jax.profiler.trace(f"{args.profile}/{name.replace(' ', '_')}", create_perfetto_trace=True):
                fn()
        median = statistics.median(times)
        row = dict(driver=name, samples=n, tok_per_s=n * args.new_tokens / median,
                   ms_per_step=1e3 * median / args.new_tokens, compile_s=first - median)
        results.append(row)
        print(f"{name:<16}{row['tok_per_s']:>10,.0f}{row['ms_per_step']:>10.2f}{row['compile_s']:>11.1f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
