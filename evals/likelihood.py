"""Batched forward passes on the mesh for evaluation: continuation scores (CORE) and answer-letter choices
(the chat evals' categorical tasks).

Sequences are right-padded into few shapes, so a whole eval compiles once per bucket, not per example:
lengths to a power of two (>= MIN_LEN), rows to fill a token budget (a multiple of the device count),
and the scored span / the candidate count to a power of two. Only the scored positions go through the
LM head: (rows, span, vocab) logits, never (rows, length, vocab). Every batch is dispatched before any
result is read back, so the host's padding overlaps the device's work. TRACES counts the compiles.
"""
from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import model as model_lib
from nanochat_jax import sharding

MIN_LEN = 64
# Scored positions per row, at least: CORE's continuations and choices are mostly shorter, so nearly every
# batch has the same span and compiles go with the length buckets only. The LM head on 32 positions adds
# ~15% to a 64-token row's forward (d20), ~2% to a 512-token one's.
MIN_SPAN = 32
TRACES = collections.Counter()


def bucket(n: int, minimum: int = 1) -> int:
    """The next power of two >= n (and >= minimum)."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def _score(params, tokens_BxT, start_B, end_B, span, cfg):
    """Mean cross-entropy of tokens [start, end) of each row and whether greedy argmax reproduces them all."""
    TRACES["score"] += 1
    gpt = model_lib.GPT(cfg)
    x_BxTxD, _ = gpt.apply({"params": params}, tokens_BxT, method=model_lib.GPT.hidden)
    T = tokens_BxT.shape[1]
    pos_BxC = start_B[:, None] - 1 + jnp.arange(span)  # the position whose logits predict token pos + 1
    valid_BxC = pos_BxC + 1 < end_B[:, None]
    pos_BxC = jnp.clip(pos_BxC, 0, T - 1)
    h = jnp.take_along_axis(x_BxTxD, pos_BxC[..., None], axis=1)
    logits_BxCxV = gpt.apply({"params": params}, h, method=model_lib.GPT.head)
    targets_BxC = jnp.take_along_axis(tokens_BxT, jnp.clip(pos_BxC + 1, 0, T - 1), axis=1)
    picked = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    ce_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1) - picked
    mean_B = jnp.sum(jnp.where(valid_BxC, ce_BxC, 0.0), axis=1) / jnp.maximum(jnp.sum(valid_BxC, axis=1), 1)
    match_B = jnp.all((jnp.argmax(logits_BxCxV, axis=-1) == targets_BxC) | ~valid_BxC, axis=1)
    return mean_B, match_B


def _choose(params, tokens_BxT, last_B, ids_BxK, cfg):
    """Index of the largest logit among each row's candidate ids (-1 = no candidate) at position last."""
    TRACES["choose"] += 1
    gpt = model_lib.GPT(cfg)
    x_BxTxD, _ = gpt.apply({"params": params}, tokens_BxT, method=model_lib.GPT.hidden)
    h_BxD = jnp.take_along_axis(x_BxTxD, last_B[:, None, None], axis=1)[:, 0]
    logits_BxV = gpt.apply({"params": params}, h_BxD, method=model_lib.GPT.head)
    cand_BxK = jnp.take_along_axis(logits_BxV, jnp.maximum(ids_BxK, 0), axis=-1)
    return jnp.argmax(jnp.where(ids_BxK >= 0, cand_BxK, -jnp.inf), axis=-1)


class Forward:
    """Params laid out on `mesh`; score / choose over any number of sequences in bucketed batches."""

    def __init__(self, params, cfg: model_lib.ModelConfig, mesh, batch_tokens: int, max_rows: int, pad_id: int = 0,
                 scan_layers: bool = True):
        # no backward pass: nothing to recompute; layers scanned: each length bucket compiles faster
        self.cfg = dataclasses.replace(cfg, remat="none", scan_layers=scan_layers)
        self.mesh, self.batch_tokens, self.max_rows, self.pad_id = mesh, batch_tokens, max_rows, pad_id
        self.params = jax.device_put(params, sharding.tree_shardings(params, mesh))
        self.rows2, self.rows1 = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
        wrap = lambda fn: jax.jit(sharding.traced_on(mesh, lambda p, a, b, c, k: fn(p, a, b, c, k, self.cfg)),
                                  static_argnums=(4,))
        self._score = wrap(lambda p, t, s, e, span, cfg: _score(p, t, s, e, span, cfg))
        self._choose = wrap(lambda p, t, last, ids, _, cfg: _choose(p, t, last, ids, cfg))

    def rows_for(self, T: int) -> int:
        n = min(self.max_rows, max(1, self.batch_tokens // T))
        return -(-n // self.mesh.size) * self.mesh.size

    def _batches(self, seqs):
        """(T, row indices) per batch: sorted by length, each batch one length bucket, rows padded later."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        by_len = collections.defaultdict(list)
        for i in order:
            by_len[bucket(len(seqs[i]), MIN_LEN)].append(i)
        for T, idx in sorted(by_len.items()):
            rows = self.rows_for(T)
            for first in range(0, len(idx), rows):
                yield T, rows, idx[first:first + rows]

    def _put(self, seqs, idx, T, rows, *columns):
        tokens = np.full((rows, T), self.pad_id, np.int32)
        for r, i in enumerate(idx):
            tokens[r, :len(seqs[i])] = seqs[i]
        out = [jax.device_put(tokens, self.rows2)]
        for col, fill in columns:
            a = np.full((rows,) + np.shape(col[idx[0]]), fill, np.int32)
            a[:len(idx)] = [col[i] for i in idx]
            out.append(jax.device_put(a, self.rows1 if a.ndim == 1 else self.rows2))
        return out

    def score(self, seqs, starts, ends) -> tuple[np.ndarray, np.ndarray]:
        """(mean cross-entropy of tokens [start, end), greedy reproduces them all) of each sequence."""
        pending = []
        for T, rows, idx in self._batches(seqs):
            span = bucket(max(ends[i] - starts[i] for i in idx), MIN_SPAN)
            tokens, s, e = self._put(seqs, idx, T, rows, (starts, 1), (ends, 1))
            pending.append((idx, self._score(self.params, tokens, s, e, span)))
        mean, match = np.zeros(len(seqs), np.float64), np.zeros(len(seqs), bool)
        for idx, (m, ok) in pending:
            mean[idx], match[idx] = np.asarray(m)[:len(idx)], np.asarray(ok)[:len(idx)]
        return mean, match

    def choose(self, prompts, candidates) -> np.ndarray:
        """For each prompt, the index of the candidate token id with the largest next-token logit."""
        K = bucket(max(map(len, candidates)), 4)
        ids = [list(c) + [-1] * (K - len(c)) for c in candidates]
        last = [len(p) - 1 for p in prompts]
        pending = []
        for T, rows, idx in self._batches(prompts):
            tokens, lst, cand = self._put(prompts, idx, T, rows, (last, 0), (ids, -1))
            pending.append((idx, self._choose(self.params, tokens, lst, cand, K)))
        out = np.zeros(len(prompts), np.int64)
        for idx, pick in pending:
            out[idx] = np.asarray(pick)[:len(idx)]
        return out
