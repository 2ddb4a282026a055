"""RL: rewards and their edge cases, advantages, the training rows' mask, fixed-shape rollouts, resume."""
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from nanochat_jax import engine as engine_lib
from nanochat_jax import model as model_lib
from nanochat_jax import rl
from nanochat_jax.config import base_config
from nanochat_jax.tasks import load_task
from nanochat_jax.tasks.gsm8k import GSM8K, FinalAnswerTask, assistant_parts
from nanochat_jax.tokenizer import Tokenizer

GSM8K_SCORER = FinalAnswerTask()  # GSM8K's scorer, without its dataset
assert GSM8K.score is FinalAnswerTask.score


def arithmetic(n=64, split="train"):
    return load_task("arithmetic", split, limit=n)


class Wordy:
    """The arithmetic task with a preamble of 12 words before every fourth question, so that a step's longest
    prompt is shorter than 64 tokens or longer (two of the engine's prompt-length buckets)."""

    name, eval_type = "wordy_arithmetic", "generative"

    def __init__(self, n=64):
        self.task = arithmetic(n)

    def __len__(self):
        return len(self.task)

    def __getitem__(self, i):
        conv = self.task[i]
        conv["messages"][0]["content"] = "please " * (12 * (i % 4 == 0)) + conv["messages"][0]["content"]
        return conv

    def score(self, conversation, completion):
        return self.task.score(conversation, completion)


DOCS = "/usr/share/doc/python3.11/html/_sources/tutorial"


@pytest.fixture(scope="module")
def tokenizer():
    texts = [open(os.path.join(DOCS, n), encoding="utf-8").read() for n in sorted(os.listdir(DOCS))[:4]]
    return Tokenizer.train(texts, vocab_size=384)


def _gsm8k_conversation(answer: str) -> dict:
    """A conversation as the GSM8K task makes it (its answer's calculator annotations become tool parts)."""
    worked = f"Half of 8 is <<8/2=4>>4 apples, so the answer is {answer}.\n#### {answer}"
    return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": assistant_parts(worked)}]}


@pytest.mark.parametrize("reference, completion, expected", [
    ("1234", "so #### 1,234", "right"),  # commas removed
    ("-5", "it falls by 5: #### -5", "right"),  # negatives
    ("5", "#### -5", "wrong"),
    ("1234", "#### 1234.", "wrong"),  # the number takes the full stop: "1234." is not "1234"
    ("3.5", "#### 3.5", "right"),  # decimals, compared as written
    ("42", "#### 42 apples.\nThank you!", "right"),  # trailing text
    ("42", "#### 41 no wait #### 42", "wrong"),  # the first #### counts
    ("42", "#### 42 or #### 41", "right"),
    ("42", "the answer is 42", "no_answer"),
    ("42", "####42", "no_answer"),  # "#### " then the number, as the reference's regex
])
def test_reward_parsing(reference, completion, expected):
    assert rl.outcome(GSM8K_SCORER, _gsm8k_conversation(reference), completion, stopped=True, refused=0) == expected


def test_runaway_and_refused_tool_calls_score_zero_even_with_the_right_answer():
    conv = _gsm8k_conversation("42")
    assert rl.outcome(GSM8K_SCORER, conv, "#### 42", stopped=True, refused=0) == "right"
    assert rl.outcome(GSM8K_SCORER, conv, "#### 42", stopped=False, refused=0) == "max_tokens"
    assert rl.outcome(GSM8K_SCORER, conv, "#### 42", stopped=True, refused=1) == "tool_refused"


def test_tool_refusals_from_tokens_and_masks():
    PE, OS, OE = 7, 8, 9  # python_end, output_start, output_end
    served = ([1, PE, OS, 5, OE, 2], [1, 1, 0, 0, 0, 1])
    refused = ([1, PE, 2, 3], [1, 1, 1, 1])
    assert rl.tool_refusals(*served, True, PE, OS) == 0
    assert rl.tool_refusals(*refused, True, PE, OS) == 1
    assert rl.tool_refusals([1, PE], [1, 1], True, PE, OS) == 1  # refused, then the model stopped
    assert rl.tool_refusals([1, PE], [1, 1], False, PE, OS) == 0  # cut by max tokens: no verdict
    assert rl.tool_refusals([PE, 2, PE, OS, 4, OE], [1, 1, 1, 0, 0, 0], True, PE, OS) == 1


def test_advantages_are_reward_minus_the_question_mean():
    rewards = np.array([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 1]], np.float32)
    adv = rl.advantages(rewards)
    np.testing.assert_allclose(adv, [[.5, -.5, -.5, .5], [0, 0, 0, 0], [-.25, -.25, -.25, .75]])
    np.testing.assert_allclose(adv.sum(axis=1), 0, atol=1e-7)


