"""Chat with a checkpoint in the terminal.

    python -m nanochat_jax.chat_cli --stage sft [--step N] [--base_dir D] [-p "prompt"] [--temperature T] [--top-k K]

Without -p: a multi-turn conversation (`clear` starts over, `quit` or Ctrl-D ends). With -p: one
answer, then exit. The conversation is kept as token ids, so tool calls stay exactly as generated;
when it outgrows the context, the oldest tokens are dropped (with a notice).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Iterator, TextIO

from nanochat_jax.config import UserError
from nanochat_jax.engine import ChatModel, load_model


class ChatSession:
    """Multi-turn state: the token history and the sampling settings."""

    def __init__(self, model: ChatModel, temperature: float = 0.6, top_k: int | None = 50, seed: int = 0,
                 out: TextIO = sys.stdout):
        self.model, self.temperature, self.top_k, self.seed, self.out = model, temperature, top_k, seed, out
        self.context = model.engine.cfg.sequence_len
        self.reserve = min(256, self.context // 4)  # room kept for the reply when cutting the history
        self.history: list[int] = []

    def clear(self) -> None:
        self.history = []

    def _fit(self, ids: list[int]) -> list[int]:
        """Keep <|bos|> and the newest tokens so that `reserve` tokens remain for the reply."""
        keep = self.context - self.reserve
        if len(ids) <= keep:
            return ids
        print(f"[notice: the conversation ({len(ids)} tokens) is longer than the {self.context}-token context; "
              f"the oldest {len(ids) - keep} tokens were dropped]", file=self.out)
        return ids[:1] + ids[len(ids) - keep + 1:]

    def stream(self, text: str, max_tokens: int | None = None) -> Iterator[int]:
        """The reply to one user message, token by token (the stop token included). The history takes in
        what was generated also when the caller stops early (closes the generator)."""
        turn = self.model.prompt_tokens([{"role": "user", "content": text}])  # <|bos|> user turn <|assistant_start|>
        prompt = self._fit(self.history + turn[1:] if self.history else turn)
        reply = []
        try:
            for token in self.model.generate(prompt, max_tokens, temperature=self.temperature, top_k=self.top_k,
                                             seed=self.seed):
                reply.append(token)
                yield token
        finally:
            self.seed += 1
            end = self.model.engine.stop_ids[0]  # <|assistant_end|>, also when generation stopped otherwise
            self.history = prompt + [t for t in reply if t not in self.model.engine.stop_ids] + [end]

    def ask(self, text: str) -> str | None:
        """Print and return the reply to one user message; None (and a polite line) for an empty one."""
        if not text.strip():
            print("[please type a message: the prompt is empty]", file=self.out)
            return None
        reply, shown = [], ""
        for token in self.stream(text):
            reply.append(token)
            text_so_far = self.model.reply_text(reply)
            if not text_so_far.endswith("\ufffd"):  # wait for the rest of a split UTF-8 character
                print(text_so_far[len(shown):], end="", file=self.out, flush=True)
                shown = text_so_far
        print(file=self.out)
        return self.model.reply_text(reply)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Chat with a nanochat_jax checkpoint.")
    p.add_argument("--stage", default="sft", help="checkpoint stage: base, mid, sft, rl")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--base_dir", default=None, help="run directory (default: $NANOCHAT_BASE_DIR or runs/tiny)")
    p.add_argument("--run_name", default=None, help="run under the stage (default: the only one)")
    p.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-k", type=int, default=50, help="0: no top-k")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.temperature < 0 or args.top_k < 0:
        p.error("--temperature and --top-k must be >= 0")
    if args.prompt is not None and not args.prompt.strip():
        print("Please give a non-empty prompt with -p.", file=sys.stderr)
        return 2
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's read-only-restore chatter
    try:
        model, _, meta = load_model(args.stage, step=args.step, base_dir=args.base_dir, run_name=args.run_name)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    session = ChatSession(model, args.temperature, args.top_k or None, args.seed)
    if args.prompt is not None:
        session.ask(args.prompt)
        return 0
    print(f"nanochat_jax: {args.stage} step {meta['step']}. Type 'quit' to exit, 'clear' to start over.")
    while True:
        try:
            text = input("\nUser: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text.strip().lower() in ("quit", "exit"):
            return 0
        if text.strip().lower() == "clear":
            session.clear()
            continue
        if text.strip():
            print("\nAssistant: ", end="", flush=True)
        try:
            session.ask(text)
        except KeyboardInterrupt:
            print("\n[interrupted]")


if __name__ == "__main__":
    sys.exit(main())
