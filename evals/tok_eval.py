"""Tokenizer compression on held-out text: characters per token of our BPE against baselines.

Baselines: a SentencePiece BPE of the same vocabulary size trained on the same text (its first
SPM_TRAIN_CHARS characters: SentencePiece holds its whole input in memory), and OpenAI's GPT-2 and
GPT-4 (cl100k_base) encodings, only when tiktoken already has their files cached: this never downloads.
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import Iterable, Sequence

import sentencepiece as spm
import tiktoken
import tiktoken.load

VAL_CHARS = 5_000_000  # held-out characters scored
SPM_TRAIN_CHARS = 20_000_000  # SentencePiece training text (the tiny corpus fits whole)
SPM_MAX_LINE = 16384  # SentencePiece trains on lines; longer ones are skipped by it


def _chars_per_token(token_counts: Iterable[int], texts: Sequence[str]) -> float:
    return sum(map(len, texts)) / max(1, sum(token_counts))


def _lines(texts: Iterable[str], max_chars: int, used: list[int]) -> Iterable[str]:
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                used[0] += len(line) + 1
                yield line
        if used[0] >= max_chars:
            return


def train_sentencepiece(texts: Iterable[str], vocab_size: int, max_chars: int = SPM_TRAIN_CHARS):
    """A byte-fallback SentencePiece BPE (no normalisation, so it sees the same characters we do).
    Returns (processor, characters trained on)."""
    used, model = [0], io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_lines(texts, max_chars, used)), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, character_coverage=0.9999, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        split_digits=True, bos_id=-1, eos_id=-1, max_sentence_length=SPM_MAX_LINE,
        num_threads=os.cpu_count() or 1, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue()), used[0]


@contextlib.contextmanager
def _no_downloads():
    """Make tiktoken's loader fail instead of fetching a file that is not in its cache."""
    original = tiktoken.load.read_file

    def refuse(blobpath: str) -> bytes:
        raise FileNotFoundError(f"{blobpath} is not cached")

    tiktoken.load.read_file = refuse
    try:
        yield
    finally:
        tiktoken.load.read_file = original


def cached_encoding(name: str):
    """tiktoken's encoding `name` if its files are cached locally (TIKTOKEN_CACHE_DIR, DATA_GYM_CACHE_DIR
    or the temp dir's data-gym-cache), else None."""
    with _no_downloads():
        try:
            return tiktoken.get_encoding(name)
        except Exception:  # not cached, or a cached file failing its hash check
            return None


def evaluate(tokenizer, train_texts: Iterable[str], val_texts: Sequence[str],
             spm_train_chars: int = SPM_TRAIN_CHARS) -> dict:
    """Characters per token on `val_texts` for ours and each baseline (None where unavailable)."""
    val_texts = [t for t in val_texts if t]
    if not val_texts:
        raise ValueError("no held-out text to evaluate the tokenizer on")
    ours = _chars_per_token(map(len, tokenizer.encode(val_texts)), val_texts)
    rows = [dict(name="nanochat_jax BPE (ours)", vocab_size=tokenizer.vocab_size, chars_per_token=ours, note="")]
    try:
        sp, sp_chars = train_sentencepiece(train_texts, tokenizer.vocab_size, spm_train_chars)
        sp_cpt = _chars_per_token(map(len, sp.encode(val_texts, num_threads=os.cpu_count() or 1)), val_texts)
        rows.append(dict(name="SentencePiece BPE", vocab_size=sp.get_piece_size(), chars_per_token=sp_cpt,
                         note=f"same text (first {sp_chars:,} chars)"))
    except RuntimeError as e:  # e.g. the text cannot fill the vocabulary
        rows.append(dict(name="SentencePiece BPE", vocab_size=tokenizer.vocab_size, chars_per_token=None,
                         note=f"training failed: {str(e).splitlines()[0][:120]}"))
    for name, label in (("gpt2", "GPT-2"), ("cl100k_base", "GPT-4 (cl100k_base)")):
        enc = cached_encoding(name)
        if enc is None:
            rows.append(dict(name=label, vocab_size=None, chars_per_token=None, note="not cached"))
        else:
            counts = map(len, enc.encode_ordinary_batch(val_texts))
            rows.append(dict(name=label, vocab_size=enc.n_vocab, chars_per_token=_chars_per_token(counts, val_texts),
                             note="tiktoken cache"))
    return dict(val_documents=len(val_texts), val_chars=sum(map(len, val_texts)), ours=ours, rows=rows)


def markdown(results: dict) -> str:
    lines = [f"Held-out compression ({results['val_chars']:,} characters in {results['val_documents']:,} documents):",
             "", "| tokenizer | vocab | chars/token | vs ours | note |", "|---|---:|---:|---:|---|"]
    for i, r in enumerate(results["rows"]):
        cpt = r["chars_per_token"]
        vocab = f"{r['vocab_size']:,}" if r["vocab_size"] else "-"
        rel = "" if i == 0 else (f"{cpt / results['ours'] - 1:+.1%}" if cpt else "-")
        lines.append(f"| {r['name']} | {vocab} | {f'{cpt:.3f}' if cpt else '-'} | {rel} | {r['note']} |")
    return "\n".join(lines)
