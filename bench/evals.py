"""Eval speed on one GPU: CORE (22 tasks' shapes, synthetic rows) and the GSM8K test (1,319 generations).

    python bench/evals.py                 # d20 random init, bf16: CORE at 500 per task, GSM8K 1,319 x <= 512 tokens
    python bench/evals.py --tiny          # a CPU smoke run (depth 2, small vocab, few rows)

The eval bundle cannot be downloaded on the GPU machines, so CORE runs on synthetic rows with each real
task's type, few-shot count, choice count, size (capped at 500, as the reference's in-training CORE) and
realistic lengths (tokens per field, +-30% uniformly), through the same code as the eval
(core.evaluate: few-shot sampling, prompts, bucketed batches on the mesh, scoring). Words are tokens
(a stand-in tokenizer: word i is id i), so the lengths are token counts. The GSM8K part generates
greedily with the calculator on (Engine.generate_batch, on device, chunks of --gen-batch prompts) from
1,319 prompts of 60-300 tokens (mean ~140, as GSM8K's questions in the chat format). A random model
almost never samples a stop token, so every row generates all --max-new tokens: the worst case of the
real eval. Times are wall clock including compiles; --repeat 2 runs CORE again warm.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from evals import core, likelihood
from nanochat_jax import model as model_lib
from nanochat_jax import sharding
from nanochat_jax.config import base_config
from nanochat_jax.engine import Engine
from nanochat_jax.tokenizer import SPECIAL_TOKENS

# label: (type, shots, choices, rows (500 or the task's size), query/context tokens, choice/option tokens,
#         continuation tokens) -- lengths from the DCLM bundle's data as the model's tokenizer sees it, rounded
CORE_SHAPES = {
    "hellaswag_zeroshot": ("multiple_choice", 0, 4, 500, 60, 25, 0),
    "jeopardy": ("language_modeling", 10, 1, 500, 30, 0, 4),
    "bigbench_qa_wikidata": ("language_modeling", 10, 1, 500, 12, 0, 3),
    "arc_easy": ("multiple_choice", 10, 4, 500, 30, 5, 0),
    "arc_challenge": ("multiple_choice", 10, 4, 500, 35, 7, 0),
    "copa": ("multiple_choice", 0, 2, 100, 12, 8, 0),
    "commonsense_qa": ("multiple_choice", 10, 5, 500, 20, 3, 0),
    "piqa": ("multiple_choice", 10, 2, 500, 15, 25, 0),
    "openbook_qa": ("multiple_choice", 0, 4, 500, 15, 5, 0),
    "lambada_openai": ("language_modeling", 0, 1, 500, 80, 0, 2),
    "hellaswag": ("multiple_choice", 10, 4, 500, 60, 25, 0),
    "winograd": ("schema", 0, 2, 273, 0, 15, 8),
    "winogrande": ("schema", 0, 2, 500, 0, 20, 8),
    "bigbench_dyck_languages": ("language_modeling", 10, 1, 500, 40, 0, 6),
    "agi_eval_lsat_ar": ("multiple_choice", 3, 5, 230, 250, 20, 0),
    "bigbench_cs_algorithms": ("language_modeling", 10, 1, 500, 60, 0, 2),
    "bigbench_operators": ("language_modeling", 10, 1, 210, 20, 0, 2),
    "bigbench_repeat_copy_logic": ("language_modeling", 10, 1, 32, 40, 0, 20),
    "squad": ("language_modeling", 10, 1, 500, 180, 0, 4),
    "coqa": ("language_modeling", 0, 1, 500, 350, 0, 3),
    "boolq": ("multiple_choice", 10, 2, 500, 140, 1, 0),
    "bigbench_language_identification": ("multiple_choice", 10, 11, 500, 60, 3, 0),
}
RANDOM_BASELINE = {"multiple_choice": 25.0, "schema": 50.0, "language_modeling": 0.0}


class WordTokenizer:
    """Words are their ids ("w123" -> 123); the special tokens are the vocabulary's last ids."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.specials = {name: vocab_size - len(SPECIAL_TOKENS) + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.bos_id = self.specials["<|bos|>"]

    def encode_special(self, name):
        return self.specials[name]

    def encode(self, text, prepend_bos=False, num_threads=None):
        if not isinstance(text, str):
            return [self.encode(t, prepend_bos) for t in text]
        return [self.bos_id] * prepend_bos + [int(w[1:]) for w in text.split()]

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids if i < self.bos_id)


