"""Text corpora as parquet shards, the grain pipelines that turn them into token batches, and bits per byte.

One layout serves both corpora: `<expanduser(config.data.dir)>/<source>/shard_NNNNN.parquet`, column
`text`, one document per row, the last shard being the validation split (SPEC §6). FineWeb-EDU shards
are fetched by nanochat_jax.download; the embedded corpus (Debian's python3.X-doc reStructuredText
sources) is converted once into the same layout, so one reader serves both.

Reading the shards' documents (and counting bad input) is nanochat_jax/texts.py's, which needs neither
jax nor grain; its names are re-exported here.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat_jax.config import UserError
from nanochat_jax.download import SHARD_PATTERN, DownloadError, download_shards

log = logging.getLogger(__name__)

_DONE_MARKER = "_COMPLETE.json"  # written last: a corpus dir without it is a half conversion

from nanochat_jax.texts import (BAD_INPUT, _read_row_group, _row_groups, bad_input_counts,  # noqa: F401
                                 bad_input_markdown, bad_input_since, iter_texts)


def split_files(files: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(training shards, validation shards): the last shard is the validation split (SPEC §6)."""
    if len(files) < 2:
        raise ValueError(f"need at least 2 shards (train + val), got {len(files)}")
    return list(files[:-1]), list(files[-1:])


# ---------------------------------------------------------------------------------------------
# Corpora on disk.

def corpus_dir(config) -> Path:
    return Path(os.path.expanduser(config.data.dir)) / config.data.source


def ensure_corpus(config) -> list[Path]:
    """The corpus shards, sorted, last = validation; downloads FineWeb or converts the embedded docs once."""
    dest = corpus_dir(config)
    if config.data.source == "embedded":
        return _ensure_embedded(dest)
    return download_shards(config.data.num_shards, dest, base_url=config.data.base_url,
                                    workers=config.data.download_workers)


def stage_corpus(config, stage: str) -> list[Path]:
    """ensure_corpus for a pipeline stage: no corpus (the docs package missing, a download that failed, no
    network) is a UserError that says what to do, which the entry points print without a traceback."""
    try:
        files = ensure_corpus(config)
    except (OSError, ValueError, DownloadError) as e:
        raise UserError(f"stage {stage}: no corpus ({e}). config.data.source={config.data.source!r}: 'embedded' "
                        "needs the python3.11-doc package (sudo apt-get install python3.11-doc), 'fineweb' "
                        "downloads shards from config.data.base_url (rerun to fetch only what is missing)") from None
    if len(files) < 2:
        raise UserError(f"stage {stage}: the corpus in {corpus_dir(config)} needs a train and a val shard, "
                        f"found {len(files)}")
    return files


DOC_SOURCES = "/usr/share/doc/python3.11/html/_sources"  # Debian/Ubuntu package python3.11-doc
DOC_SOURCES_GLOB = "/usr/share/doc/python3.*/html/_sources"  # fallback: another python3.X-doc
EMBEDDED_TRAIN_SHARDS = 4  # a few shards so that several processes / threads get a share
EMBEDDED_VAL_EVERY = 20  # ~5% of documents (chosen by a hash of the path) form the val shard
EMBEDDED_ROW_GROUP = 16  # documents per row group: the unit of parallel tokenization


def _find_doc_sources() -> Path:
    """The reStructuredText sources of Debian's python3.11-doc, else of another python3.X-doc."""
    if Path(DOC_SOURCES).is_dir():
        return Path(DOC_SOURCES)
    found = sorted(glob.glob(DOC_SOURCES_GLOB), key=lambda p: [int(x) for x in re.findall(r"\d+", p)], reverse=True)
    if not found:
        raise FileNotFoundError(
            "the embedded corpus needs the Python documentation sources, which were not found under "
            f"{DOC_SOURCES_GLOB}; install them with:  sudo apt-get install python3.11-doc")
    return Path(found[0])


