"""The tokenizer (SPEC §5): byte-level BPE trained by our Rust crate, run by tiktoken.

Training streams documents into `nanochat_jax._rustbpe` (tokenizer_rs/), which returns the mergeable
ranks; the nine special tokens follow them. A saved tokenizer is a directory with the ranks in
tiktoken's text format and a JSON file with the pattern, the specials and a content hash, which
checkpoints record so that a model is never paired with another tokenizer.

Also here: the chat rendering of SPEC §7 (`render_conversation`, `render_for_completion`), the
pipeline stage `tokenizer`, and a CLI:

    python -m nanochat_jax.tokenizer train --input DIR --vocab-size N --out DIR
"""
from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tiktoken

from nanochat_jax import _rustbpe, paths, texts
from nanochat_jax.config import MAX_VOCAB_SIZE, UserError

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
SPLIT_PATTERN = _rustbpe.SPLIT_PATTERN  # one definition, in tokenizer_rs/src/split.rs
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
RANKS_FILE, META_FILE = "tokenizer.tiktoken", "tokenizer.json"


def vocab_size_problem(vocab_size: int) -> str | None:
    """What is wrong with a vocabulary size (the tokenizer's and config.validate's one check), or None."""
    if MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        return None
    return (f"must be in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}] (256 bytes + {len(SPECIAL_TOKENS)} special tokens "
            f"at least; int32 ids), got {vocab_size}")


