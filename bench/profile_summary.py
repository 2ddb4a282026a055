"""Where a profiled step spends its GPU time: kernels grouped into families, from a perfetto trace.

    python bench/profile_summary.py DIR [--steps 2] [--top 25]

DIR is what `jax.profiler.trace(DIR, create_perfetto_trace=True)` wrote (bench/train_mfu.py --profile).
Sums kernel durations on the GPU's stream rows per kernel name and per family (matmul, attention,
elementwise/reduction fusions, copies), divided by --steps, and prints the largest.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re

FAMILIES = [  # first match wins
    ("attention", re.compile(r"cudnn|flash|fmha|sdpa|attn", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|wgmma|dot", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|transpose", re.I)),
    ("fusion", re.compile(r"fusion|reduce|loop_|input_|scatter|gather", re.I)),
]


def family(name: str) -> str:
    return next((f for f, pat in FAMILIES if pat.search(name)), "other")


def summarize(trace_dir: str, steps: int, top: int) -> None:
    path = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True) +
                  glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True))[-1]
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    by_name, by_family = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "GPU" not in procs.get(e.get("pid"), ""):
            continue
        if not threads.get((e["pid"], e["tid"]), "").lower().startswith("stream"):
            continue
        by_name[e["name"]] += e["dur"] / 1e3 / steps  # us -> ms per step
        by_family[family(e["name"])] += e["dur"] / 1e3 / steps
    total = sum(by_family.values())
    if not total:  # an unexpected trace layout: show what is there
        print("no GPU stream events; processes:", sorted(set(procs.values()))[:20])
        print("threads:", sorted(set(threads.values()))[:40])
        return
    print(f"{path}\nGPU kernel time per step: {total:.1f} ms")
    for fam, ms in by_family.most_common():
        print(f"  {fam:<12}{ms:8.1f} ms {100 * ms / total:5.1f}%")
    for name, ms in by_name.most_common(top):
        print(f"  {ms:8.2f} ms  {name[:110]}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    summarize(a.dir, a.steps, a.top)