def synthetic_tasks(vocab: int, per_task: int, seed: int = 0, only: str | None = None, cap: bool = True) -> list[dict]:
    """Tasks of CORE_SHAPES with min(per_task, the task's size) rows (per_task rows when not cap)."""
    rng = random.Random(seed)
    n_words = vocab - len(SPECIAL_TOKENS)
    text = lambda n: " ".join(f"w{rng.randrange(n_words)}" for _ in range(max(1, round(n * rng.uniform(0.7, 1.3)))))
    tasks = []
    for label, (kind, shots, choices, rows, q, c, cont) in CORE_SHAPES.items():
        if only and label != only:
            continue
        rows = min(rows, per_task) if cap else per_task
        if kind == "multiple_choice":
            items = [dict(query=text(q), choices=[text(c) for _ in range(choices)], gold=rng.randrange(choices))
                     for _ in range(rows)]
        elif kind == "schema":
            items = [dict(context_options=[text(c) for _ in range(choices)], continuation=text(cont),
                          gold=rng.randrange(choices)) for _ in range(rows)]
        else:
            items = [dict(context=text(q), continuation=text(cont)) for _ in range(rows)]
        tasks.append(dict(label=label, type=kind, num_fewshot=shots, delimiter=" ",
                          random_baseline=RANDOM_BASELINE[kind], items=items))
    return tasks


def _memory() -> str:
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_in_use" not in stats:
        return "-"
    return f"{stats['bytes_in_use'] / 2**30:.2f} GiB in use, peak {stats.get('peak_bytes_in_use', 0) / 2**30:.2f} GiB"


def bench_core(params, cfg, tok, args):
    mesh = sharding.make_mesh(base_config().mesh)  # every device, data parallel
    forward = likelihood.Forward(params, cfg, mesh, args.batch_tokens, args.max_rows, pad_id=tok.bos_id,
                                 scan_layers=not args.unrolled)
    tasks = [t for t in synthetic_tasks(cfg.vocab_size, args.per_task) if not args.tasks or t["label"] in args.tasks]
    for rep in range(args.repeat):
        traces = likelihood.TRACES["score"]
        t0 = time.perf_counter()
        ev = {"results": {}}
        for task in tasks:  # core.evaluate's loop, with the device memory read after each task
            ev["results"][task["label"]] = dict(core.score_task(task, forward, tok), type=task["type"],
                                                num_fewshot=task["num_fewshot"], memory=_memory())
        wall = time.perf_counter() - t0
        print(f"\nCORE pass {rep + 1} ({'cold: includes compiles' if rep == 0 else 'warm'}): {wall:.1f} s for "
              f"{sum(r['examples'] for r in ev['results'].values()):,} examples, "
              f"{likelihood.TRACES['score'] - traces} compiles; memory after: {_memory()}")
        print(f"{'task':<34} {'type':<18} {'shots':>5} {'rows':>5} {'seqs':>6} {'tokens':>10} {'s':>7} {'ex/s':>8}  "
              "device memory after the task")
        by_type = collections.defaultdict(lambda: [0, 0.0, 0])
        for label, r in ev["results"].items():
            print(f"{label:<34} {r['type']:<18} {r['num_fewshot']:>5} {r['examples']:>5} {r['sequences']:>6} "
                  f"{r['tokens']:>10,} {r['seconds']:>7.2f} {r['examples'] / r['seconds']:>8.1f}  {r['memory']}")
            t = by_type[r["type"]]
            t[0], t[1], t[2] = t[0] + r["examples"], t[1] + r["seconds"], t[2] + r["tokens"]
        for kind, (n, s, tokens) in by_type.items():
            print(f"  {kind:<18} {n:>6,} examples {s:7.1f} s  {n / s:8.1f} examples/s  {tokens / s:12,.0f} tokens/s")


def bench_full_task(params, cfg, tok, args):
    """The reference's users see HellaSwag slow down and leak memory over the whole task: ours over its
    10,042 rows (10-shot), timed and measured in four quarters."""
    forward = likelihood.Forward(params, cfg, sharding.make_mesh(base_config().mesh), args.batch_tokens,
                                 args.max_rows, pad_id=tok.bos_id, scan_layers=not args.unrolled)
    task = synthetic_tasks(cfg.vocab_size, 48 if args.tiny else 10042, seed=1, only="hellaswag", cap=False)[0]
    print(f"\nhellaswag, all {len(task['items']):,} rows in four quarters (each quarter's few-shot pool is itself):")
    quarter = len(task["items"]) // 4
    for q in range(4):
        part = dict(task, items=task["items"][q * quarter:(q + 1) * quarter])
        r = core.score_task(part, forward, tok)
        print(f"  quarter {q + 1}: {r['examples']:,} examples in {r['seconds']:.1f} s, "
              f"{r['examples'] / r['seconds']:.1f} examples/s; device memory: {_memory()}")


