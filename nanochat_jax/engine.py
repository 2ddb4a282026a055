"""KV-cache inference: jitted prefill and decode steps, sampling, two drivers, tool use, load_model.

The jitted pieces (shapes static, everything else traced):
  - prefill: B prompts, right-padded to a length bucket, run once through `forward_cached` into a fresh
    cache; the logits at each prompt's last token are kept; rows and cache are then repeated
    `copies` times, so num_samples rows share one prefill.
  - step: sample one token per row from the current logits (or take the forced token of that row),
    feed it at the row's own position, return the next logits. The cache is donated, so it is
    updated in place.
Drivers over the same step function:
  - `Engine.generate_batch`: the whole generation in `lax.while_loop`s on device (no host round trip
    per token). With tools the loop also exits when a row closes a calculator call (<|python_end|>):
    the host runs the calculator (Python, with the tokenizer) for those rows and resumes the loop with
    a per-row buffer of tokens to force (<|output_start|>result<|output_end|>, mask 0). Calls are few
    per answer, so the loop rarely exits. Many prompts go in fixed-size chunks sorted by length.
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


def _loop(params, cfg, top_k, top_p, state, buf_NxF, key, temperature, max_tokens, prompt_len, stop_ids, pad_id,
          tool_ids):
    """Steps until every row stopped, max_tokens, or (tool_ids given) a row closed a calculator call.
    A row takes its forced tokens from buf_NxF (-1 = none left) before it samples again."""
    stops = jnp.array(stop_ids, jnp.int32)
    max_len = state["out"].shape[1]

    def cond(end, s):
        go = (s["step"] < max_tokens) & ~jnp.all(s["done"]) & (jnp.max(s["positions"]) < end)
        return go & ~jnp.any(s["call"]) if tool_ids else go

    def body(end, s):
        forced = jnp.take_along_axis(buf_NxF, s["ptr"][:, None], axis=1)[:, 0]
        tok, logits, positions, cache = _step(params, dataclasses.replace(cfg, attend_len=end), top_k, top_p,
                                              s["logits"], key, s["step"], temperature, forced, s["positions"],
                                              s["cache"])
        sampled = (forced < 0) & ~s["done"]
        tok = jnp.where(s["done"], pad_id, tok)
        s = dict(s, logits=logits, positions=positions, cache=cache, step=s["step"] + 1,
                 out=lax.dynamic_update_slice(s["out"], tok[:, None], (0, s["step"])),
                 forced=lax.dynamic_update_slice(s["forced"], (forced >= 0)[:, None], (0, s["step"])),
                 done=s["done"] | (sampled & jnp.isin(tok, stops)), ptr=s["ptr"] + (forced >= 0))
        if tool_ids:  # a call is <|python_start|> ... <|python_end|>, both sampled
            start, end_ = tool_ids
            s["call"] = sampled & (tok == end_) & s["open"]
            s["open"] = jnp.where(sampled & (tok == start), True, jnp.where(sampled & (tok == end_), False, s["open"]))
        return s

    # One loop per attention length: while every row writes below `end`, steps read only cache[:end].
    # The first assumes the longest prompt fills its bucket (prompt_len); the last ends at max_len, so no
    # step is lost. A resumed loop skips the lengths it has passed (their cond is false at once).
    for end in _attend_buckets(prompt_len + 1, max_len):
        state = lax.while_loop(functools.partial(cond, end), functools.partial(body, end), state)
    return state


# cuBLAS rather than XLA's Triton GEMMs for these skinny decode products: 32 rows went from 14.0K to
# 15.8K tok/s at d20 on an H100 (training keeps the default: there it was slower). Ignored off GPU.
_DECODE_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


@functools.partial(jax.jit, static_argnames=("cfg", "top_k", "top_p", "max_len", "copies", "stop_ids", "pad_id",
                                             "tool_ids"), compiler_options=_DECODE_OPTIONS)
def generate_on_device(params, cfg, tokens_BxT, lengths_B, key, temperature, max_tokens, *, top_k, top_p,
                       max_len, copies, stop_ids, pad_id, tool_ids=None):
    """Prefill + a while_loop of steps until every row stopped or max_tokens (or, with tool_ids =
    (python_start, python_end), until a row closes a calculator call) -> the loop state: `out` (N, max_len)
    int32 tokens (pad_id after a row's stop token), `forced` (N, max_len) bool, `step`, `call` (N,) bool
    (rows waiting for a calculator result), and what `resume_on_device` needs to go on."""
    TRACES["generate"] += 1
    logits, cache, positions = _prefill(params, cfg, tokens_BxT, lengths_B, max_len, copies)
    N = logits.shape[0]
    no = jnp.zeros(N, bool)
    state = dict(step=jnp.int32(0), logits=logits, positions=positions, cache=cache, done=no, call=no, open=no,
                 ptr=jnp.zeros(N, jnp.int32), out=jnp.full((N, max_len), pad_id, jnp.int32),
                 forced=jnp.zeros((N, max_len), bool))
    return _loop(params, cfg, top_k, top_p, state, jnp.full((N, 1), -1, jnp.int32), key, temperature, max_tokens,
                 tokens_BxT.shape[1], stop_ids, pad_id, tool_ids)


@functools.partial(jax.jit, static_argnames=("cfg", "top_k", "top_p", "prompt_len", "stop_ids", "pad_id", "tool_ids"),
                   donate_argnames=("state",), compiler_options=_DECODE_OPTIONS)
def resume_on_device(params, cfg, state, buf_NxF, key, temperature, max_tokens, *, top_k, top_p, prompt_len,
                     stop_ids, pad_id, tool_ids):
    """Go on from a state generate_on_device (or this) returned, rows forcing buf_NxF's tokens first."""
    TRACES["resume"] += 1
    state = dict(state, ptr=jnp.zeros_like(state["ptr"]), call=jnp.zeros_like(state["call"]))
    return _loop(params, cfg, top_k, top_p, state, buf_NxF, key, temperature, max_tokens, prompt_len, stop_ids,
                 pad_id, tool_ids)


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
        needed = seq if max_tokens is None else T + max_tokens  # from the bucket: one cache length per bucket
        max_len = min(seq, max(T, _round_up(needed, CACHE_LEN_MULTIPLE)))
        max_tokens = min(max_tokens or seq, max_len - max(lengths))
        tokens_BxT = np.zeros((len(prompts), T), np.int32)
        for row, p in zip(tokens_BxT, prompts):
            row[:len(p)] = p
        return tokens_BxT, np.array(lengths, np.int32), max_len, max_tokens

    def generate_batch(self, prompts, num_samples: int = 1, max_tokens: int | None = None, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                       use_tools: bool = False, batch_size: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
        """Completions of one prompt (list of ids) or several, num_samples rows each, without the stop
        token -> (tokens, masks); mask 0 marks forced tool output. All on device: with tools, the loop
        stops when a row closes a calculator call, the host computes it and the loop resumes with the
        result forced (as the streaming driver does, so both give the same rows for a seed).
        batch_size: at most this many prompts per device batch. More prompts are sorted by length and
        cut into chunks of exactly batch_size (the last padded), so a long eval compiles once per
        prompt-length bucket; chunk c > 0 samples with fold_in(key(seed), c)."""
        prompts = _as_batch(prompts)
        if batch_size is None or len(prompts) <= batch_size:
            return self._generate_chunk(prompts, num_samples, max_tokens, temperature, top_k, top_p,
                                        jax.random.key(seed), use_tools)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        rows, masks = [None] * (len(prompts) * num_samples), [None] * (len(prompts) * num_samples)
        for c, first in enumerate(range(0, len(order), batch_size)):
            chunk = order[first:first + batch_size]
            padded = [prompts[i] for i in chunk] + [prompts[chunk[-1]]] * (batch_size - len(chunk))
            got, got_masks = self._generate_chunk(padded, num_samples, max_tokens, temperature, top_k, top_p,
                                                  jax.random.fold_in(jax.random.key(seed), c), use_tools)
            for j, i in enumerate(chunk):
                for k in range(num_samples):
                    rows[i * num_samples + k] = got[j * num_samples + k]
                    masks[i * num_samples + k] = got_masks[j * num_samples + k]
        return rows, masks

    def _generate_chunk(self, prompts, num_samples, max_tokens, temperature, top_k, top_p, key, use_tools):
        tokens, lengths, max_len, max_tokens = self._layout(prompts, num_samples, max_tokens, top_k, top_p)
        static = dict(top_k=top_k, top_p=top_p, stop_ids=self.stop_ids, pad_id=self.bos,
                      tool_ids=(self.python_start, self.python_end) if use_tools else None)
        temperature, max_tokens = jnp.float32(temperature), jnp.int32(max_tokens)
        state = generate_on_device(self.params, self.cfg_unrolled, tokens, lengths, key, temperature, max_tokens,
                                   max_len=max_len, copies=num_samples, **static)
        queued = [[] for _ in range(len(prompts) * num_samples)]  # tool output still to force, per row
        while use_tools and int(state["step"]) < int(max_tokens) and bool(np.any(state["call"])):
            step, call, ptr = int(state["step"]), np.asarray(state["call"]), np.asarray(state["ptr"])
            out = np.asarray(state["out"][:, :step])
            for i in range(len(queued)):
                queued[i] = queued[i][ptr[i]:]  # what the last loop forced is gone
                if call[i]:
                    queued[i] += self._calculator_output(out[i])
            width = max(16, 1 << max(map(len, queued)).bit_length())  # a power of two > the longest: ends in -1
            buf = np.full((len(queued), width), -1, np.int32)
            for row, q in zip(buf, queued):
                row[:len(q)] = q
            state = resume_on_device(self.params, self.cfg_unrolled, state, buf, key, temperature, max_tokens,
                                     prompt_len=tokens.shape[1], **static)
        out, forced = np.asarray(state["out"][:, :int(max_tokens)]), np.asarray(state["forced"][:, :int(max_tokens)])
        rows, masks = [], []
        for toks, frc in zip(out.tolist(), forced.tolist()):
            stop = next((i for i, (t, f) in enumerate(zip(toks, frc)) if t in self.stop_ids and not f), len(toks))
            rows.append(toks[:stop])
            masks.append([0 if f else 1 for f in frc[:stop]])
        return rows, masks

    def _calculator_output(self, row_tokens) -> list[int]:
        """Tokens to force after a row's <|python_end|> (its last token): the result of the expression
        since its last <|python_start|>, or nothing when the calculator refuses it."""
        row = list(row_tokens)
        start = len(row) - 1 - row[::-1].index(self.python_start)
        result = calculate(self.tokenizer.decode(row[start + 1:-1]))
        return [] if result is None else [self.output_start, *self.tokenizer.encode(result), self.output_end]

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
