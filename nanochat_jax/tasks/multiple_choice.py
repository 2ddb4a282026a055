"""Multiple-choice tasks (categorical): MMLU and ARC, in the reference's prompt format (STAGES.md §1)."""
from __future__ import annotations

from nanochat_jax.tasks.hub import HubTask, need


def render_mc(question: str, letters: list[str], choices: list[str]) -> str:
    """The user message: the question, each choice with its letter, the instruction."""
    lines = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return f"Multiple Choice question: {question}\n{lines}\nRespond only with the letter of the correct answer."


def mc_conversation(question, letters, choices, answer: str) -> dict:
    need(question, str, "question")
    if not 2 <= len(choices) == len(letters) or not all(isinstance(x, str) for x in [*choices, *letters]):
        raise ValueError(f"choices {choices!r} / letters {letters!r}: need >= 2 strings, as many of each")
    if answer not in letters:
        raise ValueError(f"answer {answer!r} is not one of {letters}")
    return {"messages": [{"role": "user", "content": render_mc(question, letters, choices)},
                         {"role": "assistant", "content": answer}],
            "letters": list(letters), "answer": answer}


class MMLU(HubTask):
    """cais/mmlu: `auxiliary_train` (99,842 rows, each wrapped in a `train` field) or the `all`
    config's dev / validation / test (14,042 test rows)."""

    name = "mmlu"
    splits = ("auxiliary_train", "dev", "validation", "test")
    eval_type = "categorical"

    def convert(self, row: dict) -> dict:
        row = row["train"] if "train" in row else row
        choices, answer = need(row["choices"], list, "choices"), need(row["answer"], int, "answer")
        letters = [chr(ord("A") + k) for k in range(len(choices))]
        if not 0 <= answer < len(choices):
            raise ValueError(f"answer index {answer} out of range for {len(choices)} choices")
        conversation = mc_conversation(row["question"], letters, choices, letters[answer])
        conversation["subject"] = row.get("subject") or ""
        return conversation


class ARC(HubTask):
    """allenai/ai2_arc (ARC-Easy / ARC-Challenge): letters are the row's `choices.label`."""

    splits = ("train", "validation", "test")
    eval_type = "categorical"

    def convert(self, row: dict) -> dict:
        choices = need(row["choices"], dict, "choices")
        return mc_conversation(row["question"], need(choices["label"], list, "choices.label"),
                               need(choices["text"], list, "choices.text"), row["answerKey"])


class ARCEasy(ARC):
    name = "arc_easy"


class ARCChallenge(ARC):
    name = "arc_challenge"
