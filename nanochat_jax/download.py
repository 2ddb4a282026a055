"""FineWeb-EDU shard downloader: parallel, retried with backoff, resumable, verified before acceptance.

    python -m nanochat_jax.download --num-shards N [--dest DIR] [--base-url URL] [--workers K]
    (also reachable as `python -m nanochat_jax.data download ...`)

Each shard streams into `<name>.partial`; an interrupted transfer resumes from there with an HTTP
Range request. Only a file that passes verification (default: parquet with a `text` column) is
renamed to its final name, so nothing corrupt ever sits under a final name, and a rerun fetches only
what is missing. nanochat_jax.tasks fetches its Hugging Face parquet files through download_file too.
Shards are shard_00000 .. shard_{N-1} of the dataset; the last one is the validation split, as in nanochat.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import pyarrow.parquet as pq
import requests
from tqdm import tqdm

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard_{:05d}.parquet"
_CHUNK = 1 << 16  # bytes per write: what a cut connection can lose of the partial file


class DownloadError(RuntimeError):
    """A shard could not be fetched (after retries where retrying makes sense)."""


class _Permanent(DownloadError):
    """An answer that retrying cannot fix (404 and other 4xx)."""


def verify_parquet(path: Path, columns: Sequence[str] = ("text",)) -> None:
    """Raise ValueError unless `path` is a parquet file whose `columns` read back completely."""
    try:
        f = pq.ParquetFile(path)
        for name in columns:
            if name not in f.schema_arrow.names:
                raise ValueError(f"no {name!r} column (columns: {f.schema_arrow.names})")
        for i in range(f.num_row_groups):  # decoding every page catches truncation and garbage
            f.read_row_group(i, columns=list(columns))
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"not a readable parquet file: {e}") from e


def _fetch_once(session: requests.Session, url: str, partial: Path, on_bytes: Callable[[int], None],
                timeout: float) -> None:
    """One HTTP attempt appending to `partial` (resuming from its size); raises on any shortfall."""
    start = partial.stat().st_size if partial.exists() else 0
    headers = {"Range": f"bytes={start}-"} if start else {}
    with session.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416:  # nothing past `start`: the partial file may already be whole
            return
        if 400 <= r.status_code < 500:
            raise _Permanent(f"{url}: HTTP {r.status_code}")
        r.raise_for_status()
        if r.status_code == 206:
            total = int(r.headers.get("Content-Range", "*/-1").rsplit("/", 1)[1])
        else:  # 200: the server sent the whole file, start over
            start = 0
            total = int(r.headers.get("Content-Length", -1))
        with open(partial, "ab" if start else "wb") as out:
            for block in r.iter_content(_CHUNK):
                out.write(block)
                on_bytes(len(block))
    size = partial.stat().st_size
    if total >= 0 and size != total:
        raise DownloadError(f"{url}: got {size} of {total} bytes")


def download_file(url: str, dest: Path, *, session: requests.Session | None = None, retries: int = 5,
                  backoff: float = 1.0, timeout: float = 60.0,
                  on_bytes: Callable[[int], None] = lambda n: None,
                  verify: Callable[[Path], None] = verify_parquet) -> Path:
    """Fetch `url` into `dest` (resumable, atomic); retry with exponential backoff. `verify(path)` raises
    ValueError when the complete file is bad (default: a parquet file with a `text` column)."""
    if dest.exists():
        return dest
    partial = dest.with_name(dest.name + ".partial")
    session = session or requests.Session()
    for attempt in range(retries + 1):
        try:
            _fetch_once(session, url, partial, on_bytes, timeout)
            try:
                verify(partial)
            except ValueError as e:  # complete but bad: the bytes cannot be trusted, refetch all
                partial.unlink(missing_ok=True)
                raise DownloadError(f"{url}: {e}") from e
            os.replace(partial, dest)
            return dest
        except _Permanent:
            partial.unlink(missing_ok=True)
            raise
        except (requests.RequestException, DownloadError, OSError) as e:
            if attempt == retries:
                raise DownloadError(f"{url}: gave up after {retries + 1} attempts: {e}") from e
            wait = backoff * 2 ** attempt
            log.warning("%s: attempt %d failed (%s); retrying in %.1fs", url, attempt + 1, e, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def download_shards(num_shards: int, dest: Path | str, *, base_url: str, workers: int = 4,
                    retries: int = 5, backoff: float = 1.0, timeout: float = 60.0,
                    progress: bool = True) -> list[Path]:
    """Shards 0..num_shards-1 under `dest` (the last is the validation split); fetches only missing ones."""
    if num_shards < 2:
        raise ValueError(f"num_shards must be >= 2 (train + val), got {num_shards}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    paths = [dest / SHARD_PATTERN.format(i) for i in range(num_shards)]
    missing = [p for p in paths if not p.exists()]
    if not missing:
        return paths
    log.info("downloading %d of %d shards from %s into %s", len(missing), num_shards, base_url, dest)
    bytes_bar = tqdm(unit="B", unit_scale=True, desc="bytes", disable=not progress, position=0)
    shards_bar = tqdm(total=len(missing), unit="shard", desc="shards", disable=not progress, position=1)
    lock = threading.Lock()

    def on_bytes(n):
        with lock:
            bytes_bar.update(n)

    def fetch(path):
        with requests.Session() as session:
            download_file(f"{base_url.rstrip('/')}/{path.name}", path, session=session, retries=retries,
                          backoff=backoff, timeout=timeout, on_bytes=on_bytes)
        with lock:
            shards_bar.update(1)

    failures = []
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for path, fut in [(p, pool.submit(fetch, p)) for p in missing]:
            try:
                fut.result()
            except DownloadError as e:
                failures.append(f"{path.name}: {e}")
    bytes_bar.close()
    shards_bar.close()
    if failures:  # everything else was fetched, so a rerun only retries these
        raise DownloadError(f"{len(failures)} shard(s) failed:\n  " + "\n  ".join(failures))
    return paths


def main(argv: list[str] | None = None) -> int:
    from nanochat_jax.config import base_config
    defaults = base_config().data
    ap = argparse.ArgumentParser(prog="python -m nanochat_jax.download", description=__doc__.split("\n")[0])
    ap.add_argument("--num-shards", type=int, required=True, help="shards 0..N-1; the last is validation")
    ap.add_argument("--dest", default=os.path.join(os.path.expanduser(defaults.dir), "fineweb"))
    ap.add_argument("--base-url", default=defaults.base_url)
    ap.add_argument("--workers", type=int, default=defaults.download_workers)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        download_shards(args.num_shards, args.dest, base_url=args.base_url, workers=args.workers)
    except (DownloadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
