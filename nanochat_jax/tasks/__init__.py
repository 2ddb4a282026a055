"""The task registry: tasks by name, and mixtures written as "name[:split[:N]],...".

    load_task("gsm8k", "test", limit=420)
    Mixture(load_mixture("smoltalk:train,identity,identity,spelling_bee:train:80000"))

N is the first N rows of a dataset (after its fixed shuffle) or the size of a synthetic task; a name
listed twice appears twice (oversampled). Each task class is built as `Cls(split, limit, data_dir)`
and says its splits in `Cls.splits`. Modules are imported on first use, so importing this package
stays light (no jax). Datasets: `python -m nanochat_jax.tasks download [TASK ...]` (see hub.py).
"""
from __future__ import annotations

import importlib
import os

from nanochat_jax.config import UserError
from nanochat_jax.tasks.base import Mixture, Task, TaskSequence

__all__ = ["Mixture", "Task", "TaskSequence", "TASKS", "tasks_dir", "load_task", "load_mixture", "check_mixture", "parse_mixture"]

TASKS = {  # name -> (module, class)
    "smoltalk": ("nanochat_jax.tasks.smoltalk", "SmolTalk"),
    "mmlu": ("nanochat_jax.tasks.multiple_choice", "MMLU"),
    "arc_easy": ("nanochat_jax.tasks.multiple_choice", "ARCEasy"),
    "arc_challenge": ("nanochat_jax.tasks.multiple_choice", "ARCChallenge"),
    "gsm8k": ("nanochat_jax.tasks.gsm8k", "GSM8K"),
    "humaneval": ("nanochat_jax.tasks.humaneval", "HumanEval"),
    "spelling_bee": ("nanochat_jax.tasks.synthetic", "SpellingBee"),
    "simple_spelling": ("nanochat_jax.tasks.synthetic", "SimpleSpelling"),
    "identity": ("nanochat_jax.tasks.identity", "Identity"),
    "arithmetic": ("nanochat_jax.tasks.synthetic", "Arithmetic"),
}


def tasks_dir(config) -> str:
    """Where a run's task datasets live: <config.data.dir>/tasks."""
    return os.path.join(os.path.expanduser(config.data.dir), "tasks")


def task_class(name: str) -> type:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; tasks are {', '.join(TASKS)}")
    module, cls = TASKS[name]
    return getattr(importlib.import_module(module), cls)


def checked_class(name: str, split: str = "train", limit: int | None = None) -> type:
    """The task's class, after checking the split and N (no data is read)."""
    cls = task_class(name)
    splits = getattr(cls, "splits", None)
    if splits is not None and split not in splits:
        raise UserError(f"task {name} has no split {split!r}; its splits are {', '.join(splits)}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise UserError(f"task {name}: N must be a positive integer, got {limit!r}")
    return cls


def load_task(name: str, split: str = "train", limit: int | None = None, data_dir=None) -> Task:
    return checked_class(name, split, limit)(split, limit, data_dir)


def parse_mixture(spec: str) -> list[tuple[str, str, int | None]]:
    """"a,b:test,c:train:100" -> [(name, split, N or None)], checked for form (not for names)."""
    entries = []
    for item in spec.split(","):
        fields = item.strip().split(":")
        if not fields[0] or len(fields) > 3:
            raise UserError(f"mixture entry {item.strip()!r} in {spec!r}: write name[:split[:N]]")
        name, split, n = fields[0], fields[1] if len(fields) > 1 else "train", fields[2] if len(fields) > 2 else None
        if n is not None and not (n.isdigit() and int(n) > 0):
            raise UserError(f"mixture entry {item.strip()!r}: N must be a positive integer, got {n!r}")
        entries.append((name, split, int(n) if n is not None else None))
    return entries


def check_mixture(spec: str) -> None:
    """UserError unless every entry of `spec` names a task, one of its splits and a valid N (for
    config validation: fails before any data is read)."""
    for entry in parse_mixture(spec):
        checked_class(*entry)


def load_mixture(spec: str, data_dir=None) -> list[Task]:
    """The tasks of a mixture spec, in order; an entry listed twice is the same task object twice."""
    loaded: dict[tuple, Task] = {}
    out = []
    for entry in parse_mixture(spec):
        if entry not in loaded:
            loaded[entry] = load_task(*entry, data_dir=data_dir)
        out.append(loaded[entry])
    return out