def _ensure_embedded(dest: Path) -> list[Path]:
    marker = dest / _DONE_MARKER
    if marker.exists():
        return [dest / name for name in json.loads(marker.read_text())["shards"]]
    src = _find_doc_sources()
    docs = sorted(src.rglob("*.rst.txt"))
    if not docs:
        raise FileNotFoundError(f"no .rst.txt files under {src}; reinstall with:  "
                                "sudo apt-get install --reinstall python3.11-doc")
    log.info("converting %d documents from %s into %s", len(docs), src, dest)
    train, val = [], []
    for p in docs:
        rel = p.relative_to(src).as_posix()
        text = p.read_bytes().decode("utf-8", errors="replace")
        if not text.strip():
            continue
        bucket = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % EMBEDDED_VAL_EVERY
        (val if bucket == 0 else train).append(text)
    splits = [train[i::EMBEDDED_TRAIN_SHARDS] for i in range(EMBEDDED_TRAIN_SHARDS)] + [val]

    # Write everything into a fresh temporary dir, then rename it into place: never a half corpus.
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    names = []
    for i, texts in enumerate(splits):
        names.append(SHARD_PATTERN.format(i))
        pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), tmp / names[-1],
                       row_group_size=EMBEDDED_ROW_GROUP)
    (tmp / _DONE_MARKER).write_text(json.dumps(
        {"source": str(src), "documents": len(train) + len(val), "val_documents": len(val), "shards": names}))
    shutil.rmtree(dest, ignore_errors=True)  # a half conversion of an older run (no marker)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process (multi-host, shared disk) finished first: keep its identical copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not marker.exists():
            raise
    return [dest / n for n in names]



# ---------------------------------------------------------------------------------------------
# grain pipelines: row groups -> tokenize (threads) -> <|bos|>-prefixed token stream -> rows of T+1 -> batches.

