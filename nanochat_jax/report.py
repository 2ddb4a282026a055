"""The run report: <base_dir>/report.md from the stages' sections, metrics and training logs.

Inputs, all optional (a stage that wrote nothing shows as "not run"):
  <base_dir>/report/<stage>.md    the stage's markdown section (write_section)
  <base_dir>/report/<stage>.json  its metrics {name: number}, plus `seconds` of wall time
  <base_dir>/logs/<stage>.jsonl   one line per training step (loss, val_bpb / val_loss, mean_reward)
report.md: a header (commit, hardware, versions, wall time, cost), the summary table of STAGES.md §7
with the model card's numbers beside ours, three plots (curves, evals against the card, RL reward)
and the sections in pipeline order.

    python -m nanochat_jax.report [--base_dir DIR] [--gpu_hour_price 3.0]
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys

from nanochat_jax.config import KNOWN_STAGES, UserError

log = logging.getLogger(__name__)

TRAIN_STAGES = ("base", "mid", "sft", "rl")
COLUMNS = ("BASE", "MID", "SFT", "RL")
# row -> {column: (stage, metric)}: where each cell of the summary table comes from
TABLE = {
    "CORE": {"BASE": ("base_eval", "CORE")},
    **{name: {"BASE": ("chat_eval", f"base/{name}"), "MID": ("chat_eval", f"mid/{name}"),
              "SFT": ("chat_eval", name), "RL": ("rl_eval", name)}
       for name in ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "Arithmetic",
                    "ChatCORE")},
    "val bpb": {"BASE": ("base", "val_bpb_final"), "MID": ("mid", "val_bpb")},
}
# the model card's numbers (SPEC.md §8): row -> {column: value}
CARD = {"CORE": {"BASE": 0.2219}, "val bpb": {"BASE": 0.81}, "ARC-Easy": {"SFT": 0.3876},
        "ARC-Challenge": {"SFT": 0.2807}, "MMLU": {"SFT": 0.3151}, "GSM8K": {"SFT": 0.0455, "RL": 0.0758},
        "HumanEval": {"SFT": 0.0854}, "ChatCORE": {"SFT": 0.0884}}
VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tiktoken", "gradio")
PLOTS = {"curves": "report_curves.png", "evals": "report_evals.png", "reward": "report_rl_reward.png"}


def report_dir(base_dir: str) -> str:
    return os.path.join(base_dir, "report")


def _write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_section(base_dir: str, stage: str, markdown: str, metrics: dict | None = None) -> str:
    """Write (atomically) the stage's section, and its metrics json if given; rebuild report.md.
    Returns the section's path."""
    os.makedirs(report_dir(base_dir), exist_ok=True)
    path = os.path.join(report_dir(base_dir), f"{stage}.md")
    _write_atomic(path, markdown.rstrip() + "\n")
    if metrics is not None:
        _write_atomic(os.path.join(report_dir(base_dir), f"{stage}.json"), json.dumps(metrics, indent=1) + "\n")
    assemble(base_dir)
    return path


def format_metrics(metrics: dict) -> str:
    rows = ["| metric | value |", "|---|---|"]
    for key, value in metrics.items():
        shown = f"{value:,.4g}" if isinstance(value, float) else (f"{value:,}" if isinstance(value, int) else value)
        rows.append(f"| {key} | {shown} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# Reading what the stages left


def load_metrics(base_dir: str) -> tuple[dict[str, dict], list[str]]:
    """-> ({stage: metrics} for the stages with a readable json, warnings for unreadable ones)."""
    out, warnings = {}, []
    for stage in KNOWN_STAGES:
        path = os.path.join(report_dir(base_dir), f"{stage}.json")
        if not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                metrics = json.load(f)
            if not isinstance(metrics, dict):
                raise ValueError("not a {name: number} object")
            out[stage] = metrics
        except (OSError, ValueError) as e:
            warnings.append(f"{path}: unreadable ({e}); stage {stage} shown as not run")
    return out, warnings


def load_log(base_dir: str, stage: str) -> tuple[list[dict], int]:
    """The stage's training log -> (records, number of malformed lines skipped)."""
    path = os.path.join(base_dir, "logs", f"{stage}.jsonl")
    records, bad = [], 0
    if os.path.exists(path):
        with open(path, errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None  # a line cut short by a killed run, most often
                if isinstance(record, dict) and "step" in record:
                    records.append(record)
                else:
                    bad += 1
    return records, bad


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        else None


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], _number(r.get(key))) for r in records]
    pts = [(s, v) for s, v in pts if v is not None]
    return [s for s, _ in pts], [v for _, v in pts]


# ----------------------------------------------------------------------------------------------
# Header and summary table


def _git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    return (sha + (" (with uncommitted changes)" if dirty else "")) if sha else "unknown (not a git checkout)"


