"""Training throughput of the real step (model + Muon/AdamW + sharding on a mesh, one GPU by default, random tokens).

    python bench/train_mfu.py                                    # d12 b32, d20 b32, d26 b16 with the defaults
    python bench/train_mfu.py --cases d20:32 --remat none,dots_with_no_batch_dims_saveable
    python bench/train_mfu.py --cases d2:2 --seq 128 --vocab 512 --steps 3   # CPU smoke run
    python bench/train_mfu.py --cases d20:32 --mesh 1x1,4x1,1x4              # 1 GPU, then 4: data x fsdp
    python bench/train_mfu.py --cases d20:32,d26:16 --code /tmp/before,. --repeat 2   # two checkouts, interleaved

Each case runs in its own process (so peak memory is that case's alone): it builds the step with
train.py's own `build_step` (optimiser, shardings, state donated), compiles it ahead of time, runs 3
warm-up steps, then times --steps steps, each from the previous step's end to its own (the next step
is queued first, as the training loop does; --sync blocks on each step before queueing the next).
MFU = FLOPs/token (SPEC §4) x tokens/s / 989e12 (H100/H200 dense bf16) per device: with --mesh DATAxFSDP the
device batch is per device, tokens/s counts every device's rows, and peak memory is the largest device's.
With --code, each case runs once per checkout (its nanochat_jax imported from that directory), the
checkouts interleaved and the whole round repeated --repeat times, so a before/after comparison shares one
machine and its drift, and the spread of the repeats is the noise to compare against. A table is printed last.
"""
from __future__ import annotations

import argparse
import ast
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

