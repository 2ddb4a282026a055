"""SmolTalk (HuggingFaceTB/smol-smoltalk): general conversations, messages as given (a leading system
message is merged into the first user message by the renderer)."""
from __future__ import annotations

from nanochat_jax.tasks.hub import HubTask
from nanochat_jax.tokenizer import _chat_messages


class SmolTalk(HubTask):
    name = "smoltalk"
    splits = ("train", "test")

    def convert(self, row: dict) -> dict:
        conversation = {"messages": row["messages"]}
        _chat_messages(conversation)  # raises ValueError on a conversation the renderer would refuse
        return conversation
