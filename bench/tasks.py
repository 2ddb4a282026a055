"""Load time, memory and per-item time of a hub task at SmolTalk's shape, without the network.

    .venv/bin/python bench/tasks.py [--rows 100000]

Writes --rows SmolTalk-shaped conversations (4 messages, ~310 words) into four parquet files laid out
as the hub's, loads them with the real SmolTalk task (validate every row, shuffle) and times task[i].
Prints one line of JSON.
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat_jax.tasks import hub
from nanochat_jax.tasks.smoltalk import SmolTalk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    n = ap.parse_args().rows
    rng = np.random.default_rng(0)
    vocab = np.array(["alpha", "beta", "gamma", "delta", "token", "model", "chat"])

    def turn(role, words):
        return {"content": " ".join(rng.choice(vocab, words)), "role": role}

    table = pa.table({"messages": [[turn("user", 60), turn("assistant", 120), turn("user", 30),
                                    turn("assistant", 100)] for _ in range(n)], "source": ["bench"] * n})
    with tempfile.TemporaryDirectory() as tmp:
        repo, files, _ = hub.FILES["smoltalk", "train"]
        for k, name in enumerate(files):
            (Path(tmp) / repo / name).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table.slice(k * n // 4, (k + 1) * n // 4 - k * n // 4), Path(tmp) / repo / name)
        del table
        t0 = time.perf_counter()
        task = SmolTalk("train", None, tmp)
        load_s = time.perf_counter() - t0
        picks = rng.integers(0, len(task), 5000)
        t0 = time.perf_counter()
        for i in picks:
            task[int(i)]
        item_us = (time.perf_counter() - t0) / len(picks) * 1e6
    print(json.dumps({"rows": n, "load_s": round(load_s, 2), "item_us": round(item_us, 1),
                      "max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}))


if __name__ == "__main__":
    main()