def test_pass_at_k():
    right = np.array([[0, 1, 0], [0, 0, 0], [1, 1, 1], [0, 0, 1]], bool)
    assert rl.pass_at_k(right) == {"pass@1": 0.25, "pass@2": 0.5, "pass@3": 0.75}


def test_training_rows_learn_sampled_tokens_only():
    """Prompt, forced tool output and padding: target -1 and weight 0; sampled tokens and the stop: the advantage."""
    END = 99
    prompts = [[1, 2, 3], [4, 5]]
    completions = [[10, 11, 20, 21, 12], [13], [14, 15, 16, 17], []]  # rows prompt-major, 2 samples a prompt
    masks = [[1, 1, 0, 0, 1], [1], [1, 1, 1, 1], []]
    stopped = [True, True, False, True]
    adv = np.array([0.5, -0.5, 2.0, -1.0], np.float32)
    inputs, targets, weights = rl.training_rows(prompts, completions, masks, stopped, adv, 10, END)
    assert inputs.shape == targets.shape == weights.shape == (4, 10)
    # row 0: ids 1 2 3 10 11 20 21 12 END; learned: 10 11 12 END (20 21 were forced)
    np.testing.assert_array_equal(inputs[0], [1, 2, 3, 10, 11, 20, 21, 12, END, END])
    np.testing.assert_array_equal(targets[0], [-1, -1, 10, 11, -1, -1, 12, END, -1, -1])
    np.testing.assert_array_equal(weights[0], np.where(targets[0] != -1, 0.5, 0))
    # row 2: cut by max tokens, so no stop token is learned
    np.testing.assert_array_equal(targets[2], [-1, 14, 15, 16, 17, -1, -1, -1, -1, -1])
    # row 3: an empty completion that stopped at once: only the stop token
    np.testing.assert_array_equal(targets[3], [-1, END] + [-1] * 8)
    assert weights[3, 1] == -1.0 and weights[1][targets[1] != -1].tolist() == [-0.5, -0.5]
    with pytest.raises(ValueError, match="do not fit"):
        rl.training_rows(prompts, completions, masks, stopped, adv, 7, END)


CFG = model_lib.ModelConfig.from_depth(1, vocab_size=384, sequence_len=128, aspect_ratio=64, head_dim=32,
                                       compute_dtype="float32", attention="xla")


def _rl_cfg(**over):
    c = base_config().rl
    c.update(dict(dict(examples_per_step=4, num_samples=3, max_new_tokens=12, max_prompt_tokens=40, eval_examples=6,
                       eval_samples=2), **over))
    return c


@pytest.fixture(scope="module")
def params():
    p = model_lib.init_params(CFG, jax.random.key(0))
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(1), len(leaves))  # perturbed: the zero-initialised head samples uniformly
    return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_source_batches_have_fixed_shapes_and_compile_once(tokenizer, params):
    """Prompts of 20 to 80 tokens (two of the engine's prompt buckets) and new params every step: generation
    compiles once, and every batch has the same shape."""
    task = Wordy()
    source = rl.RLSource(_rl_cfg(max_prompt_tokens=100), task, tokenizer, CFG, seed=0)
    traces = dict(engine_lib.TRACES)
    longest = []
    for step in range(5):
        longest.append(max(len(tokenizer.render_for_completion(task[i])) for i in source.questions(source.step)))
        batch, info = source.next_batch(jax.tree.map(lambda x: x * (1 + step / 100), params))
        assert {k: v.shape for k, v in batch.items()} == {k: (12, 112) for k in ("inputs", "targets", "weights")}
        assert sum(info[k] for k in rl.OUTCOMES) == 12 and 0 <= info["mean_reward"] <= 1
        assert info["rollout_tok_s"] > 0 and 0 < info["answer_tokens"] <= 12
        assert np.all(batch["weights"][batch["targets"] == -1] == 0)
    assert min(longest) < 64 < max(longest), longest
    assert all(n - traces.get(name, 0) <= 1 for name, n in engine_lib.TRACES.items()), (traces, engine_lib.TRACES)


def test_resumed_source_repeats_questions_and_samples(tokenizer, params):
    a = rl.RLSource(_rl_cfg(), arithmetic(), tokenizer, CFG, seed=3)
    for _ in range(2):
        a.next_batch(params)
    state = a.get_state()
    expected = a.next_batch(params)
    b = rl.RLSource(_rl_cfg(), arithmetic(), tokenizer, CFG, seed=3)
    b.set_state(state)
    got = b.next_batch(params)
    for k in expected[0]:
        np.testing.assert_array_equal(got[0][k], expected[0][k])
    other = rl.RLSource(_rl_cfg(), arithmetic(), tokenizer, CFG, seed=4)
    other.set_state(state)
    assert other.questions(2) != a.questions(2)


