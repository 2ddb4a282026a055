"""What every task is: an indexable list of conversations (STAGES.md §1), and the ways to combine them.

A conversation is `{"messages": [{"role": "user"|"assistant", "content": str | [parts]}, ...]}`.
Multiple-choice (categorical) tasks add `"letters"` (the answer letters offered, e.g. ["A", "B", "C", "D"])
and `"answer"` (the right letter) to each conversation; generative tasks score a completion with
`task.score(conversation, completion_text) -> bool`.
"""
from __future__ import annotations

import random
from typing import Sequence


class Task:
    """len(task) conversations, task[i] one of them (a fresh dict each call: callers may change it)."""

    name = "task"
    eval_type: str | None = None  # "categorical" | "generative" | None (training only)

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        raise NotImplementedError

    def score(self, conversation: dict, completion: str) -> bool:
        """Generative tasks: is `completion` (the assistant's reply text) right for `conversation`?"""
        raise NotImplementedError(f"{self.name} is not a generative task")

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class Mixture(Task):
    """Every conversation of every task, shuffled once with random.Random(seed) over (task, index) pairs
    (as the reference does); a task listed twice is seen twice."""

    name = "mixture"

    def __init__(self, tasks: Sequence[Task], seed: int = 42):
        self.tasks = list(tasks)
        self.pairs = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        t, i = self.pairs[index]
        return self.tasks[t][i]


class TaskSequence(Task):
    """The tasks one after another, unshuffled (curricula, evaluation sets)."""

    name = "sequence"

    def __init__(self, tasks: Sequence[Task]):
        self.tasks = list(tasks)
        self.offsets = [0]
        for task in self.tasks:
            self.offsets.append(self.offsets[-1] + len(task))

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        t = next(k for k in range(len(self.tasks)) if index < self.offsets[k + 1])
        return self.tasks[t][index - self.offsets[t]]
