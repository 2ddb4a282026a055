"""Documents of text files (parquet shards with a `text` column, .txt and .rst files), and the count of
bad input skipped while reading them. Light on purpose: training a tokenizer imports neither jax nor grain.

Bad input (an unreadable or empty parquet file, no `text` column, non-UTF-8 text, empty documents) is
skipped and counted in BAD_INPUT, with a logged warning, never a crash in the middle of a run.
"""
from __future__ import annotations

import collections
import logging
import threading
from pathlib import Path
from typing import Iterator, Sequence

log = logging.getLogger(__name__)

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


def bad_input_since(before: dict[str, int]) -> dict[str, int]:
    """Bad inputs counted since the snapshot `before` (an earlier bad_input_counts()): a stage's own."""
    now = bad_input_counts()
    return {kind: n - before.get(kind, 0) for kind, n in sorted(now.items()) if n > before.get(kind, 0)}


def bad_input_markdown(counts: dict[str, int], what: str) -> str:
    """A report line naming each kind of bad input skipped while reading `what` ('' when there was none)."""
    if not counts:
        return ""
    kinds = ", ".join(f"{kind} {n:,}" for kind, n in counts.items())
    return f"Bad input skipped or repaired while reading {what} (counted per read): {kinds}.\n\n"


# ---------------------------------------------------------------------------------------------
# Reading parquet shards robustly.

def _row_groups(files: Sequence[Path | str]) -> list[tuple[str, int]]:
    """(file, row group) units of all readable files that have a `text` column; the rest are skipped."""
    import pyarrow.parquet as pq

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
    import pyarrow as pa

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
    import pyarrow.parquet as pq

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


TEXT_SUFFIXES = (".txt", ".rst")  # one document a file; a directory's other files count if .parquet


def iter_texts(paths: Sequence[Path | str], max_chars: int | None = None,
               doc_cap: int | None = None) -> Iterator[str]:
    """Documents of `paths` in order, each cut to `doc_cap` characters, until `max_chars` were yielded: a .txt
    or .rst file whole (invalid UTF-8 kept as surrogate escapes, which the BPE trainer replaces and counts),
    any other file as parquet (one document a row of its `text` column), a directory's .txt, .rst and
    .parquet files in sorted order. For tokenizer training pass the training shards only."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + (".parquet",))
        else:
            files.append(path)
    row_groups = collections.defaultdict(list)  # every parquet file is checked (and counted) before reading
    parquet = [f for f in files if f.suffix not in TEXT_SUFFIXES]
    for file, index in _row_groups(parquet) if parquet else ():  # (pyarrow is imported only for parquet)
        row_groups[file].append(index)
    total = 0
    for path in files:
        if path.suffix in TEXT_SUFFIXES:
            docs = [path.read_bytes().decode("utf-8", errors="surrogateescape")]
        else:
            docs = (text for index in row_groups[str(path)] for text in _read_row_group(str(path), index))
        for text in docs:
            if doc_cap is not None:
                text = text[:doc_cap]
            yield text
            total += len(text)
            if max_chars is not None and total >= max_chars:
                return