def test_questions_cover_an_epoch_then_reshuffle(tokenizer):
    source = rl.RLSource(_rl_cfg(), arithmetic(12), tokenizer, CFG, seed=0)
    epoch = [q for s in range(3) for q in source.questions(s)]
    assert sorted(epoch) == list(range(12))
    assert sorted(q for s in range(3, 6) for q in source.questions(s)) == list(range(12))
    assert epoch != [q for s in range(3, 6) for q in source.questions(s)]


def test_long_prompts_are_left_out_and_counted(tokenizer):
    task = arithmetic(20)
    lengths = [len(tokenizer.render_for_completion(task[i])) for i in range(20)]
    cut = sorted(lengths)[10]
    source = rl.RLSource(_rl_cfg(max_prompt_tokens=cut), task, tokenizer, CFG, seed=0)
    assert source.too_long == sum(n > cut for n in lengths) > 0
    assert all(lengths[q] <= cut for s in range(2) for q in source.questions(s))


def test_pass_at_k_eval_runs_every_question(tokenizer, params):
    evaluate = rl.make_pass_at_k_eval(_rl_cfg(), arithmetic(), tokenizer, CFG, seed=0)
    out = evaluate(params)
    assert set(out) == {"pass@1", "pass@2", "eval_mean_reward", "eval_questions"}
    assert out["eval_questions"] == 6 and 0 <= out["pass@1"] <= out["pass@2"] <= 1


def test_one_rl_step_moves_the_policy_towards_the_rewarded_completion(tokenizer, params):
    """Two completions of one prompt, advantages +1/2 and -1/2, one step of the shared training step (RL's
    schedule and optimiser, the chunked loss with its negative weights): the rewarded completion gets likelier,
    the other less likely, and prompt tokens, which carry no target, add nothing to the loss."""
    from nanochat_jax import sharding, train

    c = base_config().rl
    cfg = CFG.__class__(**{**CFG.__dict__, "loss_chunk": 16})
    prompt = tokenizer.render_for_completion(arithmetic()[0])
    good, bad = tokenizer.encode("#### 2192"), tokenizer.encode("#### 17")
    batch = dict(zip(("inputs", "targets", "weights"), rl.training_rows(
        [prompt], [good, bad], [[1] * len(good), [1] * len(bad)], [True, True], np.array([.5, -.5], np.float32),
        len(prompt) + 16, tokenizer.encode_special("<|assistant_end|>"))))
    mesh = sharding.make_mesh(base_config().mesh, jax.devices()[:1])
    step_fn, init_fn, _, _, shard = train.build_step(cfg, c, 10, mesh)
    per_token = train.loss_evaluator(mesh, cfg)

    def logp(p):  # log-likelihood of each completion (and its stop token) given the prompt
        losses = per_token(p, batch["inputs"], batch["targets"])
        return -losses.sum(axis=1)

    state = init_fn(jax.random.key(0), params)
    before = logp(state[0])
    new_params, _, m = step_fn(*state, {k: sharding.global_batch(v[None], shard) for k, v in batch.items()})
    after = logp(new_params)
    assert after[0] > before[0] and after[1] < before[1], (before, after)
    expected = float((batch["weights"] * per_token(init_fn(jax.random.key(0), params)[0], batch["inputs"],
                                                   batch["targets"])).sum() / (batch["targets"] != -1).sum())
    np.testing.assert_allclose(float(m["loss"]), expected, rtol=1e-5)