def _gpus() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def _versions() -> str:
    found = []
    for name in VERSIONED:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join([f"python {platform.python_version()}", *found])


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


def header(base_dir: str, metrics: dict[str, dict], gpu_hour_price: float | None) -> str:
    gpus = _gpus()
    hardware = (f"{len(gpus)} x {gpus[0]}" if gpus and len(set(gpus)) == 1 else "; ".join(gpus)) if gpus else "no GPU"
    wall = sum(_number(m.get("seconds")) or 0.0 for m in metrics.values())
    timed = [s for s in KNOWN_STAGES if _number(metrics.get(s, {}).get("seconds")) is not None]
    lines = [f"- commit: `{_git_commit()}`",
             f"- hardware: {hardware}; {os.cpu_count()} CPU cores; {platform.platform()}",
             f"- versions: {_versions()}",
             f"- wall time: {_hms(wall)} over {len(timed)} timed stage(s)" + (f" ({', '.join(timed)})" if timed else "")]
    if gpu_hour_price is not None and gpus:
        lines.append(f"- cost: ${wall / 3600 * len(gpus) * gpu_hour_price:,.2f} "
                     f"({wall / 3600:.2f} h x {len(gpus)} GPU(s) x ${gpu_hour_price:g}/GPU-hour)")
    elif gpu_hour_price is not None:
        lines.append(f"- cost: n/a (no GPU on this machine; price ${gpu_hour_price:g}/GPU-hour)")
    return (f"# nanochat_jax report\n\nrun: `{os.path.abspath(base_dir)}`, assembled "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n\n" + "\n".join(lines) + "\n")


def summary_table(metrics: dict[str, dict]) -> str:
    """Rows of STAGES.md §7 x BASE / MID / SFT / RL; a cell whose stage did not run says so."""
    rows = ["| metric | " + " | ".join(COLUMNS) + " | card |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name, sources in TABLE.items():
        cells = []
        for column in COLUMNS:
            if column not in sources:
                cells.append("-")
                continue
            stage, key = sources[column]
            value = _number(metrics[stage].get(key)) if stage in metrics else None
            cells.append(f"{value:.4f}" if value is not None else "not run" if stage not in metrics else "-")
        card = ", ".join(f"{v:.4g} ({c})" for c, v in CARD.get(name, {}).items())
        if not card and all(c in ("-", "not run") for c in cells):
            continue  # a task this run's config does not evaluate (the synthetic ones on a real run)
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {card or '-'} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def make_plots(base_dir: str, metrics: dict[str, dict]) -> tuple[list[str], dict[str, int]]:
    """Write the report's PNGs into report/ -> (paths written, {stage: malformed log lines})."""
    plt = _pyplot()
    logs, bad = {}, {}
    for stage in TRAIN_STAGES:
        logs[stage], n_bad = load_log(base_dir, stage)
        if n_bad:
            bad[stage] = n_bad
    written = []
    # every training stage's loss and validation curve, one row each
    fig, axes = plt.subplots(len(TRAIN_STAGES), 2, figsize=(10, 2.6 * len(TRAIN_STAGES)), squeeze=False)
    val_key = {"base": "val_bpb", "mid": "val_bpb", "sft": "val_loss", "rl": "mean_reward"}
    for (ax_loss, ax_val), stage in zip(axes, TRAIN_STAGES):
        records = logs[stage]
        if not records:
            for ax in (ax_loss, ax_val):
                ax.text(0.5, 0.5, f"{stage}: not run", ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([]), ax.set_yticks([])
            continue
        ax_loss.plot(*_series(records, "loss"), lw=0.8, label="loss")
        if any("loss_ema" in r for r in records):
            ax_loss.plot(*_series(records, "loss_ema"), lw=1.5, label="EMA")
        ax_loss.set_title(f"{stage}: training loss", fontsize=9), ax_loss.legend(fontsize=7)
        steps, values = _series(records, val_key[stage])
        ax_val.plot(steps, values, marker="o" if len(steps) < 40 else None)
        ax_val.set_title(f"{stage}: {val_key[stage].replace('_', ' ')}", fontsize=9)
        if not steps:
            ax_val.text(0.5, 0.5, "no evaluation logged", ha="center", va="center", transform=ax_val.transAxes)
    axes[-1][0].set_xlabel("step"), axes[-1][1].set_xlabel("step")
    fig.tight_layout()
    written.append(_save(fig, plt, base_dir, PLOTS["curves"]))
    # our scores against the card's, one group of bars per metric
    rows = [r for r in TABLE if r != "val bpb"]
    series = {"card": [CARD.get(r, {}).get("SFT", CARD.get(r, {}).get("BASE", float("nan"))) for r in rows]}
    for column in COLUMNS:
        vals = [(_number(metrics.get(TABLE[r][column][0], {}).get(TABLE[r][column][1])) if column in TABLE[r] else None)
                for r in rows]
        if any(v is not None for v in vals):
            series[column] = [float("nan") if v is None else v for v in vals]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(series)
    for i, (label, vals) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(rows))], vals, width, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], rows, fontsize=8)
    ax.set_ylabel("score"), ax.legend(fontsize=8)
    ax.set_title("evaluations against the model card (card: SFT numbers, CORE at base)", fontsize=9)
    fig.tight_layout()
    written.append(_save(fig, plt, base_dir, PLOTS["evals"]))
    steps, reward = _series(logs["rl"], "mean_reward")
    if steps:
        fig, ax = plt.subplots(figsize=(8, 3.2))
        ax.plot(steps, reward, lw=0.8, label="mean reward")
        ax.set_xlabel("step"), ax.set_ylabel("mean reward"), ax.set_title("RL reward", fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, plt, base_dir, PLOTS["reward"]))
    return written, bad


