"""The one training loop (base now; mid and SFT differ only in data and schedule) on a device mesh.

`train_step(params, opt_state, batch_AxBxT1)` is jitted once with the state donated; the A
micro-batches of a step run inside it as a `lax.scan` (gradient accumulation), so the total batch
(524,288 tokens for d20) is the same on 1, 8 fake or 8 real devices. The loop saves Orbax
checkpoints, resumes from the latest complete one, and saves on SIGTERM / SIGINT before exiting.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from nanochat_jax import checkpoint as ckpt_lib
from nanochat_jax import data as data_lib
from nanochat_jax import model as model_lib
from nanochat_jax import optim, report, sharding
from nanochat_jax.config import ConfigError, UserError
from nanochat_jax.tokenizer import Tokenizer, tokenizer_dir

log = logging.getLogger(__name__)

# dense bf16 peak per chip, for MFU (SPEC/PERF use 989e12 for the H100)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}
SAMPLE_PROMPTS = ("The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is")


def num_iterations(train_cfg, model_cfg) -> int:
    """SPEC §4: an explicit count, else target FLOPs, else Chinchilla tokens:params."""
    if train_cfg.num_iterations > 0:
        return train_cfg.num_iterations
    if train_cfg.target_flops > 0:
        return max(1, round(train_cfg.target_flops / (model_lib.estimate_flops(model_cfg) * train_cfg.total_batch_size)))
    n_params = model_lib.param_counts(model_cfg)["total"]
    return max(1, train_cfg.target_param_data_ratio * n_params // train_cfg.total_batch_size)


def grad_accum_steps(train_cfg, seq_len: int, n_devices: int) -> int:
    rows_per_micro = train_cfg.device_batch_size * n_devices
    tokens_per_micro = rows_per_micro * seq_len
    if train_cfg.total_batch_size % tokens_per_micro:
        raise ConfigError(f"config.train.total_batch_size={train_cfg.total_batch_size} must be a multiple of "
                          f"device_batch_size x devices x sequence_len = {train_cfg.device_batch_size} x {n_devices} x "
                          f"{seq_len} = {tokens_per_micro}")
    return train_cfg.total_batch_size // tokens_per_micro


def make_train_step(model_cfg, optimizer):
    def train_step(params, opt_state, batch):
        """batch: inputs, targets (-1 = ignored), weights, each (A, B, T): A micro-batches of one step. The loss
        is sum(weights x token loss) / (supervised tokens of the whole step), on any mesh and any A."""
        count = jnp.maximum(jnp.sum(batch["targets"] != -1), 1).astype(jnp.float32)

        def micro_step(grad_sum, micro):
            (loss, _), grads = jax.value_and_grad(model_lib.loss_fn, has_aux=True)(
                params, model_cfg, micro["inputs"], micro["targets"], micro["weights"] / count)
            return jax.tree.map(jnp.add, grad_sum, grads), loss

        grads, losses = jax.lax.scan(micro_step, jax.tree.map(jnp.zeros_like, params), batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": jnp.sum(losses), "grad_norm": optax.tree.norm(grads)}
    return train_step


def build_step(model_cfg, train_cfg, n_iter: int, mesh):
    """The jitted step on `mesh` and how its state is laid out, as train_loop and bench/train_mfu.py use
    them -> (step_fn, init_fn(key, params=None) -> sharded (params, opt_state) (fresh params, or the given
    ones with a fresh optimiser state), abstract state, state shardings, batch sharding of the (A, B, T)
    arrays of a batch)."""
    optimizer = optim.build_optimizer(train_cfg, model_cfg, n_iter)

    def init_state(key, params=None):
        params = model_lib.init_params(model_cfg, key) if params is None else params
        return params, optimizer.init(params)

    abstract = jax.eval_shape(init_state, jax.random.PRNGKey(0))
    state_shardings = sharding.tree_shardings(abstract, mesh)
    batch_shard = sharding.batch_sharding(mesh, ndim=3, batch_dim=1)
    step_fn = jax.jit(sharding.traced_on(mesh, make_train_step(model_cfg, optimizer)), donate_argnums=(0, 1),
                      in_shardings=(*state_shardings, batch_shard),
                      out_shardings=(*state_shardings, sharding.replicated(mesh)))
    return step_fn, jax.jit(init_state, out_shardings=state_shardings), abstract, state_shardings, batch_shard


def rows_batch(rows_BxT1: np.ndarray) -> dict:
    """Packed rows of T+1 tokens (base, mid) -> a training batch: every target supervised with weight 1."""
    return dict(inputs=rows_BxT1[:, :-1], targets=rows_BxT1[:, 1:], weights=np.ones(rows_BxT1[:, 1:].shape, np.float32))


class PackedSource:
    """A training source over an iterator of packed (rows, T+1) token arrays (data.make_train_iterator)."""

    def __init__(self, rows_iter):
        self.rows_iter = rows_iter

    def next_batch(self, params) -> tuple[dict, dict]:
        return rows_batch(next(self.rows_iter)), {}

    def get_state(self) -> dict:
        return self.rows_iter.get_state()

    def set_state(self, state: dict) -> None:
        self.rows_iter.set_state(state)


def peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


class _StopSignal:
    """SIGTERM / SIGINT only raise a flag: the loop saves a checkpoint at the next step boundary."""

    def __init__(self):
        self.signum = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def _truncate_metrics(path: str, last_step: int) -> None:
    """After a resume, drop metric lines of steps that are about to be recomputed."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        # a line without its newline was cut by a kill mid-write
        keep = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(keep)


