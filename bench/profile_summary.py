"""Where a profiled step spends its GPU time: kernels grouped into families, from a perfetto trace.

    python bench/profile_summary.py DIR [--steps 2] [--top 25] [--hlo FILE] [--process GPU:0]

DIR is what `jax.profiler.trace(DIR, create_perfetto_trace=True)` wrote (bench/train_mfu.py --profile).
Sums kernel durations on the GPU's stream rows per kernel name and per family (matmul, attention,
elementwise/reduction fusions, copies), divided by --steps, and prints the largest. With --hlo (the
optimised HLO text: train_mfu.py --profile writes step.hlo.txt, XLA_FLAGS=--xla_dump_to writes
*after_optimizations.txt) each fusion is also described by the ops it fuses and its output shape,
and kernels are grouped by that description, so the 20 per-layer copies of one fusion add up.
On several GPUs, --process picks one device's rows (a substring of its process name); the collectives
(NCCL kernels) are also summed with how much of their time other kernels ran beside them.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re

FAMILIES = [  # first match wins
    ("collective", re.compile(r"nccl", re.I)),
    ("attention", re.compile(r"cudnn|flash|fmha|sdpa|attn", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|wgmma|dot", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|transpose", re.I)),
    ("fusion", re.compile(r"fusion|reduce|loop_|input_|scatter|gather", re.I)),
]


def family(name: str) -> str:
    return next((f for f, pat in FAMILIES if pat.search(name)), "other")


_FUSION = re.compile(r"^\s*(?:ROOT )?%?([\w.-]+) = (.+?) fusion\(.*kind=(k\w+).*calls=%?([\w.-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.-]+) .*\{\s*$")
_OP = re.compile(r"= [^=]*? ([a-z][\w-]*)\(")
_BORING = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "broadcast", "reshape", "iota"}


def describe_fusions(hlo_path: str) -> dict:
    """fusion instruction name (= kernel name) -> 'kind ops -> output shape' from optimised HLO text."""
    ops_of, fusions, current = {}, {}, None
    with open(hlo_path) as f:
        for line in f:
            m = _COMPUTATION.match(line)
            if m and "=" not in line.split("{")[0]:
                current = m.group(1)
                ops_of[current] = []
                continue
            if current is None:
                continue
            m = _FUSION.match(line)
            if m:
                fusions[m.group(1)] = (m.group(3), m.group(4), m.group(2).split("{")[0][:60])
            op = _OP.search(line)
            if op and op.group(1) not in _BORING:
                ops_of[current].append(op.group(1))
    return {name.replace(".", "_"): f"{kind[1:].lower()} {'+'.join(sorted(set(ops_of.get(comp, []))))[:70]} -> {shape}"
            for name, (kind, comp, shape) in fusions.items()}


def idle_gaps(kernels: list, steps: int) -> None:
    """The GPU's idle time between the first and the last kernel (all streams merged), by gap size, and
    the largest gaps with the kernels on either side: launch gaps between many small kernels look
    different from a host round trip."""
    kernels.sort()
    gaps, end, prev = [], kernels[0][1], kernels[0][2]
    for start, stop, name in kernels[1:]:
        if start > end:
            gaps.append((start - end, prev, name))
        if stop > end:
            end, prev = stop, name
    span = (end - kernels[0][0]) / 1e3 / steps
    idle = sum(g for g, _, _ in gaps) / 1e3 / steps
    print(f"  span {span:.1f} ms per step, GPU idle {idle:.1f} ms in {len(gaps) / steps:.0f} gaps per step; "
          f"{len(kernels) / steps:.0f} kernels per step")
    for lo, hi in ((0, 10), (10, 100), (100, 1e9)):
        sel = [g for g, _, _ in gaps if lo <= g < hi]
        print(f"    gaps of {lo}-{hi if hi < 1e9 else 'inf'} us: {len(sel) / steps:6.0f} per step, "
              f"{sum(sel) / 1e3 / steps:6.2f} ms")
    for g, before, after in sorted(gaps, reverse=True)[:6]:
        print(f"    {g / 1e3:7.3f} ms after {before[:50]} before {after[:50]}")


def overlapped(intervals: list, others: list) -> float:
    """Total length of `intervals` covered by the union of `others` (both lists of (start, stop, ...))."""
    merged = []
    for start, stop, *_ in sorted(others):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return sum(max(0, min(stop, b) - max(start, a)) for start, stop, *_ in intervals for a, b in merged
               if a < stop and b > start)


def summarize(trace_dir: str, steps: int, top: int, hlo: str | None = None, process: str = "GPU") -> None:
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
    by_name, by_family, kernels = collections.Counter(), collections.Counter(), []
    for e in events:
        if e.get("ph") != "X" or process not in procs.get(e.get("pid"), ""):
            continue
        if not threads.get((e["pid"], e["tid"]), "").lower().startswith("stream"):
            continue
        by_name[e["name"]] += e["dur"] / 1e3 / steps  # us -> ms per step
        by_family[family(e["name"])] += e["dur"] / 1e3 / steps
        kernels.append((e["ts"], e["ts"] + e["dur"], e["name"]))
    total = sum(by_family.values())
    if not total:  # an unexpected trace layout: show what is there
        print("no GPU stream events; processes:", sorted(set(procs.values()))[:20])
        print("threads:", sorted(set(threads.values()))[:40])
        return
    print(f"{path}\nGPU kernel time per step: {total:.1f} ms")
    for fam, ms in by_family.most_common():
        print(f"  {fam:<12}{ms:8.1f} ms {100 * ms / total:5.1f}%")
    idle_gaps(kernels, steps)
    collectives = [k for k in kernels if "nccl" in k[2].lower()]
    if collectives:
        rest = [k for k in kernels if "nccl" not in k[2].lower()]
        busy = sum(stop - start for start, stop, _ in collectives)
        print(f"  collectives {busy / 1e3 / steps:.1f} ms per step, "
              f"{overlapped(collectives, rest) / 1e3 / steps:.1f} ms of it beside other kernels")
    if hlo:
        described = describe_fusions(hlo)
        groups, counts = collections.Counter(), collections.Counter()
        for name, ms in by_name.items():
            key = described.get(name.split(":")[0], name)
            groups[key] += ms
            counts[key] += 1
        for key, ms in groups.most_common(top):
            print(f"  {ms:8.3f} ms {counts[key]:>4}x  {key[:140]}")
        return
    for name, ms in by_name.most_common(top):
        print(f"  {ms:8.2f} ms  {name[:110]}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--hlo", default=None, help="optimised HLO text of the traced program")
    ap.add_argument("--process", default="GPU", help="only trace processes whose name holds this (GPU:0: one device)")
    a = ap.parse_args()
    summarize(a.dir, a.steps, a.top, a.hlo, a.process)
