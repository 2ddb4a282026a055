"""The chat evals (STAGES.md §5) of a chat model: ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee.

    python -m evals.chat_eval --stage sft -a ARC-Easy,GSM8K [--max-problems N] [--step N] [--base_dir DIR]

Categorical tasks: each `render_for_completion` prompt once through the model in bucketed, right-padded
batches (evals/likelihood.py); the answer is the letter whose token has the largest logit at the prompt's
last position. Generative tasks: one greedy sample per problem (<= max_new_tokens, calculator on) through
the engine's on-device driver, in fixed-size batches; `task.score` judges the reply. ChatCORE is the mean
centred accuracy (baseline 0.25 for the 4-letter tasks, 0 for the rest) of the card's five tasks, and
ChatCORE_6 adds SpellingBee. Pipeline stages: `chat_eval` (the final sft checkpoint), `rl_eval` (rl).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from evals.core import _write_json, cli_logging, load_checkpoint, make_forward, results_path
from nanochat_jax.config import UserError
from nanochat_jax.download import DownloadError

log = logging.getLogger(__name__)

# metric name -> (registry name, split, centring baseline, the card's SFT number or None)
TASKS = {
    "ARC-Easy": ("arc_easy", "test", 0.25, 0.3876),
    "ARC-Challenge": ("arc_challenge", "test", 0.25, 0.2807),
    "MMLU": ("mmlu", "test", 0.25, 0.3151),
    "GSM8K": ("gsm8k", "test", 0.0, 0.0455),
    "HumanEval": ("humaneval", "test", 0.0, 0.0854),
    "SpellingBee": ("spelling_bee", "test", 0.0, None),
    "Arithmetic": ("arithmetic", "test", 0.0, None),  # synthetic calculator arithmetic: offline
}
CHATCORE_5 = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")
CHATCORE_6 = CHATCORE_5 + ("SpellingBee",)
SYNTHETIC = {"SpellingBee": 256, "Arithmetic": 256}  # problems when no limit is given
CARD_CHATCORE = 0.0884
SOURCE_STAGE = {"chat_eval": "sft", "rl_eval": "rl"}


def parse_tasks(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise UserError(f"unknown chat eval task(s) {unknown or spec!r}; known: {', '.join(TASKS)}")
    return names


def load_eval_task(name: str, max_problems: int = -1, data_dir: str | None = None):
    from nanochat_jax.tasks import load_task

    registry, split, _, _ = TASKS[name]
    limit = max_problems if max_problems > 0 else SYNTHETIC.get(name)
    return load_task(registry, split=split, limit=limit, data_dir=data_dir)


def run_categorical(task, forward, tokenizer) -> tuple[int, int]:
    """-> (correct, total): argmax over the answer letters' logits after each prompt."""
    convs = [task[i] for i in range(len(task))]
    prompts = [tokenizer.render_for_completion(c) for c in convs]
    candidates = []
    for c in convs:
        ids = [tokenizer.encode(letter)[0] for letter in c["letters"]]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{task.name}: answer letters {c['letters']} share a first token")
        candidates.append(ids)
    picks = forward.choose(prompts, candidates)
    correct = sum(c["letters"][p] == c["answer"] for c, p in zip(convs, picks))
    return correct, len(convs)


def run_generative(task, engine, tokenizer, max_new_tokens: int, batch_size: int) -> tuple[int, int, int, int]:
    """-> (correct, total, tokens generated, prompts too long): one greedy reply per problem, calculator on.
    A prompt that leaves the model no room to answer in its context is scored wrong and counted."""
    convs = [task[i] for i in range(len(task))]
    prompts = [tokenizer.render_for_completion(c) for c in convs]
    fits = [i for i, p in enumerate(prompts) if len(p) < engine.cfg.sequence_len]
    rows, _ = engine.generate_batch([prompts[i] for i in fits], max_tokens=max_new_tokens, temperature=0.0,
                                    use_tools=True, batch_size=batch_size) if fits else ([], [])
    correct = sum(bool(task.score(convs[i], tokenizer.decode(r))) for i, r in zip(fits, rows))
    return correct, len(convs), sum(map(len, rows)), len(convs) - len(fits)


