"""RL (STAGES.md §4): simplified GRPO on a generative task, rollouts on device, through the one training loop.

Each step takes `examples_per_step` questions and samples `num_samples` completions of each with the
engine's batch driver, calculator on (its outputs are forced in and carry no gradient). A completion
scores 1 when the task's scorer says its final answer is right; its advantage is that reward minus the
mean reward of its question (no division by the std). The rows go to the shared training step as
inputs / targets / weights: the target is -1 on the prompt, on forced tool output and on padding, and
the weight on every sampled token is the completion's advantage, so the step's loss
sum(A * -log p) / (sampled tokens) is the policy-gradient objective (no KL, no ratio clipping).

`RLSource` is the data source of `train.train_loop`: `next_batch(params)` samples with the current
params. Its state is the step alone: the questions of step s are fixed by (seed, s) and so is the
sampling seed, so a run killed anywhere resumes with the same questions and seeds.

Shapes never change: every prompt is padded to `max_prompt_tokens` and every row to
max_prompt_tokens + max_new_tokens, so the rollout program and the training step each compile once
however long the answers are. Questions whose prompt is longer are left out of the run (counted).

**Decisions** (the issue's, beyond the reference): a completion that hits max_new_tokens without stopping,
one with a calculator call that was refused or failed, and one with no `#### <number>` answer all score 0
(each counted); the stop a completion ended with is trained on like any sampled token, as
<|assistant_end|> (the reference drops it, so stopping is never rewarded; the engine does not say whether
the stop was <|assistant_end|> or the rarer <|bos|>).

bench/rl.py times a step of the recipe's shape on a random d20 (rollout tokens/s, seconds a step).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time

import jax
import numpy as np

from nanochat_jax import chat_train, report, sharding, train
from nanochat_jax import checkpoint as ckpt_lib
from nanochat_jax import model as model_lib
from nanochat_jax.config import UserError
from nanochat_jax.engine import CACHE_LEN_MULTIPLE, Engine, _round_up
from nanochat_jax.tasks import load_task, tasks_dir
from nanochat_jax.tasks.gsm8k import final_answer

log = logging.getLogger(__name__)

OUTCOMES = ("right", "wrong", "no_answer", "max_tokens", "tool_refused")


# ----------------------------------------------------------------------------------------------
# Rewards and advantages


def tool_refusals(tokens, mask, stopped: bool, python_end: int, output_start: int) -> int:
    """Calculator calls that got no output: a sampled <|python_end|> not followed by a forced
    <|output_start|> (the engine forces the output right after the call, or nothing when the calculator
    refuses or fails; a <|python_end|> with no call open gets nothing either, and counts too)."""
    n = 0
    for i, (t, m) in enumerate(zip(tokens, mask)):
        if t == python_end and m == 1:
            if i + 1 < len(tokens):
                n += not (tokens[i + 1] == output_start and mask[i + 1] == 0)
            else:  # the call was the last token: refused if the row then stopped, unknown if it was cut
                n += stopped
    return n


def outcome(task, conversation: dict, text: str, stopped: bool, refused: int) -> str:
    """One of OUTCOMES; the reward is 1 for "right" only."""
    if not stopped:
        return "max_tokens"
    if refused:
        return "tool_refused"
    if final_answer(text) is None:
        return "no_answer"
    return "right" if task.score(conversation, text) else "wrong"


def advantages(rewards_QxN: np.ndarray) -> np.ndarray:
    """GRPO without the std: each sample's reward minus the mean reward of its question."""
    return rewards_QxN - rewards_QxN.mean(axis=1, keepdims=True)


def pass_at_k(right_QxN: np.ndarray) -> dict:
    """pass@k for k = 1..N: the fraction of questions with a right answer among their first k samples."""
    return {f"pass@{k}": float(right_QxN[:, :k].any(axis=1).mean()) for k in range(1, right_QxN.shape[1] + 1)}