class Tokenizer:
    """tiktoken Encoding over our mergeable ranks (ids 0..n-1) plus the special tokens (ids n..n+8)."""

    def __init__(self, mergeable_ranks: dict[bytes, int]):
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)):
            raise ValueError("mergeable ranks must be exactly 0..n-1")
        self.mergeable_ranks = mergeable_ranks
        self.special_tokens = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding("nanochat_jax", pat_str=SPLIT_PATTERN, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.hash = hashlib.sha256(self._ranks_text().encode() + self._meta_core().encode()).hexdigest()
        self.bos_id = self.special_tokens["<|bos|>"]
        self.train_stats: dict = {}  # filled by train(): documents, bytes, replaced

    # --- training, saving, loading ------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str | bytes], vocab_size: int) -> "Tokenizer":
        """Train on a stream of documents (str, or bytes decoded as UTF-8 with invalid sequences replaced)."""
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be an iterable of documents, not a single str/bytes")
        problem = vocab_size_problem(vocab_size)
        if problem:
            raise ValueError(f"vocab_size {problem}")
        ranks, stats = _rustbpe.train(iter(texts), vocab_size - len(SPECIAL_TOKENS))
        if stats["replaced"]:
            log.warning("tokenizer training text: %d invalid UTF-8 sequence(s) replaced by U+FFFD", stats["replaced"])
        tok = cls({token: rank for token, rank in ranks})
        tok.train_stats = dict(stats)
        return tok

    def _ranks_text(self) -> str:
        by_rank = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        return "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in by_rank)

    def _meta_core(self) -> str:
        return json.dumps({"pattern": SPLIT_PATTERN, "special_tokens": self.special_tokens}, sort_keys=True)

    def save(self, directory: str | os.PathLike) -> str:
        """Write the tokenizer into `directory` atomically (a temporary sibling renamed into place)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / RANKS_FILE).write_text(self._ranks_text())
        meta = dict(json.loads(self._meta_core()), vocab_size=self.vocab_size, hash=self.hash)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
        return str(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_FILE).read_text())
            lines = (directory / RANKS_FILE).read_text().splitlines()
            ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in lines)}
        except (OSError, ValueError) as e:
            raise UserError(f"no readable tokenizer in {directory} ({e}); train one with "
                            "`python -m nanochat_jax.tokenizer train` or the pipeline stage `tokenizer`") from None
        tok = cls(ranks)
        if meta.get("pattern") != SPLIT_PATTERN or meta.get("special_tokens") != tok.special_tokens \
                or meta.get("hash") != tok.hash:
            raise UserError(f"tokenizer in {directory} is corrupt or from another version (hash mismatch): retrain it")
        return tok

    # --- encoding -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode_special(self, name: str) -> int:
        if name not in self.special_tokens:
            raise ValueError(f"unknown special token {name!r}; known: {list(SPECIAL_TOKENS)}")
        return self.special_tokens[name]

    def encode(self, text: str | Sequence[str], prepend_bos: bool = False,
               num_threads: int | None = None) -> list[int] | list[list[int]]:
        """Token ids of one text, or of each text of a list (threads, in tiktoken). Special-token
        strings in the text are ordinary text."""
        prefix = [self.bos_id] if prepend_bos else []
        if isinstance(text, str):
            return prefix + self.enc.encode_ordinary(text)
        batch = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads or min(8, os.cpu_count() or 1))
        return [prefix + ids for ids in batch]

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def token_bytes(self) -> np.ndarray:
        """(vocab,) int32: UTF-8 bytes of each token, 0 for special tokens (for bits per byte)."""
        out = np.zeros(self.vocab_size, np.int32)
        for token, rank in self.mergeable_ranks.items():
            out[rank] = len(token)
        return out

    # --- chat format (SPEC §7) -----------------------------------------------------------------

    def render_conversation(self, conversation: dict, max_tokens: int | None = None) -> tuple[list[int], list[int]]:
        """(ids, mask) of `<|bos|><|user_start|>..<|user_end|><|assistant_start|>..<|assistant_end|>..`.

        mask is 1 on what the model learns to write: assistant text, its python tool calls (with their
        <|python_start|>/<|python_end|>) and <|assistant_end|>; 0 elsewhere, tool outputs included. A
        leading system message is merged into the first user message. Cut to `max_tokens` if given.
        """
        messages = _chat_messages(conversation)
        sp = self.special_tokens
        ids, mask = [self.bos_id], [0]

        def add(tokens: list[int], supervised: int) -> None:
            ids.extend(tokens)
            mask.extend([supervised] * len(tokens))

        for i, message in enumerate(messages):
            content = message["content"]
            if message["role"] == "user":
                add([sp["<|user_start|>"], *self.encode(content), sp["<|user_end|>"]], 0)
                continue
            add([sp["<|assistant_start|>"]], 0)
            for part in ([{"type": "text", "text": content}] if isinstance(content, str) else content):
                text_ids = self.encode(part["text"])
                if part["type"] == "text":
                    add(text_ids, 1)
                elif part["type"] == "python":
                    add([sp["<|python_start|>"], *text_ids, sp["<|python_end|>"]], 1)
                else:  # python_output: produced by the tool, never learned
                    add([sp["<|output_start|>"], *text_ids, sp["<|output_end|>"]], 0)
            add([sp["<|assistant_end|>"]], 1)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation: dict) -> list[int]:
        """The prompt for the assistant's next reply: drops a final assistant message, appends
        <|assistant_start|>."""
        conversation = copy.deepcopy(conversation)
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages.pop()
        ids, _ = self.render_conversation(conversation)
        return ids + [self.special_tokens["<|assistant_start|>"]]


def _chat_messages(conversation: dict) -> list[dict]:
    """Validated messages alternating user/assistant, a leading system message merged into the first
    user message (as the reference does). Bad input is a ValueError saying what is wrong."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError('a conversation is {"messages": [...]} with at least one message')
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"each message needs a role and a content, got {m!r}")
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user" or not isinstance(messages[0]["content"], str):
            raise ValueError("a system message (str) must be followed by a user message")
        first = dict(messages[1], content=messages[0]["content"] + "\n\n" + messages[1]["content"])
        messages = [first] + messages[2:]
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"message {i} has role {m['role']!r}, expected {expected!r} (user and assistant "
                             "alternate, starting with user; only the first message may be system)")
        content = m["content"]
        if m["role"] == "user" and not isinstance(content, str):
            raise ValueError(f"message {i}: user content must be a str")
        if m["role"] == "assistant" and not isinstance(content, str):
            if not isinstance(content, list):
                raise ValueError(f"message {i}: assistant content must be a str or a list of parts")
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in ("text", "python", "python_output") \
                        or not isinstance(part.get("text"), str):
                    raise ValueError(f"message {i}: bad part {part!r} (type text|python|python_output, text str)")
    return messages