def evaluate(names, load, forward, engine, tokenizer, max_new_tokens: int, batch_size: int) -> dict:
    """names: metric names; load(name) -> Task (or raises OSError/UserError: not run). -> dict(results, ...)."""
    results = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            task = load(name)
        except (OSError, UserError, ImportError, DownloadError) as e:  # offline, or the task is not there
            results[name] = dict(status=f"not run ({e})")
            log.warning("chat eval %s: not run (%s)", name, e)
            continue
        if task.eval_type == "categorical":
            correct, total = run_categorical(task, forward, tokenizer)
            extra = {}
        elif task.eval_type == "generative":
            correct, total, n_tokens, too_long = run_generative(task, engine, tokenizer, max_new_tokens, batch_size)
            extra = dict(tokens_generated=n_tokens, prompts_too_long=too_long)
            if too_long:
                log.warning("chat eval %s: %d of %d prompts do not fit the %d-token context: scored wrong", name,
                            too_long, total, engine.cfg.sequence_len)
        else:
            raise UserError(f"{name}: task {task.name} has no eval_type")
        seconds = time.perf_counter() - t0
        acc = correct / max(total, 1)
        b = TASKS[name][2]
        results[name] = dict(status="ok", kind=task.eval_type, accuracy=acc, centered=(acc - b) / (1 - b),
                             correct=correct, problems=total, seconds=seconds, **extra)
        log.info("chat eval %-14s %s acc %.4f (%d/%d) %.1f problems/s", name, task.eval_type, acc, correct, total,
                 total / max(seconds, 1e-9))
    ok = {n: r for n, r in results.items() if r["status"] == "ok"}
    out = dict(results=results)
    for key, members in (("ChatCORE", CHATCORE_5), ("ChatCORE_6", CHATCORE_6)):
        if all(m in ok for m in members):
            out[key] = sum(ok[m]["centered"] for m in members) / len(members)
    return out


def markdown(ev: dict, title: str, note: str = "") -> str:
    lines = [f"## {title}", "", note, "" if note else None,
             "| task | kind | problems | accuracy | centred | card (SFT) | problems/s |", "|---|---|---:|---:|---:|---:|---:|"]
    lines = [line for line in lines if line is not None]
    for name, r in ev["results"].items():
        card = TASKS[name][3]
        card = "-" if card is None else f"{card:.4f}"
        if r["status"] != "ok":
            lines.append(f"| {name} | - | - | {r['status']} | - | {card} | - |")
            continue
        lines.append(f"| {name} | {r['kind']} | {r['problems']:,} | {r['accuracy']:.4f} | {r['centered']:+.4f} | "
                     f"{card} | {r['problems'] / max(r['seconds'], 1e-9):,.1f} |")
    for name, r in ev["results"].items():
        if r.get("prompts_too_long"):
            lines.append(f"\n{name}: {r['prompts_too_long']} of {r['problems']} prompts do not fit the model's context "
                         "(scored wrong).")
    for key, members in (("ChatCORE", CHATCORE_5), ("ChatCORE_6", CHATCORE_6)):
        card = f" (card: {CARD_CHATCORE})" if key == "ChatCORE" else ""
        value = f"**{ev[key]:.4f}**" if key in ev else f"not computed (needs {', '.join(members)})"
        lines.append(f"\n{key} ({len(members)} tasks){card}: {value}")
    return "\n".join(lines) + "\n"


def run(base_dir: str, stage: str, step: int | None, names, max_problems: int, config=None) -> dict:
    from nanochat_jax.engine import Engine
    from nanochat_jax.tasks import tasks_dir

    params, model_cfg, ckpt_config, tokenizer, meta = load_checkpoint(base_dir, stage, step)
    config = config or ckpt_config
    forward = make_forward(params, model_cfg, config, tokenizer)
    engine = Engine(params, model_cfg, tokenizer)
    t0 = time.perf_counter()
    ev = evaluate(names, lambda n: load_eval_task(n, max_problems, tasks_dir(config)), forward, engine, tokenizer,
                  config.eval.max_new_tokens, config.eval.generate_batch_size)
    return dict(ev, stage=stage, step=meta["step"], max_problems=max_problems, seconds=time.perf_counter() - t0)


def _not_configured(names) -> str:
    missing = [n for n in CHATCORE_6 if n not in names]
    return (f"Not run (not in config.eval.chat_tasks; they need a download this config does not make): "
            f"{', '.join(missing)}." if missing else "")


