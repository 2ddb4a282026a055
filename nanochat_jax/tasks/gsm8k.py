"""GSM8K (openai/gsm8k `main`): grade-school word problems whose worked answers call the calculator.

Also the final-answer scorer that SpellingBee and arithmetic share: the first `#### <number>` of a text.
"""
from __future__ import annotations

import re

from nanochat_jax.tasks.hub import HubTask, need

_FINAL = re.compile(r"#### (\-?[0-9\.\,]+)")
_CALC = re.compile(r"(<<[^>]+>>)")


def final_answer(text: str) -> str | None:
    """The number after the first `#### `, commas removed; None if there is none."""
    match = _FINAL.search(text)
    return match.group(1).replace(",", "") if match else None


class FinalAnswerTask:
    """Generative scoring shared by GSM8K-style tasks: right when the completion's final answer equals
    the reference assistant message's (as strings: "3.50" is not "3.5")."""

    eval_type = "generative"

    def score(self, conversation: dict, completion: str) -> bool:
        content = conversation["messages"][-1]["content"]
        reference = content if isinstance(content, str) else "".join(
            p["text"] for p in content if p["type"] == "text")
        predicted = final_answer(completion)
        return predicted is not None and predicted == final_answer(reference)


def assistant_parts(answer: str) -> list[dict]:
    """GSM8K's answer text as parts: each `<<expr=result>>` becomes a python call (`expr`) and its
    python_output (`result`); the text around them stays text."""
    parts = []
    for piece in _CALC.split(answer):
        if _CALC.fullmatch(piece):
            expr, equals, result = piece[2:-2].rpartition("=")
            if not equals:
                raise ValueError(f"calculator annotation {piece!r} has no '='")
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(FinalAnswerTask, HubTask):
    name = "gsm8k"
    splits = ("train", "test")

    def convert(self, row: dict) -> dict:
        question, answer = need(row["question"], str, "question"), need(row["answer"], str, "answer")
        if final_answer(answer) is None:
            raise ValueError("answer has no '#### <number>' line")
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": assistant_parts(answer)}]}