@functools.partial(jax.jit, static_argnums=1)
def _logits_at(params, model_cfg, tokens_1xT, i):
    return model_lib.logits_fn(params, model_cfg, tokens_1xT)[0, i]


def greedy_samples(params, model_cfg, tokenizer, prompts=SAMPLE_PROMPTS, max_tokens: int = 16) -> list[str]:
    """A few greedy continuations (a fixed (1, T) window: one compile per model for the whole run, no KV cache
    needed here)."""
    T = model_cfg.sequence_len
    logits_at = functools.partial(_logits_at, model_cfg=model_cfg)
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, prepend_bos=True)[-(T - max_tokens):]
        window = np.zeros((1, T), np.int32)
        window[0, :len(ids)] = ids
        n = len(ids)
        for _ in range(max_tokens):
            window[0, n] = int(jnp.argmax(logits_at(params, tokens_1xT=window, i=n - 1)))
            n += 1
        out.append(prompt + tokenizer.decode(window[0, len(ids):n].tolist()))
    return out


def loss_evaluator(mesh, model_cfg):
    """-> per_token_loss(params, inputs_BxT, targets_BxT) -> numpy (B, T) losses, jitted on `mesh` (rows
    sharded over the data axes; B must divide by them)."""
    fn = jax.jit(sharding.traced_on(mesh, lambda p, x, y: model_lib.loss_fn(p, model_cfg, x, y)[1]))
    shard = sharding.batch_sharding(mesh, ndim=2)
    return lambda params, x, y: np.asarray(fn(params, sharding.global_batch(x, shard), sharding.global_batch(y, shard)))


def bpb_eval(mesh, model_cfg, tokenizer, val_batches):
    """An evaluation: val bits per byte of packed (B, T+1) rows -> fn(params) -> {"val_bpb": float}."""
    per_token_loss = loss_evaluator(mesh, model_cfg)
    token_bytes = tokenizer.token_bytes()
    return lambda params: {"val_bpb": data_lib.evaluate_bpb(
        lambda rows: per_token_loss(params, rows[:, :-1], rows[:, 1:]), val_batches, token_bytes)}