# --- pipeline stage -------------------------------------------------------------------------------

def tokenizer_dir(config) -> str:
    return paths.tokenizer_dir(config.base_dir)


def stage_done(config, stage: str = "tokenizer") -> bool:
    """A saved tokenizer (complete: it is renamed into place) of the configured vocab size."""
    try:
        meta = json.loads((Path(tokenizer_dir(config)) / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("vocab_size") == config.tokenizer.vocab_size


def run_stage(config, stage: str = "tokenizer") -> dict:
    """Pipeline stage `tokenizer`: train on the corpus' train shards, save, compare on the val shard."""
    from evals import tok_eval
    from nanochat_jax import data

    files = data.stage_corpus(config, "tokenizer")
    cfg = config.tokenizer

    def train_texts():
        return data.iter_texts(files[:-1], max_chars=cfg.max_chars, doc_cap=cfg.doc_cap)

    t0, bad_before = time.time(), data.bad_input_counts()
    try:
        tok = Tokenizer.train(train_texts(), cfg.vocab_size)
    except ValueError as e:  # the trainer's refusals (too little text for the vocab, ...) are config mistakes
        raise UserError(f"config.tokenizer.vocab_size={cfg.vocab_size}: {e}") from None
    train_seconds = time.time() - t0
    bad = data.bad_input_since(bad_before)  # of the training pass only: the evaluation below rereads the files
    if bad:
        log.warning("tokenizer: bad input skipped in the training text: %s", bad)
    out = tok.save(tokenizer_dir(config))
    log.info("tokenizer: %d tokens trained in %.1f s on %s documents, saved to %s (hash %s)", tok.vocab_size,
             train_seconds, f"{tok.train_stats['documents']:,}", out, tok.hash[:12])

    val_texts = list(data.iter_texts(files[-1:], max_chars=tok_eval.VAL_CHARS))
    results = tok_eval.evaluate(tok, train_texts(), val_texts)
    metrics = {"vocab_size": tok.vocab_size, "chars_per_token": results["ours"], "train_seconds": train_seconds,
               "train_documents": tok.train_stats["documents"], "train_bytes": tok.train_stats["bytes"],
               "invalid_utf8_replaced": tok.train_stats["replaced"], "bad_input_skipped": sum(bad.values())}
    md = (f"## Tokenizer\n\nByte-level BPE, {tok.vocab_size:,} tokens (hash `{tok.hash[:12]}`), trained in "
          f"{train_seconds:.1f} s on {tok.train_stats['bytes']:,} bytes.\n"
          f"{data.bad_input_markdown(bad, 'the training text')}\n{tok_eval.markdown(results)}\n")
    return dict(outputs=[out], metrics=metrics, report=md)


# --- CLI ------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanochat_jax.tokenizer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a tokenizer on a directory of .txt/.rst/.parquet files")
    p.add_argument("--input", required=True, type=Path, help="directory of .txt, .rst or .parquet (column text)")
    p.add_argument("--vocab-size", required=True, type=int, help=f"total tokens incl. specials (>= {MIN_VOCAB_SIZE})")
    p.add_argument("--out", required=True, type=Path, help="directory to write the tokenizer into")
    p.add_argument("--max-chars", type=int, default=None, help="stop after this many characters")
    p.add_argument("--doc-cap", type=int, default=None, help="keep at most this many characters of each document")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if not args.input.is_dir():
            raise UserError(f"--input {args.input}: not a directory")
        if not any(p.suffix in texts.TEXT_SUFFIXES + (".parquet",) for p in args.input.rglob("*")):
            raise UserError(f"--input {args.input}: no .txt, .rst or .parquet files in it")
        t0 = time.time()
        tok = Tokenizer.train(texts.iter_texts([args.input], args.max_chars, args.doc_cap), args.vocab_size)
        tok.save(args.out)
    except (UserError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"trained {tok.vocab_size:,} tokens on {tok.train_stats['documents']:,} documents "
          f"({tok.train_stats['bytes']:,} bytes) in {time.time() - t0:.1f} s -> {args.out} (hash {tok.hash[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
