"""Conversations -> training rows (STAGES.md §2-3), as sources for train.train_loop.

- mid (`PackedChatSource`): each conversation rendered with its own <|bos|>, cut at `max_conv_tokens`,
  concatenated into one token stream and cut into rows of T+1 (conversations straddle rows; no padding).
- sft (`PaddedChatSource`): one conversation per row, padded with <|assistant_end|>; the target is -1 where
  the render mask is 0 and on the padding, so neither reaches the loss.
Both index by step (state = {"step": n}), so a resumed run sees exactly the rows it would have seen, and wrap
around to a further epoch when the horizon asks for more steps than one epoch holds.

Bad conversations (a missing or unknown role, roles out of order, empty or non-string content) are skipped
and counted; a conversation longer than the cut is truncated and counted; a python tool call the calculator
would refuse is kept (its recorded output is what the model learns from) and counted.
"""
from __future__ import annotations

import collections
import logging

import numpy as np

from nanochat_jax.tools import calculate

log = logging.getLogger(__name__)

MIN_ROW_BUCKET = 64


class RenderCounts(collections.Counter):
    """How many conversations were rendered, and how many of each kind of bad input were met."""

    def markdown(self, what: str) -> str:
        bad = {k: v for k, v in sorted(self.items()) if k != "rendered" and v}
        if not bad:
            return f"{self['rendered']:,} conversations of {what} rendered, no bad input.\n"
        return (f"{self['rendered']:,} conversations of {what} rendered; bad input: "
                + ", ".join(f"{k} {v:,}" for k, v in bad.items()) + ".\n")


def render(tokenizer, conversation: dict, max_tokens: int, counts: RenderCounts):
    """(ids, mask) of one conversation cut at max_tokens, or None (counted) if it cannot be rendered."""
    try:
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        for m in messages or []:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str) and not content.strip():
                raise ValueError("empty content")
        ids, mask = tokenizer.render_conversation(conversation)
    except (ValueError, TypeError, AttributeError) as e:
        counts["skipped_invalid"] += 1
        if counts["skipped_invalid"] <= 3:  # the first few say what is wrong; the count says how many
            log.warning("skipped a bad conversation (%s): %.200r", e, conversation)
        return None
    for m in conversation["messages"]:
        for part in m["content"] if isinstance(m["content"], list) else ():
            if part["type"] == "python" and calculate(part["text"]) is None:
                counts["calculator_refused"] += 1
    if len(ids) > max_tokens:
        counts["truncated"] += 1
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    counts["rendered"] += 1
    return ids, mask


def render_stream(tokenizer, conversations, max_conv_tokens: int, counts: RenderCounts):
    """All conversations, rendered and concatenated -> (tokens int32, mask uint8) of equal length."""
    tokens, masks = [], []
    for conversation in conversations:
        out = render(tokenizer, conversation, max_conv_tokens, counts)
        if out is not None:
            tokens.append(np.asarray(out[0], np.int32))
            masks.append(np.asarray(out[1], np.uint8))
    if not tokens:
        return np.zeros(0, np.int32), np.zeros(0, np.uint8)
    return np.concatenate(tokens), np.concatenate(masks)


def packed_rows(tokens, mask, seq_len: int):
    """The stream cut into whole rows of T+1 -> (rows (N, T+1) int32, mask (N, T+1)); the tail is dropped."""
    n = len(tokens) // (seq_len + 1) * (seq_len + 1)
    return tokens[:n].reshape(-1, seq_len + 1), mask[:n].reshape(-1, seq_len + 1)


def _share(rows_per_step: int, process_index: int, process_count: int) -> slice:
    local = rows_per_step // process_count
    return slice(process_index * local, (process_index + 1) * local)


class PackedChatSource:
    """mid's rows: step s takes rows [s R, (s + 1) R) of the packed stream (R = rows_per_step), this process
    its share. supervise='all' trains on every token (the reference), 'assistant' only on the mask's tokens."""

    def __init__(self, tokens, mask, seq_len: int, rows_per_step: int, supervise: str = "all",
                 process_index: int = 0, process_count: int = 1):
        self.rows, self.mask = packed_rows(tokens, mask, seq_len)
        self.rows_per_step, self.supervise = rows_per_step, supervise
        self.share = _share(rows_per_step, process_index, process_count)
        self.steps_per_epoch = len(self.rows) // rows_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(f"the mixture renders to {len(self.rows)} rows of {seq_len + 1} tokens, fewer than one "
                             f"step's {rows_per_step}")
        self.step = 0

    def next_batch(self, params=None) -> tuple[dict, dict]:
        first = (self.step % self.steps_per_epoch) * self.rows_per_step
        index = np.arange(first, first + self.rows_per_step)[self.share]
        self.step += 1
        rows, mask = self.rows[index], self.mask[index]
        targets = rows[:, 1:].copy()
        if self.supervise == "assistant":
            targets[mask[:, 1:] == 0] = -1
        return dict(inputs=rows[:, :-1], targets=targets, weights=np.ones(targets.shape, np.float32)), {}

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = state["step"]


def row_bucket(rendered, max_len: int) -> int:
    """Row length for these conversations: the longest one's rounded up to a power of two (>= 64, <= max_len),
    so a whole run compiles its step for a few lengths only."""
    longest = max(len(ids) for ids, _ in rendered) - 1
    return min(max_len, max(MIN_ROW_BUCKET, 1 << max(longest - 1, 0).bit_length()))


def padded_batch(rendered, pad_id: int, T: int) -> dict:
    """One padded, masked batch of rendered (ids, mask) conversations in rows of T: padded with pad_id, targets
    -1 where the mask is 0 and on the padding."""
    inputs = np.full((len(rendered), T), pad_id, np.int32)
    targets = np.full((len(rendered), T), -1, np.int32)
    for row, (ids, mask) in enumerate(rendered):
        ids, mask = np.asarray(ids[:T + 1], np.int32), np.asarray(mask[:T + 1])
        n = len(ids) - 1
        inputs[row, :n] = ids[:-1]
        targets[row, :n] = np.where(mask[1:] == 1, ids[1:], -1)
    return dict(inputs=inputs, targets=targets, weights=np.ones((len(rendered), T), np.float32))


class PaddedChatSource:
    """sft's rows: step s takes conversations [s R, (s + 1) R) of the rendered mixture, this process its share."""

    def __init__(self, rendered: list, rows_per_step: int, pad_id: int, max_len: int,
                 process_index: int = 0, process_count: int = 1):
        self.rendered, self.rows_per_step, self.pad_id, self.max_len = rendered, rows_per_step, pad_id, max_len
        self.share = _share(rows_per_step, process_index, process_count)
        self.steps_per_epoch = len(rendered) // rows_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(f"the mixture has {len(rendered)} conversations, fewer than one step's {rows_per_step}")
        self.step = 0

    def next_batch(self, params=None) -> tuple[dict, dict]:
        first = (self.step % self.steps_per_epoch) * self.rows_per_step
        self.step += 1
        step_rows = self.rendered[first:first + self.rows_per_step]
        T = row_bucket(step_rows, self.max_len)  # of the whole step: every process and micro-batch agrees
        return padded_batch(step_rows[self.share], self.pad_id, T), {}

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = state["step"]