def train_loop(config, stage: str, train_cfg, tokenizer, source, n_iter: int, rows_per_step: int, evals=(),
               model_cfg=None, init_params=None, mesh=None) -> dict:
    """Train `stage` for n_iter steps of `rows_per_step` rows, resuming from its latest checkpoint.

    source: next_batch(params) -> (dict of inputs/targets/weights, each (rows_per_step / processes, T) numpy,
    dict of scalar metrics to log), get_state() / set_state() (saved in every checkpoint). evals: (every, fn)
    pairs, fn(params) -> dict of metrics, run at step 0 (unless resumed), every `every` steps and at the end.
    model_cfg defaults to the config's model; init_params (e.g. the parent stage's) replace a fresh init;
    `mesh` defaults to config.mesh over all devices (evals must run on the same mesh). Nothing here depends on
    which stage this is."""
    mesh = mesh or sharding.make_mesh(config.mesh)
    model_cfg = model_cfg or model_lib.ModelConfig.from_config(config)
    if model_cfg.vocab_size != tokenizer.vocab_size:
        raise UserError(f"config.tokenizer.vocab_size={model_cfg.vocab_size} but the tokenizer on disk has "
                        f"{tokenizer.vocab_size} tokens: retrain the tokenizer (--stages=tokenizer --force)")
    rows_per_micro = train_cfg.device_batch_size * mesh.size
    if rows_per_step % rows_per_micro:
        raise ConfigError(f"{stage}: {rows_per_step} rows a step must be a multiple of device_batch_size x devices "
                          f"= {train_cfg.device_batch_size} x {mesh.size}")
    accum = rows_per_step // rows_per_micro
    key = jax.random.PRNGKey(config.seed)
    step_fn, init_fn, abstract, state_shardings, batch_shard = build_step(model_cfg, train_cfg, n_iter, mesh)
    ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(config.base_dir, stage, config.run_name),
                                 keep=train_cfg.keep_checkpoints)
    metrics_path = os.path.join(config.base_dir, "logs", f"{stage}.jsonl")
    os.makedirs(os.path.dirname(metrics_path), exist_ok=True)
    start = ckpt.latest_step()
    if start is None:
        params, opt_state = init_fn(key, init_params)
        start, history = 0, {}
        _truncate_metrics(metrics_path, -1)
    else:
        params, opt_state, train_state, meta = ckpt.restore(start, *(ckpt_lib.abstract_like(a, s) for a, s in
                                                                    zip(abstract, state_shardings)))
        ckpt_lib.check_tokenizer(meta, tokenizer.hash, f"{ckpt.directory}/{start}")
        source.set_state(train_state["data"])
        history = meta.get("history", {})
        _truncate_metrics(metrics_path, start)
        log.info("%s: resumed from step %d of %d (%s)", stage, start, n_iter, ckpt.directory)

    def save(step, params, opt_state):
        meta = dict(config=config.to_json(), tokenizer_hash=tokenizer.hash, stage=stage, step=step, history=history)
        ckpt.save(step, params, opt_state, train=dict(step=step, seed=config.seed, data=source.get_state()), meta=meta)

    def evaluate(params, step: int, record: dict) -> None:
        for every, fn in evals:
            if step % every == 0 or step == n_iter:
                for name, value in fn(params).items():
                    record[name] = value
                    if isinstance(value, (int, float)):
                        history.setdefault(name, []).append([step, value])
                    log.info("%s: step %d %s %s", stage, step, name, f"{value:.4f}" if isinstance(value, float) else value)

    flops_per_token = model_lib.estimate_flops(model_cfg)
    peak = peak_flops()
    n_params = model_lib.param_counts(model_cfg)["total"]
    log.info("%s: %s params, %d steps x %d rows (%d micro-steps of %d rows on %d devices, mesh %s)", stage,
             f"{n_params:,}", n_iter, rows_per_step, accum, rows_per_micro, mesh.size, dict(mesh.shape))
    if start == 0 and not history:
        record = {"step": 0}
        evaluate(params, 0, record)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    stop = _StopSignal()
    loss_ema, t_train, steps_timed, t_ready, tokens_timed = None, 0.0, 0, 0.0, 0
    bar = tqdm(range(start, n_iter), initial=start, total=n_iter, desc=stage, dynamic_ncols=True,
               disable=not sys.stderr.isatty() or jax.process_index() != 0)

    def finish(step, m, info, tokens, dispatched, due, metrics_file):
        """Reads one step's metrics back (waiting for it), logs them, and evaluates and saves as `due`
        says: a step with anything due is finished before the next one is dispatched (the state is donated)."""
        nonlocal loss_ema, t_train, steps_timed, t_ready, tokens_timed
        loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
        # the step ran from when the previous one finished, or from its dispatch if that came later
        dt = time.perf_counter() - max(t_ready, dispatched)
        t_ready = time.perf_counter()
        if step > start:  # the first step of a process includes compilation
            t_train, steps_timed, tokens_timed = t_train + dt, steps_timed + 1, tokens_timed + tokens
        loss_ema = loss if loss_ema is None else 0.9 * loss_ema + 0.1 * loss
        tok_s = tokens / dt
        mfu = flops_per_token * tok_s / (peak * mesh.size) if peak else float("nan")
        lrm = train_cfg.init_lr_frac * optim.lr_multiplier(step, n_iter, train_cfg.warmup_ratio,
                                                           train_cfg.warmdown_ratio, train_cfg.final_lr_frac)
        done = step + 1
        record = dict(step=done, loss=loss, loss_ema=loss_ema, lr_mult=float(lrm), grad_norm=grad_norm,
                      dt=dt, tok_s=tok_s, mfu=mfu, **info)
        if due["eval"]:
            evaluate(params, done, record)
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        status = (f"loss {loss_ema:.3f} lr {float(lrm):.3g} gn {grad_norm:.2f} {tok_s:,.0f} tok/s "
                  + (f"mfu {100 * mfu:.1f}% " if peak else "") + f"{1000 * dt:.0f} ms"
                  + "".join(f" {k} {v:.3g}" for k, v in info.items() if isinstance(v, float)))
        bar.set_postfix_str(status)
        if bar.disable and done % train_cfg.log_every == 0:  # no terminal: log lines instead of a bar
            eta = (n_iter - done) * (t_train / steps_timed if steps_timed else dt)  # the bar's ETA
            log.info("%s step %d/%d: %s eta %s", stage, done, n_iter, status,
                     time.strftime("%H:%M:%S", time.gmtime(eta)))
        if due["save"]:
            save(done, params, opt_state)
        if due["stop"]:
            ckpt.wait()
            name = signal.Signals(stop.signum).name
            print(f"\n{stage}: {name} at step {done}: checkpoint saved in {ckpt.directory}; "
                  f"rerun the same command to resume", file=sys.stderr)
            raise SystemExit(128 + stop.signum)

    def as_batch(local):
        """This process's (rows, T) arrays -> global (A, B, T) arrays on the mesh."""
        return {k: sharding.global_batch(np.asarray(v).reshape(accum, v.shape[0] // accum, -1), batch_shard)
                for k, v in local.items()}

    try:
        with open(metrics_path, "a") as metrics_file:
            pending = None  # the step dispatched before this one: read back once this one is queued, so the
            # device never waits for the host's logging and the next batch (async dispatch)
            for step in bar:
                local, info = source.next_batch(params)
                batch = as_batch(local)
                dispatched = time.perf_counter()
                params, opt_state, m = step_fn(params, opt_state, batch)
                if pending:
                    finish(*pending, metrics_file)
                done, stopping = step + 1, bool(stop.signum)
                due = dict(eval=any(done % every == 0 for every, _ in evals) or done == n_iter,
                           save=done % train_cfg.save_every == 0 or done == n_iter or stopping, stop=stopping)
                pending = (step, m, info, int(np.prod(batch["inputs"].shape)), dispatched, due)
                if any(due.values()):  # evaluation and checkpoints need this step's state: finish it first
                    finish(*pending, metrics_file)
                    pending = None
    finally:
        stop.restore()
        ckpt.close()  # waits for the last save: no evaluation after this loop runs before it is on disk
    seconds_per_step = t_train / max(steps_timed, 1)
    return dict(params=params, model_cfg=model_cfg, n_iter=n_iter, history=history, metrics_path=metrics_path,
                checkpoint=os.path.join(ckpt.directory, str(n_iter)), seconds_per_step=seconds_per_step,
                mfu=flops_per_token * tokens_timed / t_train / (peak * mesh.size) if peak and steps_timed else None)


def _load_tokenizer(config) -> Tokenizer:
    path = tokenizer_dir(config)
    if not os.path.isdir(path):
        raise UserError(f"no tokenizer in {path}: run the tokenizer stage first (--stages=tokenizer,base)")
    return Tokenizer.load(path)


def stage_done(config, stage: str = "base") -> bool:
    model_cfg = model_lib.ModelConfig.from_config(config)
    final = os.path.join(ckpt_lib.checkpoint_dir(config.base_dir, stage, config.run_name),
                         str(num_iterations(config.train, model_cfg)))
    return os.path.isdir(final)  # Orbax renames a step directory into place only once it is complete


def loss_curve_png(metrics_path: str, out_path: str, val_key: str = "val_bpb") -> str:
    """Train loss (and its EMA) and the validation metric against the step, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    steps = [r for r in records if "loss" in r]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="train loss")
    ax[0].plot([r["step"] for r in steps], [r["loss_ema"] for r in steps], lw=1.5, label="EMA")
    ax[0].set_xlabel("step"), ax[0].set_ylabel("loss (nats)"), ax[0].legend()
    val = [r for r in records if val_key in r]
    ax[1].plot([r["step"] for r in val], [r[val_key] for r in val], marker="o")
    ax[1].set_xlabel("step"), ax[1].set_ylabel(val_key.replace("_", " "))
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def run_stage(config, stage: str = "base") -> dict:
    """Pipeline stage `base`: pretrain on the corpus' train shards, evaluate on its last shard."""
    sharding.maybe_initialize_distributed()
    ckpt_lib.use_compile_cache(config.base_dir)
    bad_before = data_lib.bad_input_counts()
    tokenizer = _load_tokenizer(config)
    files = data_lib.stage_corpus(config, "base")
    model_cfg = model_lib.ModelConfig.from_config(config)
    seq_len, n_dev = config.model.sequence_len, jax.device_count()
    accum = grad_accum_steps(config.train, seq_len, n_dev)  # checks that the batch divides
    rows_per_step = config.train.total_batch_size // seq_len
    rows_iter = data_lib.make_train_iterator(files[:-1], tokenizer, batch_size=rows_per_step // jax.process_count(),
                                             seq_len=seq_len, process_index=jax.process_index(),
                                             process_count=jax.process_count(), seed=config.seed,
                                             shuffle=config.data.shuffle, num_threads=config.data.tokenizer_threads)
    val_batches = data_lib.make_val_batches(files[-1:], tokenizer, batch_size=config.train.device_batch_size * n_dev,
                                            seq_len=seq_len, num_tokens=config.train.eval_tokens)
    mesh = sharding.make_mesh(config.mesh)
    last_samples = {}

    def samples(params):
        last_samples["samples"] = greedy_samples(params, model_cfg, tokenizer)
        return dict(last_samples)

    evals = [(config.train.eval_every, bpb_eval(mesh, model_cfg, tokenizer, val_batches)),
             (config.train.sample_every, samples)]
    t0 = time.time()
    out = train_loop(config, stage, config.train, tokenizer, PackedSource(rows_iter),
                     num_iterations(config.train, model_cfg), rows_per_step, evals, model_cfg=model_cfg, mesh=mesh)
    bpb = out["history"]["val_bpb"]
    os.makedirs(report.report_dir(config.base_dir), exist_ok=True)
    png = loss_curve_png(out["metrics_path"], os.path.join(report.report_dir(config.base_dir), f"{stage}_loss.png"))
    final_samples = last_samples.get("samples") or samples(out["params"])["samples"]  # none if resumed at the end
    metrics = {"val_bpb_step0": bpb[0][1], "val_bpb_final": bpb[-1][1], "val_bpb_drop": 1 - bpb[-1][1] / bpb[0][1],
               "steps": out["n_iter"], "tokens_seen": out["n_iter"] * config.train.total_batch_size,
               "grad_accum": accum, "seconds_per_step": out["seconds_per_step"], "wall_seconds": time.time() - t0}
    if out["mfu"] is not None:
        metrics["mfu"] = out["mfu"]
    bad = data_lib.bad_input_since(bad_before)
    metrics["bad_input_skipped"] = sum(bad.values())
    if bad:
        log.warning("base: bad input skipped in the training and validation data: %s", bad)
    print("\nsamples from the base model (greedy):")
    for s in final_samples:
        print("  " + s.replace("\n", " "))
    print(f"checkpoint: {out['checkpoint']}")
    md = (f"## Base training\n\n{report.format_metrics(metrics)}\n\n"
          f"{data_lib.bad_input_markdown(bad, 'the training and validation data')}![loss]({os.path.basename(png)})\n\n"
          "Samples (greedy):\n\n" + "\n".join(f"- `{s!r}`" for s in final_samples) + "\n")
    return dict(outputs=[out["checkpoint"], png], metrics=metrics, report=md)