def training_rows(prompts, completions, masks, stopped, weights_R, seq_len: int, end_id: int):
    """Rows prompt + completion (+ <|assistant_end|> where it stopped), shifted and padded to seq_len ->
    inputs, targets, weights, each (R, seq_len); targets -1 and weight 0 wherever nothing was sampled.
    Row r's prompt is prompts[r // (R / len(prompts))] (rows are prompt-major)."""
    R = len(completions)
    per_prompt = R // len(prompts)
    inputs = np.full((R, seq_len), end_id, np.int32)
    targets = np.full((R, seq_len), -1, np.int32)
    weights = np.zeros((R, seq_len), np.float32)
    for r, (tokens, mask) in enumerate(zip(completions, masks)):
        prompt = prompts[r // per_prompt]
        ids = list(prompt) + list(tokens) + ([end_id] if stopped[r] else [])
        sampled = [0] * len(prompt) + list(mask) + ([1] if stopped[r] else [])
        if len(ids) - 1 > seq_len:
            raise ValueError(f"row {r}: {len(ids) - 1} positions do not fit {seq_len}")
        n = len(ids) - 1
        inputs[r, :n] = ids[:-1]
        learn = np.array(sampled[1:], bool)
        targets[r, :n] = np.where(learn, ids[1:], -1)
        weights[r, :n] = np.where(learn, weights_R[r], 0.0)
    return inputs, targets, weights


# ----------------------------------------------------------------------------------------------
# Rollouts


class FixedShapeEngine(Engine):
    """The Engine with every call's prompt length and cache length fixed (prompt_len, and prompt_len +
    max_new_tokens rounded up to 128), so generation compiles once for a batch size, whatever the prompts."""

    def __init__(self, params, cfg, tokenizer, prompt_len: int, max_new_tokens: int):
        super().__init__(params, cfg, tokenizer)
        self.prompt_len = prompt_len
        self.fixed_max_len = min(cfg.sequence_len, _round_up(prompt_len + max_new_tokens, CACHE_LEN_MULTIPLE))

    def _layout(self, prompts, num_samples, max_tokens, top_k, top_p):
        tokens, lengths, _, _ = super()._layout(prompts, num_samples, max_tokens, top_k, top_p)
        if lengths.max() > self.prompt_len:
            raise ValueError(f"a prompt of {lengths.max()} tokens is longer than prompt_len={self.prompt_len}")
        padded = np.zeros((len(tokens), self.prompt_len), np.int32)
        padded[:, :min(tokens.shape[1], self.prompt_len)] = tokens[:, :self.prompt_len]
        max_tokens = min(max_tokens or self.cfg.sequence_len, self.fixed_max_len - int(lengths.max()))
        return padded, lengths, self.fixed_max_len, max_tokens


def rollout(engine: Engine, task, conversations, prompts, num_samples: int, max_new_tokens: int,
            temperature: float, top_k: int | None, seed: int):
    """Sample num_samples completions of each prompt (tools on) and score them -> dict of the rows and
    their tokens, masks, stopped flags, outcomes (Q x N) and timing."""
    t0 = time.perf_counter()
    rows, masks = engine.generate_batch(prompts, num_samples=num_samples, max_tokens=max_new_tokens,
                                        temperature=temperature, top_k=top_k, seed=seed, use_tools=True)
    seconds = time.perf_counter() - t0
    tok = engine.tokenizer
    python_end, output_start = tok.encode_special("<|python_end|>"), tok.encode_special("<|output_start|>")
    stopped = [len(r) < max_new_tokens for r in rows]
    outcomes = []
    for r, (tokens, mask) in enumerate(zip(rows, masks)):
        refused = tool_refusals(tokens, mask, stopped[r], python_end, output_start)
        outcomes.append(outcome(task, conversations[r // num_samples], tok.decode(tokens), stopped[r], refused))
    return dict(rows=rows, masks=masks, stopped=stopped, seconds=seconds,
                outcomes=np.array(outcomes).reshape(len(prompts), num_samples))


def _rollout_info(out: dict) -> dict:
    """Scalar metrics of one rollout batch for the progress bar and the metrics JSONL."""
    right = out["outcomes"] == "right"
    lengths = np.array([len(r) for r in out["rows"]])
    info = dict(mean_reward=float(right.mean()), pass_rate=float(right.any(axis=1).mean()),
                no_signal=float((right.all(axis=1) | ~right.any(axis=1)).mean()),
                answer_tokens=float(lengths.mean()), answer_tokens_max=int(lengths.max()),
                rollout_tok_s=float(lengths.sum() / out["seconds"]), rollout_s=out["seconds"])
    info.update({k: int((out["outcomes"] == k).sum()) for k in OUTCOMES})
    return info


# ----------------------------------------------------------------------------------------------
# The data source of train.train_loop


def eligible(task, tokenizer, max_prompt_tokens: int) -> tuple[list[int], int]:
    """Indices of the task's questions whose prompt fits max_prompt_tokens, and how many do not."""
    keep = [i for i in range(len(task)) if len(tokenizer.render_for_completion(task[i])) <= max_prompt_tokens]
    return keep, len(task) - len(keep)


def step_seed(*keys: int) -> int:
    """A 32-bit sampling seed from non-negative ints (the run's seed, what it is for, the step)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class RLSource:
    """Rollouts as training batches. `next_batch(params)` -> ({inputs, targets, weights}: numpy
    (rows, T) with rows = this process's questions x num_samples and T = max_prompt + max_new_tokens,
    info of scalars). The questions of step s: positions s*E .. s*E+E-1 of the seeded order of the
    eligible questions (a fresh order each epoch)."""

    def __init__(self, rl_cfg, task, tokenizer, model_cfg, seed: int, process_index: int = 0,
                 process_count: int = 1):
        self.cfg, self.task, self.tokenizer, self.model_cfg, self.seed = rl_cfg, task, tokenizer, model_cfg, seed
        self.indices, self.too_long = eligible(task, tokenizer, rl_cfg.max_prompt_tokens)
        if len(self.indices) < rl_cfg.examples_per_step:
            raise UserError(f"config.rl: {len(self.indices)} questions of {task.name} fit max_prompt_tokens="
                            f"{rl_cfg.max_prompt_tokens} ({self.too_long} are longer), fewer than one step's "
                            f"examples_per_step={rl_cfg.examples_per_step}")
        if rl_cfg.examples_per_step % process_count:
            raise UserError(f"config.rl.examples_per_step={rl_cfg.examples_per_step} must be a multiple of the "
                            f"process count {process_count}")
        self.local = slice(process_index * rl_cfg.examples_per_step // process_count,
                           (process_index + 1) * rl_cfg.examples_per_step // process_count)
        self.step = 0
        self.seq_len = rl_cfg.max_prompt_tokens + rl_cfg.max_new_tokens

    def questions(self, step: int) -> list[int]:
        E, n = self.cfg.examples_per_step, len(self.indices)
        out = []
        for pos in range(step * E, (step + 1) * E):
            epoch, i = divmod(pos, n)
            out.append(self.indices[_epoch_order(self.seed, epoch, n)[i]])
        return out[self.local]

    def engine(self, params) -> Engine:
        return FixedShapeEngine(params, self.model_cfg, self.tokenizer, self.cfg.max_prompt_tokens,
                                self.cfg.max_new_tokens)

    def next_batch(self, params):
        c = self.cfg
        conversations = [self.task[i] for i in self.questions(self.step)]
        prompts = [self.tokenizer.render_for_completion(conv) for conv in conversations]
        out = rollout(self.engine(params), self.task, conversations, prompts, c.num_samples, c.max_new_tokens,
                      c.temperature, c.top_k or None, step_seed(self.seed, 0, self.step))
        rewards = (out["outcomes"] == "right").astype(np.float32)
        inputs, targets, weights = training_rows(prompts, out["rows"], out["masks"], out["stopped"],
                                                 advantages(rewards).reshape(-1), self.seq_len,
                                                 self.tokenizer.encode_special("<|assistant_end|>"))
        self.step += 1
        return dict(inputs=inputs, targets=targets, weights=weights), _rollout_info(out)

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def make_pass_at_k_eval(rl_cfg, task, tokenizer, model_cfg, seed: int):
    """fn(params) -> {pass@1..k, eval_mean_reward, eval_questions} on the task's first eval_examples questions
    (those that fit), eval_samples samples each, the training's temperature and top-k, a fixed seed; calls
    hold as many questions as a training step has rows / eval_samples (the last one padded by repeats)."""
    indices, _ = eligible(task, tokenizer, rl_cfg.max_prompt_tokens)
    conversations = [task[i] for i in indices[:rl_cfg.eval_examples]]
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    S = rl_cfg.eval_samples
    per_call = max(1, rl_cfg.examples_per_step * rl_cfg.num_samples // S)

    def evaluate(params) -> dict:
        engine = FixedShapeEngine(params, model_cfg, tokenizer, rl_cfg.max_prompt_tokens, rl_cfg.max_new_tokens)
        outcomes = []
        for start in range(0, len(prompts), per_call):
            chunk = list(range(start, min(start + per_call, len(prompts))))
            chunk += [chunk[-1]] * (per_call - len(chunk))  # same shapes every call
            out = rollout(engine, task, [conversations[i] for i in chunk], [prompts[i] for i in chunk], S,
                          rl_cfg.max_new_tokens, rl_cfg.temperature, rl_cfg.top_k or None, step_seed(seed, 1, start))
            outcomes.append(out["outcomes"][:min(per_call, len(prompts) - start)])
        right = np.concatenate(outcomes) == "right"
        return dict(pass_at_k(right), eval_mean_reward=float(right.mean()), eval_questions=len(prompts))
    return evaluate


# ----------------------------------------------------------------------------------------------
# Pipeline stage


def num_iterations(rl_cfg, n_questions: int) -> int:
    """An explicit count, else one epoch of the questions that fit."""
    return rl_cfg.num_iterations if rl_cfg.num_iterations > 0 else max(1, n_questions // rl_cfg.examples_per_step)


def stage_done(config, stage: str = "rl") -> bool:
    return chat_train.stage_done(config, stage)  # the done marker naming a final checkpoint that exists


def _records(metrics_path: str) -> list[dict]:
    with open(metrics_path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def summarize(records: list[dict]) -> dict:
    """The stage's metrics from its per-step records: mean reward over the first and last tenth of the steps,
    the outcome totals, the first and last pass@k, rollout speed."""
    steps = [r for r in records if "mean_reward" in r]
    evals = [r for r in records if "pass@1" in r]
    tenth = max(1, len(steps) // 10)
    m = dict(steps=len(steps),
             mean_reward_first=float(np.mean([r["mean_reward"] for r in steps[:tenth]])),
             mean_reward_last=float(np.mean([r["mean_reward"] for r in steps[-tenth:]])),
             rollout_tok_s=float(np.median([r["rollout_tok_s"] for r in steps])),
             answer_tokens=float(np.mean([r["answer_tokens"] for r in steps])))
    m.update({f"completions_{k}": int(sum(r[k] for r in steps)) for k in OUTCOMES})
    if evals:
        m["eval_questions"] = evals[0]["eval_questions"]
    for label, r in (("first", evals[:1]), ("last", evals[-1:])):
        for key, value in (r[0].items() if r else ()):
            if key.startswith("pass@"):
                m[f"{key}_{label}"] = value
    return m


def _reward_curve_png(records: list[dict], out_path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "mean_reward" in r]
    evals = [r for r in records if "pass@1" in r]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    x, y = [r["step"] for r in steps], [r["mean_reward"] for r in steps]
    ax[0].plot(x, y, lw=0.8, label="mean reward")
    ema, smooth = None, []
    for v in y:
        ema = v if ema is None else 0.9 * ema + 0.1 * v
        smooth.append(ema)
    ax[0].plot(x, smooth, lw=1.5, label="EMA")
    ax[0].set_xlabel("step"), ax[0].set_ylabel("train reward"), ax[0].legend()
    ks = sorted({int(k[5:]) for r in evals for k in r if k.startswith("pass@")})
    for k in ks:
        ax[1].plot([r["step"] for r in evals], [r[f"pass@{k}"] for r in evals], marker="o", label=f"pass@{k}")
    ax[1].set_xlabel("step"), ax[1].set_ylabel("test pass@k")
    if ks:
        ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def run_stage(config, stage: str = "rl") -> dict:
    """Pipeline stage `rl`: from the latest SFT checkpoint, GRPO on config.rl.task's train split."""
    r = config.rl
    if not r.enabled:
        return dict(outputs=[], metrics={}, report="## Reinforcement learning\n\nOff (`config.rl.enabled` is False).\n")
    sharding.maybe_initialize_distributed()
    ckpt_lib.use_compile_cache(config.base_dir)
    tokenizer = train._load_tokenizer(config)
    params, sft_config, meta = ckpt_lib.restore_model(config.base_dir, "sft")
    ckpt_lib.check_tokenizer(meta, tokenizer.hash, f"sft step {meta['step']}")
    config = chat_train.with_parent_shape(config, sft_config)
    model_cfg = model_lib.ModelConfig.from_config(config)
    if r.max_prompt_tokens + r.max_new_tokens > model_cfg.sequence_len:
        raise UserError(f"config.rl.max_prompt_tokens + max_new_tokens = {r.max_prompt_tokens + r.max_new_tokens} "
                        f"must fit the SFT model's sequence_len={model_cfg.sequence_len}")
    data_dir = tasks_dir(config)
    task = load_task(r.task, "train", limit=r.train_examples if r.train_examples > 0 else None, data_dir=data_dir)
    if getattr(task, "eval_type", None) != "generative":
        raise UserError(f"config.rl.task={r.task!r} is not a generative task: it has no answer to reward")
    eval_task = load_task(r.task, "test", limit=r.eval_examples, data_dir=data_dir)
    mesh = sharding.make_mesh(config.mesh)
    source = RLSource(r, task, tokenizer, model_cfg, config.seed, jax.process_index(), jax.process_count())
    n_iter = num_iterations(r, len(source.indices))
    evals = [(r.eval_every, make_pass_at_k_eval(r, eval_task, tokenizer, model_cfg, config.seed))]
    log.info("rl: %d steps of %d questions x %d samples from sft step %d; %d of %d train questions fit "
             "max_prompt_tokens=%d", n_iter, r.examples_per_step, r.num_samples, meta["step"], len(source.indices),
             len(task), r.max_prompt_tokens)
    t0 = time.time()
    out = train.train_loop(config, stage, r, tokenizer, source, n_iter, r.examples_per_step * r.num_samples, evals,
                           model_cfg=model_cfg, init_params=params, mesh=mesh)
    with open(chat_train._done_path(config, stage), "w") as f:
        json.dump({"final_step": n_iter}, f)

    records = _records(out["metrics_path"])
    metrics = summarize(records)
    metrics.update(questions_too_long=source.too_long, seconds_per_step=out["seconds_per_step"],
                   wall_seconds=time.time() - t0)
    os.makedirs(report.report_dir(config.base_dir), exist_ok=True)
    png = _reward_curve_png(records, os.path.join(report.report_dir(config.base_dir), "rl_reward.png"))
    md = (f"## Reinforcement learning\n\nGRPO on {r.task} from the SFT checkpoint (step {meta['step']}): {n_iter} steps "
          f"of {r.examples_per_step} questions x {r.num_samples} samples (<= {r.max_new_tokens} new tokens, "
          f"temperature {r.temperature}, top-k {r.top_k}), pass@k on {metrics.get('eval_questions', 0)} test "
          f"questions every {r.eval_every} steps. Completions scored 0 for want of a verdict: "
          f"{metrics['completions_no_answer']:,} without a `#### <number>` answer, {metrics['completions_max_tokens']:,} "
          f"cut at {r.max_new_tokens} tokens, {metrics['completions_tool_refused']:,} with a refused or failing "
          f"calculator call; {source.too_long:,} train questions left out (prompt over {r.max_prompt_tokens} tokens)."
          f"\n\n{report.format_metrics(metrics)}\n\n![reward]({os.path.basename(png)})\n")
    print(f"rl checkpoint: {out['checkpoint']}")
    return dict(outputs=[out["checkpoint"], png], metrics=metrics, report=md)
