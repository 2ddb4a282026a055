"""Pipeline stages `mid` and `sft` (STAGES.md §2-3): the parent stage's model trained on a chat mixture by
train.train_loop, with a fresh optimiser state and the stage's own schedule (config.mid / config.sft).

mid packs the mixture into rows like pretraining and reports val bits per byte; sft pads one conversation a
row, masks all but the assistant's tokens, and reports the val loss over the supervised tokens (and, where
MMLU / ARC are configured, their accuracy at config.sft.mc_eval_every).
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np

from nanochat_jax import chat_data, report, sharding, train
from nanochat_jax import checkpoint as ckpt_lib
from nanochat_jax import model as model_lib
from nanochat_jax.config import UserError
from nanochat_jax.tasks import hub, load_mixture, tasks_dir
from nanochat_jax.tasks.base import Mixture, TaskSequence

log = logging.getLogger(__name__)

PARENT = {"mid": "base", "sft": "mid"}
SHAPE_KEYS = ("depth", "aspect_ratio", "head_dim", "n_kv_head", "sequence_len")  # the rest: how it runs here
SAMPLE_CONVERSATIONS = 4  # greedy chat answers shown in the report


def _done_path(config, stage: str) -> str:
    return os.path.join(ckpt_lib.checkpoint_dir(config.base_dir, stage, config.run_name), "done.json")


def stage_done(config, stage: str) -> bool:
    """The stage wrote its done marker, and the final checkpoint it names is still there."""
    try:
        with open(_done_path(config, stage)) as f:
            final = json.load(f)["final_step"]
    except (OSError, ValueError, KeyError):
        return False
    return os.path.isdir(os.path.join(os.path.dirname(_done_path(config, stage)), str(final)))


def with_parent_shape(config, parent_config):
    """This run's config with the model's shape (and vocabulary) taken from the parent checkpoint's config."""
    config = config.copy_and_resolve_references()
    for key in SHAPE_KEYS:
        config.model[key] = parent_config.model[key]
    config.tokenizer.vocab_size = parent_config.tokenizer.vocab_size
    return config


def _val_loss_eval(mesh, model_cfg, rendered, rows: int, pad_id: int):
    """fn(params) -> {"val_loss": mean loss over the supervised tokens of the rendered val conversations}."""
    per_token_loss = train.loss_evaluator(mesh, model_cfg)
    batches = []
    for i in range(0, len(rendered), rows):
        chunk = rendered[i:i + rows]
        batch = chat_data.padded_batch(chunk, pad_id, chat_data.row_bucket(chunk, model_cfg.sequence_len))
        pad = rows - len(chunk)  # the last batch filled with unsupervised rows, so it splits over the devices
        batches.append({k: np.pad(v, [(0, pad), (0, 0)], constant_values=-1 if k == "targets" else 0)
                        for k, v in batch.items()})

    def evaluate(params):
        total, count = 0.0, 0
        for b in batches:
            total += float(per_token_loss(params, b["inputs"], b["targets"]).sum())
            count += int((b["targets"] != -1).sum())
        return {"val_loss": total / max(count, 1)}
    return evaluate


def _mc_eval(config, model_cfg, mesh, tokenizer, section):
    """fn(params) -> {task: accuracy} of the categorical tasks in section.mc_eval_tasks (argmax over the answer
    letters, evals/chat_eval.py), on at most section.mc_eval_problems problems each. One Forward: the
    likelihood programs compile once and every evaluation swaps in the current params."""
    from evals.chat_eval import load_eval_task, parse_tasks, run_categorical
    from evals.likelihood import Forward

    tasks = {n: load_eval_task(n, section.mc_eval_problems or -1, tasks_dir(config))
             for n in parse_tasks(section.mc_eval_tasks)}
    forward = []

    def evaluate(params):
        if not forward:
            forward.append(Forward(params, model_cfg, mesh, config.eval.batch_tokens, config.eval.max_rows,
                                   tokenizer.bos_id))
        forward[0].params = jax.device_put(params, sharding.tree_shardings(params, mesh))
        return {n: correct / total for n, (correct, total) in
                ((n, run_categorical(task, forward[0], tokenizer)) for n, task in tasks.items())}
    return evaluate


