"""Identity: conversations about who the model is, from a jsonl file in the reference's format (one JSON
list of {"role", "content"} messages a line). We ship our own file, written for nanochat_jax; a line
that is not a valid conversation is skipped and counted."""
from __future__ import annotations

import json
import os

from nanochat_jax.tasks.base import Task
from nanochat_jax.tasks.hub import bad_row
from nanochat_jax.tokenizer import _chat_messages

IDENTITY_FILE = os.path.join(os.path.dirname(__file__), "identity_conversations.jsonl")


def read_conversations(path: str) -> list[dict]:
    conversations = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)
                if not isinstance(messages, list):
                    raise ValueError(f"a line is a JSON list of messages, got {type(messages).__name__}")
                _chat_messages({"messages": messages})
                conversations.append({"messages": messages})
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                bad_row("identity", f"{path}:{n}: {e}")
    return conversations


class Identity(Task):
    name = "identity"
    splits = ("train",)

    def __init__(self, split: str = "train", limit: int | None = None, data_dir=None, path: str = IDENTITY_FILE):
        self.conversations = read_conversations(path)[:limit]

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> dict:
        return json.loads(json.dumps(self.conversations[index]))  # a fresh copy: callers may change it