def run_case(case: dict) -> dict:
    from nanochat_jax import xla_env
    xla_env.set_training_defaults()  # as run_pipeline.py starts
    import jax
    import numpy as np

    import nanochat_jax
    from nanochat_jax import checkpoint, sharding, train
    from nanochat_jax import model as model_lib
    from nanochat_jax.config import base_config

    if case.get("compile_cache"):
        checkpoint.use_compile_cache(case["compile_cache"])

    c = base_config()
    c.model.depth, c.model.sequence_len, c.tokenizer.vocab_size = case["depth"], case["seq"], case["vocab"]
    c.model.remat, c.model.loss_chunk = case["remat"], case["loss_chunk"]
    c.model.attention, c.model.compute_dtype = case["attention"], case["dtype"]
    c.train.device_batch_size = case["batch"]
    for override in case["set"]:  # --set model.residual_dtype=compute and the like
        key, value = override.split("=")
        section, name = key.split(".")
        c[section][name] = value if isinstance(c[section][name], str) else ast.literal_eval(value)
    c.mesh.data, c.mesh.fsdp = case["mesh"]
    n_dev = c.mesh.data * c.mesh.fsdp
    if n_dev > len(jax.devices()):
        raise SystemExit(f"mesh {c.mesh.data}x{c.mesh.fsdp} needs {n_dev} devices; this machine has {len(jax.devices())}")
    global_rows = case["batch"] * n_dev  # every device's rows of a micro-step
    c.train.total_batch_size = global_rows * case["seq"] * case["accum"]
    model_cfg = model_lib.ModelConfig.from_config(c)
    devices = jax.devices()[:n_dev]
    mesh = sharding.make_mesh(c.mesh, devices)
    step, init_fn, _, _, batch_sh = train.build_step(model_cfg, c.train, 1000, mesh)
    params, opt_state = init_fn(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, case["vocab"], (case["accum"] * global_rows, case["seq"] + 1), dtype=np.int32) for _ in range(2)]
    batches = [{k: jax.device_put(v.reshape(case["accum"], global_rows, -1), batch_sh)
                for k, v in train.rows_batch(r).items()} for r in rows]
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    # By default the next step is queued before the host waits for the last one, as train.py's loop does,
    # and a step is timed from the previous step's end to its own; --sync waits for each step in turn.
    times, pending, t_prev = [], None, None
    for i in range(3 + case["steps"]):
        t_dispatch = time.perf_counter()
        params, opt_state, m = compiled(params, opt_state, batches[i % 2])
        if case["sync"]:
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t_dispatch)
        elif pending is not None:
            jax.block_until_ready(pending)
            if t_prev is not None:
                times.append(time.perf_counter() - t_prev)
            t_prev = time.perf_counter()
        pending = m
    times = times[-case["steps"]:]  # the warm-up steps dropped
    loss = float(m["loss"])
    if case.get("profile"):  # two more steps under the profiler; bench/profile_summary.py reads the trace
        os.makedirs(case["profile"], exist_ok=True)
        with open(f"{case['profile']}/step.hlo.txt", "w") as f:  # the optimised HLO: fusion names -> ops
            f.write(compiled.as_text())
        with jax.profiler.trace(case["profile"], create_perfetto_trace=True):
            for i in range(2):
                params, opt_state, m = compiled(params, opt_state, batches[i % 2])
            jax.block_until_ready((params, opt_state, m))
    dt = statistics.median(times)
    tokens = global_rows * case["seq"] * case["accum"]
    flops_tok = model_lib.estimate_flops(model_cfg)
    peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in devices)
    return dict(case, step_ms=1e3 * dt, spread_ms=1e3 * (max(times) - min(times)), tok_s=tokens / dt,
                mfu=flops_tok * tokens / dt / (train.PEAK_FLOPS["H100"] * n_dev),
                peak_gib=peak / 2**30,
                compile_s=compile_s, loss=loss, device=jax.devices()[0].device_kind,
                source=os.path.dirname(os.path.dirname(os.path.abspath(nanochat_jax.__file__))),
                n_params=model_lib.param_counts(model_cfg)["total"], flops_per_token=flops_tok)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="d12:32,d20:32,d26:16", help="depth:device_batch, comma-separated")
    ap.add_argument("--remat", default="dots_with_no_batch_dims_saveable", help="comma-separated remat policies")
    ap.add_argument("--loss-chunk", default="256", help="comma-separated loss_chunk values (0 = full logits)")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--set", default="", help="config overrides for every case, ';'-separated; '|' separates "
                                              "variants: 'model.residual_dtype=compute|model.scan_layers=False'")
    ap.add_argument("--mesh", default="1x1", help="comma-separated DATAxFSDP meshes over the first devices")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sync", action="store_true", help="wait for each step before queueing the next")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--profile", default=None, help="trace two extra steps of each case into DIR/<case>")
    ap.add_argument("--compile-cache", default=None, help="use DIR/xla_cache as a run does (a second run loads "
                                                          "the compiled step: compare the compile column)")
    ap.add_argument("--code", default=None, help="comma-separated checkouts whose nanochat_jax each case runs with "
                                                 "(default: the one this script is in)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over the cases x checkouts")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = ap.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(json.loads(args.case))), flush=True)
        return
    rows = []
    codes = [os.path.abspath(d) for d in args.code.split(",")] if args.code else [None]
    for _, spec, code in itertools.product(range(args.repeat), args.cases.split(","), codes):
        depth, batch = spec.lstrip("d").split(":")
        for mesh, remat, chunk, variant in itertools.product(args.mesh.split(","), args.remat.split(","),
                                                             args.loss_chunk.split(","), args.set.split("|")):
            case = dict(depth=int(depth), batch=int(batch), mesh=[int(n) for n in mesh.split("x")],
                        seq=args.seq, vocab=args.vocab, remat=remat,
                        loss_chunk=int(chunk), attention=args.attention, dtype=args.dtype, accum=args.accum,
                        steps=args.steps, sync=args.sync, set=[kv for kv in variant.split(";") if kv],
                        compile_cache=args.compile_cache)
            if args.profile:
                case["profile"] = f"{args.profile}/d{depth}_{batch}_{mesh}_{remat}_{chunk}_{len(rows)}"
            case["code"] = os.path.basename(code) if code else ""
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [code, os.environ.get("PYTHONPATH")])))
            proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True,
                                  text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if lines:
                rows.append(json.loads(lines[-1][7:]))
            else:  # out of memory and the like: keep the reason, go on with the next case
                err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                rows.append(dict(case, error=err[:160]))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"\n{'code':<10}{'case':<8}{'mesh':>5} {'remat / overrides':<34}{'chunk':>6}{'step ms':>9}{'tok/s':>10}{'MFU':>7}{'peak GiB':>9}"
          f"{'compile s':>10}")
    for r in rows:
        name = ";".join([r["remat"]] + [kv.split(".")[-1] for kv in r["set"]])
        mesh = "x".join(map(str, r["mesh"]))
        head = f"{r.get('code', '')[:9]:<10}d{r['depth']}:{r['batch']:<5}{mesh:>5} {name[:33]:<34}{r['loss_chunk']:>6}"
        if "error" in r:
            print(head + "  failed: " + r["error"][:60])
        else:
            print(head + f"{r['step_ms']:>9.1f}{r['tok_s']:>10,.0f}{100 * r['mfu']:>6.1f}%{r['peak_gib']:>9.1f}"
                         f"{r['compile_s']:>10.1f}")


if __name__ == "__main__":
    main()