def bench_gsm8k(params, cfg, tok, args):
    engine = Engine(params, cfg, tok)
    rng = np.random.default_rng(0)
    n_words = cfg.vocab_size - len(SPECIAL_TOKENS)
    sp = tok.specials
    prompts = [[tok.bos_id, sp["<|user_start|>"], *rng.integers(0, n_words, n - 4).tolist(), sp["<|user_end|>"],
                sp["<|assistant_start|>"]] for n in np.clip(rng.normal(140, 40, args.problems), 60, 300).astype(int)]
    for batch in args.gen_batch:
        t0 = time.perf_counter()
        rows, masks = engine.generate_batch(prompts, max_tokens=args.max_new, temperature=0.0, use_tools=True,
                                            batch_size=batch)
        wall = time.perf_counter() - t0
        n_tokens = sum(map(len, rows))
        full = sum(len(r) == args.max_new for r in rows)
        print(f"\nGSM8K-shaped generation, {len(prompts):,} prompts, batch {batch}: {wall:.1f} s (includes compiles), "
              f"{len(prompts) / wall:.1f} problems/s, {n_tokens / wall:,.0f} tokens/s; {n_tokens:,} tokens generated, "
              f"{full:,} rows ran to {args.max_new} tokens, {sum(m.count(0) for m in masks):,} forced tool tokens; "
              f"memory after: {_memory()}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: depth 2, vocab 1024, few rows and tokens")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--per-task", type=int, default=500)
    p.add_argument("--batch-tokens", type=int, default=65536)
    p.add_argument("--max-rows", type=int, default=256)
    p.add_argument("--repeat", type=int, default=1, help="CORE passes (the second one warm)")
    p.add_argument("--unrolled", action="store_true", help="CORE's forward with the layers unrolled (default: scanned)")
    p.add_argument("--problems", type=int, default=1319)
    p.add_argument("--max-new", type=int, default=512)
    p.add_argument("--gen-batch", default="128", help="comma-separated prompts per generation batch")
    p.add_argument("--skip", default="", help="any of core, full (HellaSwag's 10,042 rows), gsm8k")
    p.add_argument("--tasks", default="", help="comma-separated CORE tasks (default: all 22)")
    p.add_argument("--compile-cache", default=None, help="JAX's persistent compilation cache in DIR (as the pipeline "
                   "keeps one per run): a second run of the same command loads the programs instead of compiling")
    args = p.parse_args(argv)
    if args.tiny:
        args.depth, args.vocab, args.dtype, args.per_task, args.problems, args.max_new = 2, 1024, "float32", 12, 12, 16
        args.batch_tokens, args.max_rows, args.gen_batch = 4096, 64, "8"
    unknown = set(filter(None, args.tasks.split(","))) - set(CORE_SHAPES)
    if unknown:
        p.error(f"unknown CORE task(s) {sorted(unknown)}")
    args.tasks = set(filter(None, args.tasks.split(",")))
    args.gen_batch = [int(b) for b in args.gen_batch.split(",")]
    if args.compile_cache:
        from nanochat_jax.checkpoint import use_compile_cache
        print(f"compilation cache: {use_compile_cache(args.compile_cache)}")
    cfg = model_lib.ModelConfig.from_depth(args.depth, vocab_size=args.vocab, sequence_len=2048,
                                           compute_dtype="auto" if args.dtype == "bfloat16" else "float32",
                                           attention="auto" if args.dtype == "bfloat16" else "xla")
    params = model_lib.init_params(cfg, jax.random.key(0))
    # the zero-initialised LM head would make every logit equal; a random one makes argmax meaningful
    params["lm_head"]["kernel"] = 0.02 * jax.random.normal(jax.random.key(1), params["lm_head"]["kernel"].shape)
    print(f"d{cfg.depth} random init, {cfg.compute_dtype}, attention {cfg.attention}, kernels {cfg.kernels}, "
          f"vocab {cfg.vocab_size}; {jax.device_count()} x {jax.devices()[0].device_kind}")
    tok = WordTokenizer(cfg.vocab_size)
    if "core" not in args.skip:
        bench_core(params, cfg, tok, args)
    if "full" not in args.skip:
        bench_full_task(params, cfg, tok, args)
    if "gsm8k" not in args.skip:
        bench_gsm8k(params, cfg, tok, args)


if __name__ == "__main__":
    main()
