"""Where a run keeps its tokenizer and checkpoints, under its base_dir: built here only."""
from __future__ import annotations

import os


def tokenizer_dir(base_dir: str) -> str:
    """<base_dir>/tokenizer."""
    return os.path.join(os.path.expanduser(base_dir), "tokenizer")


def checkpoint_dir(base_dir: str, stage: str, run_name: str | None = None) -> str:
    """<base_dir>/checkpoints/<stage>/<run_name> (absolute; without run_name, the stage's directory of runs)."""
    parts = [os.path.expanduser(base_dir), "checkpoints", stage] + ([run_name] if run_name else [])
    return os.path.abspath(os.path.join(*parts))