def _save(fig, plt, base_dir: str, name: str) -> str:
    path = os.path.join(report_dir(base_dir), name)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Assembly


def _section(base_dir: str, stage: str) -> str:
    path = os.path.join(report_dir(base_dir), f"{stage}.md")
    if not os.path.exists(path):
        return f"## {stage}\n\nnot run\n"
    with open(path, errors="replace") as f:
        text = f.read()
    # a section's images are relative to report/; report.md sits one level up
    return re.sub(r"!\[([^\]]*)\]\((?![a-z]+:|/)([^)]+)\)", r"![\1](report/\2)", text)


def assemble(base_dir: str, gpu_hour_price: float | None = None, plots: bool = False) -> str:
    """Write <base_dir>/report.md (plots=True also redraws the PNGs) and return its path."""
    os.makedirs(report_dir(base_dir), exist_ok=True)
    metrics, warnings = load_metrics(base_dir)
    if gpu_hour_price is None:  # rebuilt after the report stage (write_section): the price it recorded
        gpu_hour_price = _number(metrics.get("report", {}).get("gpu_hour_price"))
    bad_lines = {}
    if plots:
        _, bad_lines = make_plots(base_dir, metrics)
    warnings += [f"logs/{s}.jsonl: {n} malformed line(s) skipped" for s, n in bad_lines.items()]
    for w in warnings:
        log.warning("report: %s", w)
    parts = [header(base_dir, metrics, gpu_hour_price), "## Summary\n", summary_table(metrics) + "\n"]
    if warnings:
        parts.append("Warnings:\n\n" + "\n".join(f"- {w}" for w in warnings) + "\n")
    shown = [name for name in PLOTS.values() if os.path.exists(os.path.join(report_dir(base_dir), name))]
    parts += [f"![{name[:-4]}](report/{name})\n" for name in shown]
    parts += [_section(base_dir, stage) for stage in KNOWN_STAGES if stage != "report"]
    out = os.path.join(base_dir, "report.md")
    _write_atomic(out, "\n".join(parts))
    return out


def build(base_dir: str, gpu_hour_price: float | None = None) -> list[str]:
    """report.md with fresh plots -> [report.md, png, ...]."""
    out = assemble(base_dir, gpu_hour_price, plots=True)
    return [out] + [os.path.join(report_dir(base_dir), n) for n in PLOTS.values()
                    if os.path.exists(os.path.join(report_dir(base_dir), n))]


# ----------------------------------------------------------------------------------------------
# Pipeline stage and CLI


def stage_done(config, stage: str = "report") -> bool:
    return False  # seconds of work: always rebuilt


def run_stage(config, stage: str = "report") -> dict:
    outputs = build(config.base_dir, config.report.gpu_hour_price)
    return dict(outputs=outputs, metrics={"gpu_hour_price": config.report.gpu_hour_price}, report="")


def main(argv=None) -> int:
    from nanochat_jax.config import base_config

    p = argparse.ArgumentParser(description="Assemble <base_dir>/report.md from a run's stages.")
    p.add_argument("--base_dir", default=os.environ.get("NANOCHAT_BASE_DIR", "runs/tiny"))
    p.add_argument("--gpu_hour_price", type=float, default=base_config().report.gpu_hour_price,
                   help="$ per GPU-hour for the cost line")
    args = p.parse_args(argv)
    try:
        if not os.path.isdir(args.base_dir):
            raise UserError(f"no run directory {os.path.abspath(args.base_dir)} (--base_dir)")
        if args.gpu_hour_price < 0:
            raise UserError(f"--gpu_hour_price must be >= 0, got {args.gpu_hour_price}")
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        for path in build(args.base_dir, args.gpu_hour_price):
            print(path)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
