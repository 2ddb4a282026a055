"""Text corpora as parquet shards, the grain pipelines that turn them into token batches, and bits per byte.

One layout serves both corpora: `<expanduser(config.data.dir)>/<source>/shard_NNNNN.parquet`, column
`text`, one document per row, the last shard being the validation split (SPEC §6). FineWeb-EDU shards
are fetched by nanochat_jax.download; the embedded corpus (Debian's python3.X-doc reStructuredText
sources) is converted once into the same layout, so one reader serves both.

Bad input (an unreadable or empty parquet file, no `text` column, non-UTF-8 text, empty documents)
is skipped and counted in BAD_INPUT, with a logged warning, never a crash in the middle of a run.
"""
from __future__ import annotations

import collections
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat_jax.download import SHARD_PATTERN, download_shards

log = logging.getLogger(__name__)

_DONE_MARKER = "_COMPLETE.json"  # written last: a corpus dir without it is a half conversion

# ---------------------------------------------------------------------------------------------
# Bad-input accounting: one counter for the whole process, read it with bad_input_counts().

BAD_INPUT: collections.Counter = collections.Counter()
_bad_lock = threading.Lock()
_LOG_FIRST = 10  # warnings logged per kind before switching to every 1000th


def _bad(kind: str, message: str, n: int = 1) -> None:
    with _bad_lock:
        before = BAD_INPUT[kind]
        BAD_INPUT[kind] += n
        after = BAD_INPUT[kind]
    if before < _LOG_FIRST or before // 1000 != after // 1000:
        log.warning("skipped bad input (%s, %d so far): %s", kind, after, message)


def bad_input_counts() -> dict[str, int]:
    """How many bad inputs of each kind were skipped so far (for logs and the stage report)."""
    with _bad_lock:
        return dict(BAD_INPUT)


# ---------------------------------------------------------------------------------------------
# Reading parquet shards robustly.

def _row_groups(files: Sequence[Path | str]) -> list[tuple[str, int]]:
    """(file, row group) units of all readable files that have a `text` column; the rest are skipped."""
    units = []
    for f in files:
        try:
            meta = pq.ParquetFile(f)
            names = meta.schema_arrow.names
        except Exception as e:  # pyarrow raises several types for corrupt/truncated files
            _bad("unreadable_file", f"{f}: {e}")
            continue
        if "text" not in names:
            _bad("no_text_column", f"{f}: columns are {names}")
            continue
        if meta.metadata.num_rows == 0:
            _bad("empty_file", str(f))
            continue
        units.extend((str(f), i) for i in range(meta.num_row_groups))
    return units


def _decode(col: pa.ChunkedArray, where: str) -> list[str]:
    """Python strings of a text column; invalid UTF-8 is replaced (and counted), nulls become ''."""
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        try:
            return [t or "" for t in col.to_pylist()]
        except UnicodeDecodeError:
            col = pa.chunked_array([c.view(pa.large_binary() if pa.types.is_large_string(c.type) else pa.binary())
                                    for c in col.chunks])
    elif not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
        _bad("text_not_string", f"{where}: text column has type {col.type}")
        return []
    texts = []
    for raw in col.to_pylist():
        raw = raw or b""
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            _bad("non_utf8_document", f"{where}: invalid UTF-8 replaced")
            texts.append(raw.decode("utf-8", errors="replace"))
    return texts


def _read_row_group(path: str, index: int) -> list[str]:
    """Non-empty documents of one row group; a read error skips the row group (counted)."""
    where = f"{path} row group {index}"
    try:
        col = pq.ParquetFile(path).read_row_group(index, columns=["text"]).column("text")
    except Exception as e:
        _bad("unreadable_row_group", f"{where}: {e}")
        return []
    texts = _decode(col, where)
    n_empty = sum(1 for t in texts if not t)
    if n_empty:
        _bad("empty_document", f"{where}: {n_empty} empty document(s)", n_empty)
    return [t for t in texts if t]


def iter_texts(files: Sequence[Path | str], max_chars: int | None = None,
               doc_cap: int | None = None) -> Iterator[str]:
    """Documents of `files` in order, each cut to `doc_cap` characters, until `max_chars` were yielded.

    For tokenizer training: pass the training shards only (split_files(files)[0]).
    """
    total = 0
    for path, index in _row_groups(files):
        for text in _read_row_group(path, index):
            if doc_cap is not None:
                text = text[:doc_cap]
            yield text
            total += len(text)
            if max_chars is not None and total >= max_chars:
                return


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
    os.replace(tmp, dest)
    return [dest / n for n in names]


if __name__ == "__main__":
    import sys

    from nanochat_jax import download
    if sys.argv[1:2] != ["download"]:
        sys.exit("usage: python -m nanochat_jax.data download --num-shards N [--dest DIR] [--base-url URL] [--workers K]")
    sys.exit(download.main(sys.argv[2:]))