def stage_done(config, stage: str) -> bool:
    """The results file exists for the latest checkpoint of the stage it evaluates, with today's settings."""
    import json

    from nanochat_jax.checkpoint import checkpoint_dir
    try:
        with open(results_path(config.base_dir, stage)) as f:
            done = json.load(f)
        steps = [int(s) for s in os.listdir(checkpoint_dir(config.base_dir, SOURCE_STAGE[stage], config.run_name))
                 if s.isdigit()]
    except (OSError, ValueError):
        return False
    compare = [s.strip() for s in config.eval.chat_compare.split(",") if s.strip()] if stage == "chat_eval" else []
    return bool(steps) and done.get("step") == max(steps) and done.get("tasks") == config.eval.chat_tasks \
        and done.get("compare", []) == compare \
        and done.get("max_problems") == config.eval.chat_max_problems


def _require_finished(config, source: str) -> None:
    """The training stage must be complete before its eval runs (an eval never races a run's last save)."""
    import importlib

    from nanochat_jax.config import STAGES
    try:
        module = importlib.import_module(STAGES[source])
    except ModuleNotFoundError:  # that stage's module is not in this tree: the checkpoint's own steps decide
        log.warning("%s: cannot ask %s whether %s finished; evaluating its latest complete checkpoint",
                    source, STAGES[source], source)
        return
    if not module.stage_done(config, source):
        raise UserError(f"{source} has not finished (no final checkpoint yet): run it first")


def run_stage(config, stage: str) -> dict:
    """Pipeline stages `chat_eval` (the sft checkpoint) and `rl_eval` (the rl one), once that stage is done:
    its latest complete checkpoint (Orbax lists a step only once it is fully on disk)."""
    names = parse_tasks(config.eval.chat_tasks)
    if SOURCE_STAGE[stage] == "rl" and not config.rl.enabled:
        return dict(outputs=[], metrics={}, report="## Chat evals (rl)\n\nNot run: RL is off (`config.rl.enabled`).\n")
    _require_finished(config, SOURCE_STAGE[stage])
    ev = run(config.base_dir, SOURCE_STAGE[stage], None, names, config.eval.chat_max_problems, config)
    path = results_path(config.base_dir, stage)
    metrics = _metrics(ev)
    report = markdown(ev, f"Chat evals ({SOURCE_STAGE[stage]}, step {ev['step']})", _not_configured(names))
    # the earlier stages on the same problems, for the report's BASE / MID columns (chat_eval only)
    compare = [s.strip() for s in config.eval.chat_compare.split(",") if s.strip()] if stage == "chat_eval" else []
    for earlier in compare:
        try:
            ev_earlier = run(config.base_dir, earlier, None, names, config.eval.chat_max_problems, config)
        except UserError as e:  # e.g. a model imported at sft has no earlier stages: the comparison is optional
            log.warning("chat eval of %s for comparison: not run (%s)", earlier, e)
            report += f"\nChat evals of {earlier} for comparison: not run ({e}).\n"
            continue
        metrics.update({f"{earlier}/{k}": v for k, v in _metrics(ev_earlier).items()})
        report += "\n" + markdown(ev_earlier, f"Chat evals ({earlier}, step {ev_earlier['step']}), for comparison")
    _write_json(path, dict(ev, tasks=config.eval.chat_tasks, compare=compare))
    return dict(outputs=[path], metrics=metrics, report=report)


def _metrics(ev: dict) -> dict:
    metrics = {n: r["accuracy"] for n, r in ev["results"].items() if r["status"] == "ok"}
    metrics.update({k: ev[k] for k in ("ChatCORE", "ChatCORE_6") if k in ev})
    return metrics


def main(argv=None) -> int:
    from nanochat_jax.config import base_config

    ap = argparse.ArgumentParser(prog="python -m evals.chat_eval", description=__doc__.split("\n")[0])
    ap.add_argument("--stage", default="sft", help="checkpoint stage to evaluate (sft, rl, mid)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ap.add_argument("-a", "--tasks", default=base_config().eval.chat_tasks, help=f"comma-separated: {', '.join(TASKS)}")
    ap.add_argument("--max-problems", type=int, default=-1, help="problems per task (-1: all)")
    ap.add_argument("--base_dir", default=os.environ.get("NANOCHAT_BASE_DIR", "runs/tiny"))
    args = ap.parse_args(argv)
    cli_logging()
    try:
        if args.max_problems == 0 or args.max_problems < -1:
            raise UserError(f"--max-problems must be > 0 or -1, got {args.max_problems}")
        ev = run(args.base_dir, args.stage, args.step, parse_tasks(args.tasks), args.max_problems)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = results_path(args.base_dir, f"chat_{args.stage}")
    _write_json(path, ev)
    print(markdown(ev, f"Chat evals ({args.stage}, step {ev['step']})"))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
