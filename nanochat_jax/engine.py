"""KV-cache inference: jitted prefill and decode steps, sampling, two drivers, tool use, load_model.

The jitted pieces (shapes static, everything else traced):
  - prefill: B prompts, right-padded to a length bucket, run once through `forward_cached` into a fresh
    cache; the logits at each prompt's last token are kept; rows and cache are then repeated
    `copies` times, so num_samples rows share one prefill.
  - step: sample one token per row from the current logits (or take the forced token of that row),
    feed it at the row's own position, return the next logits. The cache is donated, so it is
    updated in place.
Drivers over the same step function:
  - `Engine.generate_batch`: the whole generation in one `lax.while_loop` on device (no host round
    trip per token). Tool use is impossible there: the calculator is Python and needs the tokenizer,
    so `use_tools=True` falls back to the streaming driver.
  - `Engine.generate`: a Python generator calling the jitted step once per token; it yields each
    token column as it comes and runs the tool state machine (on <|python_end|> the text since
    <|python_start|> goes to tools.calculate and <|output_start|>result<|output_end|> is forced).
Both use the key `fold_in(key(seed), step)` at every step, so for one seed they sample the same tokens.

Few compiles: prompts are padded to a power of two (>= 64), the cache length is the needed length
rounded up to a multiple of 128 (the whole context when max_tokens is None, as in chat), a step
attends to the cache's first 128, 256, 512, ... slots only (`attend_len`: one compile per length a
conversation reaches), and temperature / max_tokens are traced. `TRACES` counts how often each
jitted function was traced, which is how often it was compiled.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import os
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nanochat_jax import model as model_lib
from nanochat_jax import paths
from nanochat_jax.tools import calculate

CACHE_BATCH_AXIS = 1  # model.init_cache layout: (L, B, 2, Hkv, S, head_dim)
MIN_PROMPT_BUCKET = 64
CACHE_LEN_MULTIPLE = 128
TRACES = collections.Counter()  # jitted function name -> number of traces (= compiles) in this process


# ----------------------------------------------------------------------------------------------
# Sampling


TOP_K_BLOCK = 1024


def _top_k(x_BxV, k: int):
    """lax.top_k (values sorted, largest first; indices), in two rounds over a large vocabulary: the k
    largest of each 1024-wide block, then the k largest of those candidates. Exact: the overall top k
    lie in the union of the blocks' top k. XLA sorts the whole 65,536-wide row for one lax.top_k
    (a radix sort, ~0.2 ms of a 2 ms d20 decode step at 32 rows); many 1024-wide rows sort on chip."""
    B, V = x_BxV.shape
    if V % TOP_K_BLOCK or k > TOP_K_BLOCK or V < 8 * TOP_K_BLOCK:
        return lax.top_k(x_BxV, k)
    n = V // TOP_K_BLOCK
    vals, idx = lax.top_k(x_BxV.reshape(B, n, TOP_K_BLOCK), k)
    idx = idx + (jnp.arange(n) * TOP_K_BLOCK)[:, None]
    vals, pick = lax.top_k(vals.reshape(B, n * k), k)
    return vals, jnp.take_along_axis(idx.reshape(B, n * k), pick, axis=-1)


def sample_tokens(logits_BxV, key, temperature, top_k: int | None = None, top_p: float | None = None):
    """One token per row. temperature <= 0: greedy. top_k / top_p (static) restrict the support to
    the k most likely tokens / the smallest set whose probability reaches p (both may be given)."""
    greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    scaled_BxV = logits_BxV / jnp.maximum(temperature, 1e-6)
    if top_k is None and top_p is None:
        sampled_B = jax.random.categorical(key, scaled_BxV, axis=-1).astype(jnp.int32)
    else:
        k = logits_BxV.shape[-1] if top_k is None else min(top_k, logits_BxV.shape[-1])
        vals_BxK, idx_BxK = _top_k(scaled_BxV, k)  # sorted, largest first
        if top_p is not None:
            probs_BxK = jax.nn.softmax(vals_BxK, axis=-1)
            mass_before_BxK = jnp.cumsum(probs_BxK, axis=-1) - probs_BxK
            vals_BxK = jnp.where(mass_before_BxK < top_p, vals_BxK, -jnp.inf)  # the top token always stays
        choice_B = jax.random.categorical(key, vals_BxK, axis=-1)
        sampled_B = jnp.take_along_axis(idx_BxK, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled_B, greedy_B)


# ----------------------------------------------------------------------------------------------
# The jitted steps


def attend_len(needed: int, max_len: int) -> int:
    """How many cache slots a step reads when its positions are < needed: the next of 128, 256, 512, ...
    (capped at max_len), so a step never reads the empty end of a long cache (a chat's cache is the
    whole context) and each length compiles once."""
    n = CACHE_LEN_MULTIPLE
    while n < needed:
        n *= 2
    return min(n, max_len)


def _attend_buckets(first_needed: int, max_len: int) -> list[int]:
    ends = [attend_len(first_needed, max_len)]
    while ends[-1] < max_len:
        ends.append(attend_len(ends[-1] + 1, max_len))
    return ends


def _prefill(params, cfg, tokens_BxT, lengths_B, max_len: int, copies: int):
    """-> (logits at each prompt's last token, cache, next write positions), each row repeated `copies` times."""
    B, T = tokens_BxT.shape
    cfg = dataclasses.replace(cfg, attend_len=attend_len(T, max_len))
    gpt = model_lib.GPT(cfg)
    cache = model_lib.init_cache(cfg, B, max_len)
    # hidden, then the head on the last real token only: (B, T, V) fp32 logits would be large.
    x_BxTxD, cache = gpt.apply({"params": params}, tokens_BxT, jnp.zeros(B, jnp.int32), cache,
                               method=model_lib.GPT.hidden)
    x_BxD = x_BxTxD[jnp.arange(B), lengths_B - 1]
    logits_BxV = gpt.apply({"params": params}, x_BxD, method=model_lib.GPT.head)
    if copies > 1:
        logits_BxV = jnp.repeat(logits_BxV, copies, axis=0)
        cache = jax.tree.map(lambda c: jnp.repeat(c, copies, axis=CACHE_BATCH_AXIS), cache)
    return logits_BxV, cache, jnp.repeat(lengths_B, copies)


def _step(params, cfg, top_k, top_p, logits_BxV, key, step, temperature, forced_B, positions_B, cache):
    """Sample (or force, where forced_B >= 0) one token per row, feed it -> (tokens, logits, positions, cache)."""
    tok_B = sample_tokens(logits_BxV, jax.random.fold_in(key, step), temperature, top_k, top_p)
    tok_B = jnp.where(forced_B >= 0, forced_B, tok_B)
    logits_Bx1xV, cache = model_lib.forward_cached(params, cfg, tok_B[:, None], cache, positions_B)
    return tok_B, logits_Bx1xV[:, 0], positions_B + 1, cache


@functools.partial(jax.jit, static_argnames=("cfg", "max_len", "copies"))
def prefill(params, cfg, tokens_BxT, lengths_B, max_len, copies):
    TRACES["prefill"] += 1
    return _prefill(params, cfg, tokens_BxT, lengths_B, max_len, copies)


@functools.partial(jax.jit, static_argnames=("cfg", "top_k", "top_p"), donate_argnames=("cache",))
def decode(params, cfg, top_k, top_p, logits_BxV, key, step, temperature, forced_B, positions_B, cache):
    TRACES["decode"] += 1
    return _step(params, cfg, top_k, top_p, logits_BxV, key, step, temperature, forced_B, positions_B, cache)


# cuBLAS rather than XLA's Triton GEMMs for these skinny decode products: 32 rows went from 14.0K to
# 15.8K tok/s at d20 on an H100 (training keeps the default: there it was slower). Ignored off GPU.
@functools.partial(jax.jit, static_argnames=("cfg", "top_k", "top_p", "max_len", "copies", "stop_ids", "pad_id"),
                   compiler_options={"xla_gpu_enable_triton_gemm": False})
def generate_on_device(params, cfg, tokens_BxT, lengths_B, key, temperature, max_tokens, *, top_k, top_p,
                       max_len, copies, stop_ids, pad_id):
    """Prefill + a while_loop of steps until every row stopped or max_tokens -> (N, max_len) int32
    tokens, pad_id after a row's stop token."""
    TRACES["generate"] += 1
    logits, cache, positions = _prefill(params, cfg, tokens_BxT, lengths_B, max_len, copies)
    N = logits.shape[0]
    no_force_N = jnp.full((N,), -1, jnp.int32)
    stops = jnp.array(stop_ids, jnp.int32)

    def cond(end, carry):
        step, _, positions, _, done_N, _ = carry
        return (step < max_tokens) & ~jnp.all(done_N) & (jnp.max(positions) < end)

    def body(end, carry):
        step, logits, positions, cache, done_N, out_NxS = carry
        tok, logits, positions, cache = _step(params, dataclasses.replace(cfg, attend_len=end), top_k, top_p, logits,
                                              key, step, temperature, no_force_N, positions, cache)
        tok = jnp.where(done_N, pad_id, tok)
        out_NxS = lax.dynamic_update_slice(out_NxS, tok[:, None], (0, step))
        return step + 1, logits, positions, cache, done_N | jnp.isin(tok, stops), out_NxS

    carry = (jnp.int32(0), logits, positions, cache, jnp.zeros(N, bool), jnp.full((N, max_len), pad_id, jnp.int32))
    # One loop per attention length: while every row writes below `end`, steps read only cache[:end].
    # The first assumes the longest prompt fills its bucket (T); the last ends at max_len, so no step is lost.
    for end in _attend_buckets(tokens_BxT.shape[1] + 1, max_len):
        carry = lax.while_loop(functools.partial(cond, end), functools.partial(body, end), carry)
    return carry[-1]


# ----------------------------------------------------------------------------------------------
# Engine


def _as_batch(prompts) -> list:
    """One prompt (list of ids) or several -> a list of prompts."""
    return [prompts] if prompts and isinstance(prompts[0], (int, np.integer)) else list(prompts)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass
class _RowTools:
    """Tool state of one row: the expression being written, tokens waiting to be forced."""
    expr: list[int] | None = None
    forced: collections.deque = dataclasses.field(default_factory=collections.deque)


class Engine:
    """Generation from a params pytree. Works with any tokenizer offering bos_id, encode_special,
    encode and decode. Rows are prompt-major: prompt 0's num_samples rows first."""

    def __init__(self, params, cfg: model_lib.ModelConfig, tokenizer):
        # The on-device driver unrolls the layers: inside a layer scan XLA copies the whole KV cache at
        # every layer (measured on an H100: 0.67 ms of a 2.7 ms d20 step at 32 rows; unrolled, 32 rows
        # went from 12.0K to 14.1K tok/s). The streaming driver keeps the scan: one jitted call per token
        # ran at 250 tok/s unrolled against 430 scanned (host-side launch cost of the bigger program).
        params, cfg = model_lib.inference_params(params, cfg)  # compute dtype, (out, in) block kernels
        self.cfg_unrolled = dataclasses.replace(cfg, scan_layers=False)
        cfg = dataclasses.replace(cfg, scan_layers=True)
        self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
        special = tokenizer.encode_special
        self.bos = tokenizer.bos_id
        self.stop_ids = (special("<|assistant_end|>"), self.bos)
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")

    def _layout(self, prompts, num_samples, max_tokens, top_k, top_p):
        """Check the arguments, pad prompts to a bucket, pick the cache length
        -> (tokens_BxT, lengths_B, max_len, max_tokens)."""
        prompts = _as_batch(prompts)
        lengths = [len(p) for p in prompts]
        seq = self.cfg.sequence_len
        if not prompts or min(lengths) == 0:
            raise ValueError("every prompt needs at least one token")
        if max(lengths) >= seq:
            raise ValueError(f"a prompt of {max(lengths)} tokens leaves no room in the {seq}-token context")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if num_samples < 1 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
            raise ValueError(f"need num_samples >= 1, top_k >= 1 or None, top_p in (0, 1] or None; "
                             f"got {num_samples}, {top_k}, {top_p}")
        T = min(seq, max(MIN_PROMPT_BUCKET, 1 << (max(lengths) - 1).bit_length()))
        needed = seq if max_tokens is None else max(lengths) + max_tokens
        max_len = min(seq, max(T, _round_up(needed, CACHE_LEN_MULTIPLE)))
        max_tokens = min(max_tokens or seq, max_len - max(lengths))
        tokens_BxT = np.zeros((len(prompts), T), np.int32)
        for row, p in zip(tokens_BxT, prompts):
            row[:len(p)] = p
        return tokens_BxT, np.array(lengths, np.int32), max_len, max_tokens

    def generate_batch(self, prompts, num_samples: int = 1, max_tokens: int | None = None, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                       use_tools: bool = False) -> tuple[list[list[int]], list[list[int]]]:
        """Completions of one prompt (list of ids) or several, num_samples rows each, without the stop
        token -> (tokens, masks); mask 0 marks forced tool output. On device unless use_tools."""
        if use_tools:
            n_rows = num_samples * len(_as_batch(prompts))
            rows, masks, done = [[] for _ in range(n_rows)], [[] for _ in range(n_rows)], [False] * n_rows
            for column, mask in self.generate(prompts, num_samples, max_tokens, temperature, top_k, top_p, seed):
                for i, (t, m) in enumerate(zip(column, mask)):
                    done[i] = done[i] or (m == 1 and t in self.stop_ids)
                    if not done[i]:
                        rows[i].append(t)
                        masks[i].append(m)
            return rows, masks
        tokens, lengths, max_len, max_tokens = self._layout(prompts, num_samples, max_tokens, top_k, top_p)
        out = np.asarray(generate_on_device(
            self.params, self.cfg_unrolled, tokens, lengths, jax.random.key(seed), jnp.float32(temperature),
            jnp.int32(max_tokens), top_k=top_k, top_p=top_p, max_len=max_len, copies=num_samples,
            stop_ids=self.stop_ids, pad_id=self.bos))
        rows = []
        for row in out[:, :max_tokens].tolist():
            stop = next((i for i, t in enumerate(row) if t in self.stop_ids), len(row))
            rows.append(row[:stop])
        return rows, [[1] * len(r) for r in rows]

    def generate(self, prompts, num_samples: int = 1, max_tokens: int | None = None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 use_tools: bool = True) -> Iterator[tuple[list[int], list[int]]]:
        """Stream (token per row, mask per row) each step. A row's stop token is yielded (mask 1);
        after it the row yields bos_id with mask 0. Ends when all rows stopped or after max_tokens
        (None: until the context is full)."""
        tokens, lengths, max_len, max_tokens = self._layout(prompts, num_samples, max_tokens, top_k, top_p)
        logits, cache, positions = prefill(self.params, self.cfg, tokens, lengths, max_len=max_len, copies=num_samples)
        n_rows = logits.shape[0]
        key, temperature = jax.random.key(seed), jnp.float32(temperature)
        tools = [_RowTools() for _ in range(n_rows)]
        done = [False] * n_rows
        for step in range(max_tokens):
            forced = np.array([r.forced.popleft() if r.forced else -1 for r in tools], np.int32)
            cfg = dataclasses.replace(self.cfg, attend_len=attend_len(max(lengths) + step + 1, max_len))
            tok, logits, positions, cache = decode(self.params, cfg, top_k, top_p, logits, key, step,
                                                   temperature, forced, positions, cache)
            column, mask = [], []
            for i, t in enumerate(np.asarray(tok).tolist()):
                if done[i]:
                    column.append(self.bos)
                    mask.append(0)
                    continue
                column.append(t)
                mask.append(0 if forced[i] >= 0 else 1)
                if forced[i] < 0:
                    done[i] = t in self.stop_ids
                    if use_tools:
                        self._tool_transition(tools[i], t)
            yield column, mask
            if all(done):
                return

    def _tool_transition(self, row: _RowTools, t: int) -> None:
        if t == self.python_start:
            row.expr = []
        elif t == self.python_end and row.expr is not None:
            result = calculate(self.tokenizer.decode(row.expr))
            row.expr = None
            if result is not None:  # refused or failed: nothing is forced, generation goes on
                row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif row.expr is not None:
            row.expr.append(t)


# ----------------------------------------------------------------------------------------------
# Python API for notebooks and scripts


class ChatModel:
    """A restored model with its tokenizer: stream tokens or answer a conversation."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.tokenizer = engine.tokenizer

    def generate(self, tokens: Sequence[int], max_tokens: int | None = None, temperature: float = 0.6,
                 top_k: int | None = 50, top_p: float | None = None, seed: int = 0) -> Iterator[int]:
        """Stream the continuation of `tokens` one id at a time, tools on; ends after a stop token."""
        for column, _ in self.engine.generate(list(tokens), 1, max_tokens, temperature, top_k, top_p, seed):
            yield column[0]

    def prompt_tokens(self, messages: list[dict]) -> list[int]:
        """<|bos|> + the conversation + <|assistant_start|>, ready for the assistant's reply."""
        return self.tokenizer.render_for_completion({"messages": list(messages)})

    def reply_text(self, reply_tokens: list[int]) -> str:
        return self.tokenizer.decode([t for t in reply_tokens if t not in self.engine.stop_ids])

    def chat(self, messages: list[dict], max_tokens: int | None = None, temperature: float = 0.6,
             top_k: int | None = 50, seed: int = 0) -> str:
        """The assistant's reply to a conversation [{'role': 'user'|'assistant', 'content': str}, ...]."""
        return self.reply_text(list(self.generate(self.prompt_tokens(messages), max_tokens, temperature, top_k,
                                                  seed=seed)))


def load_model(stage: str, step: int | None = None, base_dir: str | None = None, run_name: str | None = None):
    """-> (ChatModel, tokenizer, meta) from <base_dir>/checkpoints/<stage>/ and <base_dir>/tokenizer/.
    base_dir defaults to $NANOCHAT_BASE_DIR, else runs/tiny. Raises config.UserError when missing."""
    from nanochat_jax.checkpoint import check_tokenizer, restore_model, use_compile_cache
    from nanochat_jax.config import UserError

    base_dir = base_dir or os.environ.get("NANOCHAT_BASE_DIR", "runs/tiny")
    use_compile_cache(base_dir)
    params, config, meta = restore_model(base_dir, stage, run_name=run_name, step=step)
    from nanochat_jax.tokenizer import Tokenizer  # after the restore: a missing checkpoint is the likelier error
    tokenizer_dir = paths.tokenizer_dir(base_dir)
    if not os.path.isdir(tokenizer_dir):
        raise UserError(f"no tokenizer in {os.path.abspath(tokenizer_dir)}")
    tokenizer = Tokenizer.load(tokenizer_dir)
    check_tokenizer(meta, tokenizer.hash, f"{stage} step {meta['step']}")
    cfg = model_lib.ModelConfig.from_config(config)
    return ChatModel(Engine(params, cfg, tokenizer)), tokenizer, meta
