"""The run report: one markdown section per stage under <base_dir>/report/, joined into report.md."""
from __future__ import annotations

import os
import time

from nanochat_jax.config import KNOWN_STAGES


def report_dir(base_dir: str) -> str:
    return os.path.join(base_dir, "report")


def write_section(base_dir: str, stage: str, markdown: str) -> str:
    """Write (atomically) the stage's section and rebuild report.md; returns the section's path."""
    os.makedirs(report_dir(base_dir), exist_ok=True)
    path = os.path.join(report_dir(base_dir), f"{stage}.md")
    with open(path + ".tmp", "w") as f:
        f.write(markdown.rstrip() + "\n")
    os.replace(path + ".tmp", path)
    assemble(base_dir)
    return path


def format_metrics(metrics: dict) -> str:
    rows = ["| metric | value |", "|---|---|"]
    for key, value in metrics.items():
        shown = f"{value:,.4g}" if isinstance(value, float) else (f"{value:,}" if isinstance(value, int) else value)
        rows.append(f"| {key} | {shown} |")
    return "\n".join(rows)


def assemble(base_dir: str) -> str:
    """report.md = a header + every stage's section in pipeline order."""
    parts = [f"# nanochat_jax report\n\nbase_dir: `{os.path.abspath(base_dir)}`  \n"
             f"assembled: {time.strftime('%Y-%m-%d %H:%M:%S')}\n"]
    for stage in KNOWN_STAGES:
        path = os.path.join(report_dir(base_dir), f"{stage}.md")
        if os.path.exists(path):
            with open(path) as f:
                parts.append(f.read())
    out = os.path.join(base_dir, "report.md")
    with open(out, "w") as f:
        f.write("\n".join(parts))
    return out
