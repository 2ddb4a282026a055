"""The Hugging Face datasets behind the tasks: one table of parquet files, fetched with the project's
resumable, verified downloader, read into shuffled tasks.

    python -m nanochat_jax.tasks download [TASK ...] [--data-dir DIR]

Files live at `<data_dir>/<repo>/<path>` (data_dir default ~/.cache/nanochat_jax/data/tasks) and come
from `$NANOCHAT_HF_URL/datasets/<repo>/resolve/main/<path>` (default https://hfp.19830613.xyz). A task
fetches what is missing on first use. Rows are shuffled with np.random.default_rng(42).permutation
(the order Hugging Face's `Dataset.shuffle(seed=42)` gives, which the reference uses); a bad row
(missing field, wrong type) is skipped and counted in BAD_ROWS with a logged warning.
"""
from __future__ import annotations

import collections
import functools
import logging
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat_jax import download
from nanochat_jax.config import UserError
from nanochat_jax.tasks.base import Task

log = logging.getLogger(__name__)

HF_URL = "https://hfp.19830613.xyz"  # overridden by $NANOCHAT_HF_URL (tests point it at loopback)
DEFAULT_DATA_DIR = "~/.cache/nanochat_jax/data/tasks"
SHUFFLE_SEED = 42

_MC = ("question", "subject", "choices", "answer")
# (task, split) -> (Hugging Face dataset repo, parquet files in row order, columns read)
FILES = {
    ("smoltalk", "train"): ("HuggingFaceTB/smol-smoltalk",
                            [f"data/train-{i:05d}-of-00004.parquet" for i in range(4)], ("messages",)),
    ("smoltalk", "test"): ("HuggingFaceTB/smol-smoltalk", ["data/test-00000-of-00001.parquet"], ("messages",)),
    ("mmlu", "auxiliary_train"): ("cais/mmlu", ["auxiliary_train/train-00000-of-00001.parquet"], ("train",)),
    **{("mmlu", s): ("cais/mmlu", [f"all/{s}-00000-of-00001.parquet"], _MC) for s in ("dev", "validation", "test")},
    **{(f"arc_{level.lower()}", s): ("allenai/ai2_arc", [f"ARC-{level}/{s}-00000-of-00001.parquet"],
                                     ("question", "choices", "answerKey"))
       for level in ("Easy", "Challenge") for s in ("train", "validation", "test")},
    **{("gsm8k", s): ("openai/gsm8k", [f"main/{s}-00000-of-00001.parquet"], ("question", "answer"))
       for s in ("train", "test")},
}
HUB_TASKS = sorted({task for task, _ in FILES})

# ---------------------------------------------------------------------------------------------
# Bad rows: one counter for the process, in the style of data.BAD_INPUT.

BAD_ROWS: collections.Counter = collections.Counter()
_bad_lock = threading.Lock()
_LOG_FIRST = 10  # warnings logged per kind before switching to every 1000th


def bad_row(kind: str, message: str) -> None:
    with _bad_lock:
        BAD_ROWS[kind] += 1
        n = BAD_ROWS[kind]
    if n <= _LOG_FIRST or n % 1000 == 0:
        log.warning("skipped bad row (%s, %d so far): %s", kind, n, message)

# ---------------------------------------------------------------------------------------------


def data_dir_path(data_dir: str | os.PathLike | None) -> Path:
    return Path(os.path.expanduser(data_dir if data_dir is not None else DEFAULT_DATA_DIR))


def splits(task: str) -> list[str]:
    return [s for t, s in FILES if t == task]