class _Tokenize:
    """One row group -> its documents' tokens, each document prefixed with <|bos|>, as one int32 array."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, unit: tuple[str, int]) -> np.ndarray:
        texts = _read_row_group(*unit)
        if not texts:
            return np.zeros(0, np.int32)
        ids = self.tokenizer.encode(texts, prepend_bos=True)
        return np.fromiter(itertools.chain.from_iterable(ids), np.int32, sum(map(len, ids)))


class _PackIterator(grain.DatasetIterator):
    """Cuts the concatenated token stream into consecutive rows of `row_len` tokens.

    State = the parent's state before the oldest chunk still buffered + how far into it we are: a restore
    refetches that chunk and continues with exactly the rows the uninterrupted run would have produced.
    """

    def __init__(self, parent: grain.DatasetIterator, row_len: int, max_empty: int):
        super().__init__(parent)
        self._row_len, self._max_empty = row_len, max_empty
        self._chunks: list[tuple[dict, np.ndarray]] = []  # (parent state before the chunk, tokens)
        self._pos = 0  # tokens of the first chunk already emitted
        self._state = {"parent": self._parent.get_state(), "offset": 0}

    def _fetch(self) -> None:
        empty = 0
        while True:
            state = self._parent.get_state()
            tokens = next(self._parent)  # StopIteration ends a finite (validation) stream
            if len(tokens):
                self._chunks.append((state, tokens))
                return
            empty += 1
            if empty > self._max_empty:  # a whole pass without one token: fail loudly instead of spinning
                raise RuntimeError(f"no usable documents in the data files (bad input: {bad_input_counts()})")

    def __next__(self) -> np.ndarray:
        while sum(len(t) for _, t in self._chunks) - self._pos < self._row_len:
            self._fetch()
        row, need = [], self._row_len
        while need:
            tokens = self._chunks[0][1]
            take = min(need, len(tokens) - self._pos)
            row.append(tokens[self._pos:self._pos + take])
            self._pos += take
            need -= take
            if self._pos == len(tokens):
                self._chunks.pop(0)
                self._pos = 0
        self._state = ({"parent": self._chunks[0][0], "offset": self._pos} if self._chunks
                       else {"parent": self._parent.get_state(), "offset": 0})
        return np.concatenate(row)

    def get_state(self) -> dict:
        return self._state

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._chunks, self._pos = [], 0
        if state["offset"]:
            self._fetch()
            self._pos = state["offset"]
        self._state = state


class _PackDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, row_len: int, max_empty: int):
        super().__init__(parent)
        self._row_len, self._max_empty = row_len, max_empty

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._row_len, self._max_empty)


def _rows_dataset(files, tokenizer, seq_len, process_index, process_count, *, repeat, shuffle_seed=None,
                  num_threads=None) -> grain.IterDataset:
    units = _row_groups(files)[process_index::process_count]  # this process's share of the row groups
    if not units:
        raise ValueError(f"no readable parquet row groups with a 'text' column for process {process_index} of "
                         f"{process_count} in {len(files)} file(s) (bad input: {bad_input_counts()})")
    ds = grain.MapDataset.source(units)
    if shuffle_seed is not None:
        ds = ds.shuffle(shuffle_seed)  # row-group order, reshuffled every epoch
    if repeat:
        ds = ds.repeat()
    threads = num_threads or min(8, os.cpu_count() or 1)
    ds = ds.map(_Tokenize(tokenizer)).to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))
    return _PackDataset(ds, seq_len + 1, max_empty=len(units))


def make_train_iterator(files: Sequence[Path | str], tokenizer, batch_size: int, seq_len: int,
                        process_index: int = 0, process_count: int = 1, seed: int = 0, *,
                        shuffle: bool = False, num_threads: int | None = None) -> grain.DatasetIterator:
    """Endless iterator of np.int32 (batch_size, seq_len + 1) token rows (inputs = [:, :-1], targets = [:, 1:]).

    Reads this process's share of the row groups of `files` (the training shards), in shard order as the
    reference does, or in a `seed`-determined order reshuffled each epoch with shuffle=True. The iterator's
    get_state() / set_state() round-trip through JSON and resume with exactly the same batches.
    """
    ds = _rows_dataset(files, tokenizer, seq_len, process_index, process_count, repeat=True,
                       shuffle_seed=seed if shuffle else None, num_threads=num_threads)
    return iter(ds.batch(batch_size, drop_remainder=True))


def make_val_batches(files: Sequence[Path | str], tokenizer, batch_size: int, seq_len: int, num_tokens: int,
                     process_index: int = 0, process_count: int = 1) -> list[np.ndarray]:
    """Validation batches (batch_size, seq_len + 1) holding max(1, num_tokens // (batch_size * seq_len)) * batch_size
    rows: the same fixed tokens at every evaluation. Cycles through the split (with a warning) if it is too small."""
    num_batches = max(1, num_tokens // (batch_size * seq_len))
    rows = []
    ds = _rows_dataset(files, tokenizer, seq_len, process_index, process_count, repeat=False)
    while len(rows) < num_batches * batch_size:
        before = len(rows)
        rows.extend(itertools.islice(iter(ds), num_batches * batch_size - len(rows)))
        if len(rows) == before:
            raise ValueError(f"validation files hold less than one row of {seq_len + 1} tokens: {list(files)}")
        if len(rows) < num_batches * batch_size:
            log.warning("validation split has only %d rows of %d tokens; reusing it to reach %d tokens",
                        len(rows), seq_len + 1, num_tokens)
    return [np.stack(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


# ---------------------------------------------------------------------------------------------
# Bits per byte (SPEC §6).

def evaluate_bpb(per_token_loss_fn, batches: Iterable[np.ndarray], token_bytes: np.ndarray) -> float:
    """Sum of target losses (nats) / ln 2 / sum of the targets' UTF-8 bytes.

    per_token_loss_fn(rows_Bx(T+1)) -> per-token losses (B, T) in nats for targets rows[:, 1:]. Targets
    that are special tokens (0 bytes in token_bytes) or -1 (ignored) count neither loss nor bytes.
    """
    token_bytes = np.asarray(token_bytes, np.int64)
    total_nats, total_bytes = 0.0, 0
    for rows in batches:
        targets_BxT = np.asarray(rows)[:, 1:]
        loss_BxT = np.asarray(per_token_loss_fn(rows), np.float64)
        bytes_BxT = np.where(targets_BxT >= 0, token_bytes[np.maximum(targets_BxT, 0)], 0)
        total_nats += float(np.sum(np.where(bytes_BxT > 0, loss_BxT, 0.0)))
        total_bytes += int(bytes_BxT.sum())
    if total_bytes == 0:
        raise ValueError("bits per byte over zero bytes: no non-special targets in the batches")
    return total_nats / math.log(2) / total_bytes

if __name__ == "__main__":
    import sys

    from nanochat_jax import download
    if sys.argv[1:2] != ["download"]:
        sys.exit("usage: python -m nanochat_jax.data download --num-shards N [--dest DIR] [--base-url URL] [--workers K]")
    sys.exit(download.main(sys.argv[2:]))