def _chat_samples(params, model_cfg, tokenizer, val: TaskSequence) -> list[tuple[str, str]]:
    """A few held-out prompts and the model's greedy answers (calculator on)."""
    from nanochat_jax.engine import Engine

    n = min(SAMPLE_CONVERSATIONS, len(val))
    conversations = [val[i * len(val) // n] for i in range(n)]  # spread over the val set's tasks
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    prompts = [p for p in prompts if len(p) < model_cfg.sequence_len - 64]
    if not prompts:
        return []
    rows, _ = Engine(params, model_cfg, tokenizer).generate_batch(prompts, max_tokens=64, temperature=0.0,
                                                                  use_tools=True)
    return [(tokenizer.decode(p[1:]), tokenizer.decode(r)) for p, r in zip(prompts, rows)]


def run_stage(config, stage: str) -> dict:
    sharding.maybe_initialize_distributed()
    ckpt_lib.use_compile_cache(config.base_dir)
    section, parent = config[stage], PARENT[stage]
    if not section.mixture:
        raise UserError(f"config.{stage}.mixture is empty: name the tasks to train on (see configs/d20.py)")
    tokenizer = train._load_tokenizer(config)
    params, parent_config, meta = ckpt_lib.restore_model(config.base_dir, parent)
    ckpt_lib.check_tokenizer(meta, tokenizer.hash, f"{parent} step {meta['step']}")
    config = with_parent_shape(config, parent_config)
    model_cfg = model_lib.ModelConfig.from_config(config)
    mesh = sharding.make_mesh(config.mesh)
    T, rows_per_micro = model_cfg.sequence_len, section.device_batch_size * mesh.size
    pi, pc = jax.process_index(), jax.process_count()
    t0 = time.time()
    counts, val_counts = chat_data.RenderCounts(), chat_data.RenderCounts()
    bad_rows_before = dict(hub.BAD_ROWS)
    mixture = Mixture(load_mixture(section.mixture, tasks_dir(config)), seed=42)
    val = TaskSequence(load_mixture(section.val_mixture, tasks_dir(config))) if section.val_mixture else None
    counts["bad_dataset_rows"] = sum(hub.BAD_ROWS.values()) - sum(bad_rows_before.values())

    if stage == "mid":
        tokens, mask = chat_data.render_stream(tokenizer, mixture, T, counts)
        rows_per_step = section.total_batch_size // T
        source = chat_data.PackedChatSource(tokens, mask, T, rows_per_step, section.supervise, pi, pc)
        evals = []
        if val is not None:
            val_rows, _ = chat_data.packed_rows(*chat_data.render_stream(tokenizer, val, T, val_counts), T)
            n = max(1, min(len(val_rows), section.eval_tokens // T) // rows_per_micro) * rows_per_micro
            val_rows = np.resize(val_rows, (n, T + 1))  # repeats the split if it is shorter than one batch
            evals.append((section.eval_every, train.bpb_eval(mesh, model_cfg, tokenizer,
                                                             np.split(val_rows, n // rows_per_micro))))
        val_key = "val_bpb"
    else:
        rendered = [r for r in (chat_data.render(tokenizer, c, T + 1, counts) for c in mixture) if r is not None]
        rows_per_step = section.total_batch_size
        pad_id = tokenizer.encode_special("<|assistant_end|>")
        source = chat_data.PaddedChatSource(rendered, rows_per_step, pad_id, T, pi, pc)
        evals = []
        if val is not None:
            val_rendered = [r for r in (chat_data.render(tokenizer, val[i], T + 1, val_counts)
                                        for i in range(min(len(val), section.val_conversations))) if r is not None]
            evals.append((section.eval_every, _val_loss_eval(mesh, model_cfg, val_rendered, rows_per_micro, pad_id)))
        if section.mc_eval_tasks:
            evals.append((section.mc_eval_every, _mc_eval(config, model_cfg, mesh, tokenizer, section)))
        val_key = "val_loss"
    n_iter = section.num_iterations if section.num_iterations > 0 else source.steps_per_epoch
    log.info("%s: %s conversations (%s), %d steps of %d rows (%d steps make one epoch)", stage,
             f"{counts['rendered']:,}", section.mixture, n_iter, rows_per_step, source.steps_per_epoch)
    if sum(v for k, v in counts.items() if k != "rendered"):
        log.warning("%s: %s", stage, counts.markdown("the training mixture").strip())

    out = train.train_loop(config, stage, section, tokenizer, source, n_iter, rows_per_step, evals,
                           model_cfg=model_cfg, init_params=params, mesh=mesh)
    with open(_done_path(config, stage), "w") as f:
        json.dump({"final_step": n_iter}, f)

    os.makedirs(report.report_dir(config.base_dir), exist_ok=True)
    png = train.loss_curve_png(out["metrics_path"], os.path.join(report.report_dir(config.base_dir),
                                                                 f"{stage}_loss.png"), val_key)
    samples = _chat_samples(out["params"], model_cfg, tokenizer, val) if val is not None else []
    metrics = {"steps": n_iter, "epochs": n_iter / source.steps_per_epoch, "conversations": counts["rendered"],
               "bad_conversations_skipped": counts["skipped_invalid"] + counts["bad_dataset_rows"],
               "conversations_truncated": counts["truncated"],
               "calculator_refused_calls": counts["calculator_refused"],
               "seconds_per_step": out["seconds_per_step"], "wall_seconds": time.time() - t0}
    history = out["history"].get(val_key)
    if history:
        metrics[f"{val_key}_start"], metrics[val_key] = history[0][1], history[-1][1]
    title = {"mid": "Midtraining", "sft": "Supervised fine-tuning"}[stage]
    md = (f"## {title}\n\nFrom the {parent} checkpoint (step {meta['step']}); mixture `{section.mixture}`.\n\n"
          f"{report.format_metrics(metrics)}\n\n{counts.markdown('the training mixture')}"
          f"{val_counts.markdown('the validation set') if val is not None else ''}\n![loss]({os.path.basename(png)})\n\n"
          + ("Held-out prompts, greedy answers:\n\n" + "\n".join(f"- `{p!r}` → `{a!r}`" for p, a in samples) + "\n"
             if samples else ""))
    print(f"{stage} checkpoint: {out['checkpoint']}")
    return dict(outputs=[out["checkpoint"], png], metrics=metrics, report=md)