def fetch(task: str, split: str | None = None, data_dir=None, retries: int = 5, backoff: float = 1.0,
          progress: bool = True) -> list[Path]:
    """Fetch the missing files of `task` (one split, or all); returns the local paths."""
    from tqdm import tqdm
    base = os.environ.get("NANOCHAT_HF_URL", HF_URL).rstrip("/")
    paths = []
    for s in [split] if split else splits(task):
        repo, files, columns = FILES[task, s]
        verify = functools.partial(download.verify_parquet, columns=columns)
        for name in files:
            dest = data_dir_path(data_dir) / repo / name
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                with tqdm(unit="B", unit_scale=True, desc=f"{repo}/{name}", disable=not progress) as bar:
                    download.download_file(f"{base}/datasets/{repo}/resolve/main/{name}", dest, retries=retries,
                                           backoff=backoff, on_bytes=bar.update, verify=verify)
            paths.append(dest)
    return paths


def read_table(task: str, split: str, data_dir=None) -> pa.Table:
    """The split's rows (its files concatenated), fetching missing files; offline: one-line UserError."""
    try:
        paths = fetch(task, split, data_dir, retries=2, backoff=0.5)
    except (download.DownloadError, OSError) as e:
        reason = (str(e).splitlines() or [""])[0]
        raise UserError(f"{task} {split}: data not in {data_dir_path(data_dir)} and the download failed ({reason}); "
                        f"run `python -m nanochat_jax.tasks download {task}` where there is network") from None
    tables = []
    for path in paths:
        try:
            tables.append(pq.read_table(path, columns=list(FILES[task, split][2])))
        except (pa.ArrowException, OSError) as e:  # it was verified when fetched, so it changed since
            raise UserError(f"{task} {split}: cannot read {path} ({(str(e).splitlines() or [''])[0]}); delete it "
                            f"and run `python -m nanochat_jax.tasks download {task}`") from None
    return pa.concat_tables(tables)


class HubTask(Task):
    """A task over one split of a hub dataset: rows checked once by `convert` (bad ones skipped and
    counted), shuffled, cut to the first `limit`; task[i] converts its row on demand."""

    def __init__(self, split: str = "train", limit: int | None = None, data_dir=None):
        self.split = split
        self.table = read_table(self.name, split, data_dir)
        good = np.zeros(len(self.table), bool)
        for start in range(0, len(self.table), 10_000):  # in batches: never all rows as Python objects
            for j, row in enumerate(self.table.slice(start, 10_000).to_pylist()):
                try:
                    self.convert(row)
                    good[start + j] = True
                except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                    bad_row(f"{self.name}:{split}", f"row {start + j}: {type(e).__name__}: {e}")
        order = np.random.default_rng(SHUFFLE_SEED).permutation(len(self.table))
        self.rows = order[good[order]][:limit]

    def convert(self, row: dict) -> dict:
        """The conversation of one parquet row; raises KeyError/TypeError/ValueError on a bad row."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.convert(self.table.slice(int(self.rows[index]), 1).to_pylist()[0])


def need(value, kind: type, what: str):
    """`value` if it is a `kind`, else a TypeError naming the field (a bad row)."""
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{what} is {type(value).__name__}, expected {kind.__name__}")
    return value


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m nanochat_jax.tasks", description="Fetch the tasks' datasets.")
    sub = ap.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="fetch the missing parquet files of TASK ... (default: all)")
    dl.add_argument("tasks", nargs="*", metavar="TASK", help=" | ".join(HUB_TASKS))
    dl.add_argument("--data-dir", default=None, help=f"default {DEFAULT_DATA_DIR}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    unknown = [t for t in args.tasks if t not in HUB_TASKS]
    if unknown:
        print(f"error: unknown task(s) {', '.join(unknown)}; datasets exist for {', '.join(HUB_TASKS)}",
              file=sys.stderr)
        return 2
    for task in args.tasks or HUB_TASKS:
        try:
            paths = fetch(task, data_dir=args.data_dir)
        except download.DownloadError as e:
            print(f"error: {task}: {e}", file=sys.stderr)
            return 1
        print(f"{task}: {len(paths)} file(s) in {data_dir_path(args.data_dir)}")
    return 0