# ---- the stage as a user runs it: a real process, real Orbax checkpoints, a real SIGKILL ----

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_FLAGS = [
    "--config=configs/tiny.py", "--stages=rl", "--config.mesh.data=1", "--config.rl.task=arithmetic",
    "--config.rl.train_examples=8", "--config.rl.examples_per_step=4", "--config.rl.num_samples=4",
    "--config.rl.max_new_tokens=80", "--config.rl.max_prompt_tokens=32", "--config.rl.device_batch_size=8",
    "--config.rl.num_iterations=8", "--config.rl.save_every=2", "--config.rl.eval_every=4",
    "--config.rl.eval_examples=4", "--config.rl.eval_samples=2",
]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tokenizer):
    """A base_dir with a tokenizer and an 'sft' checkpoint of a depth-1 model that has memorised 8 arithmetic
    conversations well enough to be right about a third of the time at temperature 1 (so rewards vary)."""
    import optax

    from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir

    root = tmp_path_factory.mktemp("rl_stage")
    c = base_config()
    c.model.update(dict(depth=1, aspect_ratio=64, head_dim=32, sequence_len=128, compute_dtype="float32"))
    c.tokenizer.vocab_size = tokenizer.vocab_size
    cfg = model_lib.ModelConfig.from_config(c)
    task = arithmetic(8)
    inputs, targets = np.zeros((8, 100), np.int32), np.full((8, 100), -1, np.int32)
    for r in range(8):
        ids, mask = tokenizer.render_conversation(task[r])
        inputs[r, :len(ids) - 1] = ids[:-1]
        targets[r, :len(ids) - 1] = np.where(np.array(mask[1:]) == 1, ids[1:], -1)
    p = model_lib.init_params(cfg, jax.random.key(0))
    opt = optax.adam(3e-3)

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda p: model_lib.loss_fn(p, cfg, inputs, targets)[0])(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    s = opt.init(p)
    for _ in range(150):
        p, s = step(p, s)
    tokenizer.save(root / "template" / "tokenizer")
    ckpt = Checkpointer(checkpoint_dir(str(root / "template"), "sft", "tiny"))
    ckpt.save(150, p, s, train={}, meta=dict(config=c.to_json(), tokenizer_hash=tokenizer.hash, stage="sft", step=150))
    ckpt.close()
    return root


def _stage(base_dir):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "run_pipeline.py", *STAGE_FLAGS, f"--base_dir={base_dir}"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _records(base_dir):
    path = base_dir / "logs" / "rl.jsonl"
    return [json.loads(line) for line in open(path) if line.endswith("\n")] if path.exists() else []


def test_stage_resumes_after_sigkill_with_the_same_questions_and_seeds(sft_run):
    ref_dir = sft_run / "reference"
    shutil.copytree(sft_run / "template", ref_dir)
    out, _ = (proc := _stage(ref_dir)).communicate(timeout=600)
    assert proc.returncode == 0, out
    reference = _records(ref_dir)
    assert [r["step"] for r in reference] == list(range(9))  # step 0: the first evaluation
    steps = reference[1:]
    assert len({r["mean_reward"] for r in steps}) > 1 and any(r["loss"] != 0 for r in steps)  # rewards vary
    assert sum(r[k] for r in steps for k in rl.OUTCOMES) == 8 * 16
    assert {"pass@1", "pass@2"} <= set(reference[4]) and {"pass@1", "pass@2"} <= set(reference[8])
    summary = json.loads((ref_dir / "report" / "rl.json").read_text())
    assert summary["steps"] == 8 and "mean_reward_first" in summary and "completions_tool_refused" in summary
    assert (ref_dir / "report" / "rl_reward.png").stat().st_size > 0
    assert "## Reinforcement learning" in (ref_dir / "report.md").read_text()

    run_dir = sft_run / "killed"
    shutil.copytree(sft_run / "template", run_dir)
    proc = _stage(run_dir)
    deadline = time.time() + 300
    while proc.poll() is None and len(_records(run_dir)) < 4 and time.time() < deadline:
        time.sleep(0.05)  # past step 2's checkpoint, into step 3 or 4
    assert proc.poll() is None, proc.stdout.read()
    proc.kill()
    proc.wait()
    out, _ = (proc := _stage(run_dir)).communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "resumed from step" in out
    resumed = _records(run_dir)
    assert [r["step"] for r in resumed] == list(range(9))
    keys = ("loss", "mean_reward", "answer_tokens", "pass@1", *rl.OUTCOMES)
    assert [{k: r.get(k) for k in keys} for r in resumed] == [{k: r.get(k) for k in keys} for r in reference]
    out, _ = (proc := _stage(run_dir)).communicate(timeout=600)  # complete: a rerun skips the stage
    assert proc.returncode == 0 and "stage rl: complete, skipped" in out, out


@pytest.mark.parametrize("key, value, message", [
    ("num_samples", 0, "config.rl.num_samples must be > 0"),
    ("top_k", -1, "config.rl.temperature and top_k must be >= 0"),
    ("init_lr_frac", 0.0, "config.rl.init_lr_frac must be > 0"),
    ("eval_samples", 300, "config.rl.eval_samples=300 must be <= examples_per_step x num_samples"),
])
def test_bad_rl_config_names_the_key(key, value, message):
    from nanochat_jax.config import ConfigError, validate

    c = base_config()
    c.rl[key] = value
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        validate(c)


def test_stage_off_by_the_switch(tmp_path):
    c = base_config()
    c.base_dir, c.rl.enabled = str(tmp_path), False
    out = rl.run_stage(c)
    assert out["outputs"] == [] and "Off" in out["report"] and not os.listdir(tmp_path)
