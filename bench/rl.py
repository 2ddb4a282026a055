"""Speed of an RL step (STAGES.md §4's recipe): rollouts with the engine, then the training step.

    python bench/rl.py                 # random d20, 16 questions x 16 samples of <= 256 new tokens
    python bench/rl.py --tiny          # depth 2, vocab 512: a CPU smoke run

A random model samples almost uniformly over the vocabulary, so nearly every completion runs to
--new-tokens (the special tokens are real ids and can be sampled: a row stops with probability
~1% here): the worst case of the recipe, with no tool calls. Prompts are random ids of 80-200 tokens
(GSM8K's questions in the chat format), padded to --prompt-len as in the stage. Each step is what
the stage does: `RLSource.next_batch` (engine from the current params, rollouts with tools on,
scoring, rows) and the jitted training step of `train.build_step` on its (A, B, T) batch.
rollout tok/s = completion tokens / rollout seconds. The first step includes compilation and is
reported apart; the table gives each later step.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from nanochat_jax import model as model_lib
from nanochat_jax import rl, sharding, train
from nanochat_jax.config import base_config
from nanochat_jax.tokenizer import SPECIAL_TOKENS


class _RandomPrompts:
    """What RLSource asks of a tokenizer and a task: questions whose prompt is a given list of ids."""

    name, eval_type = "random_prompts", "generative"

    def __init__(self, vocab_size: int, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.first_special = vocab_size - len(SPECIAL_TOKENS)
        self.bos_id = self.first_special
        self.prompts = [rng.integers(0, self.first_special, rng.integers(80, 201)).tolist() for _ in range(n)]

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, i):
        return {"messages": [{"role": "user", "content": ""}], "prompt_ids": self.prompts[i]}

    def render_for_completion(self, conversation):
        return [self.bos_id, *conversation["prompt_ids"], self.encode_special("<|assistant_start|>")]

    def encode_special(self, name):
        return self.first_special + SPECIAL_TOKENS.index(name)

    def decode(self, ids):
        return " ".join(map(str, ids))

    def score(self, conversation, completion):
        return False


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="depth 2, vocab 512, 4 x 4 samples of <= 32 tokens (CPU)")
    p.add_argument("--steps", type=int, default=4, help="RL steps timed after the first")
    p.add_argument("--examples", type=int, default=16)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--device-batch", type=int, default=32, help="rows per device per micro-step of the training step")
    args = p.parse_args(argv)

    c = base_config()
    if args.tiny:
        c.model.depth, c.model.head_dim, c.model.sequence_len, c.tokenizer.vocab_size = 2, 32, 256, 512
        args.examples, args.samples, args.new_tokens, args.device_batch = 4, 4, 32, 8
    r = c.rl
    r.update(dict(examples_per_step=args.examples, num_samples=args.samples, max_new_tokens=args.new_tokens,
                  max_prompt_tokens=args.prompt_len, device_batch_size=args.device_batch, num_iterations=100))
    model_cfg = model_lib.ModelConfig.from_config(c)
    stand_in = _RandomPrompts(model_cfg.vocab_size, n=args.examples * (args.steps + 1))
    source = rl.RLSource(r, stand_in, stand_in, model_cfg, seed=0)

    mesh = sharding.make_mesh(c.mesh)
    rows = args.examples * args.samples
    accum = rows // (args.device_batch * mesh.size)
    step_fn, init_fn, _, _, batch_shard = train.build_step(model_cfg, r, 100, mesh)
    params, opt_state = init_fn(jax.random.key(0))

    print(f"d{model_cfg.depth} ({model_lib.param_counts(model_cfg)['total']:,} params, {model_cfg.compute_dtype}) "
          f"on {mesh.size} x {jax.devices()[0].device_kind}: {args.examples} questions x {args.samples} samples, "
          f"<= {args.new_tokens} new tokens, prompts padded to {args.prompt_len}, training rows of "
          f"{source.seq_len} in {accum} micro-steps of {args.device_batch} a device")
    print("| step | rollout s | completion tokens | rollout tok/s | train step s | RL step s |")
    print("|---|---|---|---|---|---|")
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        batch, info = source.next_batch(params)
        t1 = time.perf_counter()
        batch = {k: sharding.global_batch(v.reshape(accum, rows // accum, -1), batch_shard) for k, v in batch.items()}
        params, opt_state, m = step_fn(params, opt_state, batch)
        float(m["loss"])
        t2 = time.perf_counter()
        tokens = int(round(info["answer_tokens"] * rows))
        label = "1 (compiles)" if step == 0 else str(step + 1)
        print(f"| {label} | {info['rollout_s']:.2f} | {tokens:,} | {info['rollout_tok_s']:,.0f} | {t2 - t1:.2f} | "
              f"{t2 - t0:.2f} |", flush=True)


if __name__ == "__main__":
    main()
