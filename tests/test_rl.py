"""RL: rewards and their edge cases, advantages, the training rows' mask, fixed-shape rollouts, resume."""
import os
import random

import jax
import numpy as np
import pytest

from nanochat_jax import engine as engine_lib
from nanochat_jax import model as model_lib
from nanochat_jax import rl
from nanochat_jax.config import base_config
from nanochat_jax.tokenizer import Tokenizer

DOCS = "/usr/share/doc/python3.11/html/_sources/tutorial"


class ToySums:
    """`What is a + b?` answered through the calculator and `#### a+b`, like the arithmetic task."""

    name, eval_type = "toy_sums", "generative"

    def __init__(self, n=64, seed=0):
        rng = random.Random(seed)
        self.pairs = [(rng.randint(1, 99), rng.randint(1, 99)) for _ in range(n)]

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        a, b = self.pairs[i]
        question = "What is " + " + ".join(["1"] * (i % 5)) + f" {a} + {b}?"  # prompts of several lengths
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": [
            {"type": "python", "text": f"{a}+{b}"}, {"type": "python_output", "text": str(a + b)},
            {"type": "text", "text": f"#### {a + b}"}]}]}

    def score(self, conversation, completion):
        content = conversation["messages"][-1]["content"]
        reference = content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")
        answer = lambda text: (m := rl.ANSWER_RE.search(text)) and m.group(1).replace(",", "")
        return answer(completion) is not None and answer(completion) == answer(reference)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [open(os.path.join(DOCS, n), encoding="utf-8").read() for n in sorted(os.listdir(DOCS))[:4]]
    return Tokenizer.train(texts, vocab_size=384)


def _reference(answer: str) -> dict:
    return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"... #### {answer}"}]}


@pytest.mark.parametrize("reference, completion, expected", [
    ("1234", "so #### 1,234", "right"),  # commas removed
    ("-5", "it falls by 5: #### -5", "right"),  # negatives
    ("5", "#### -5", "wrong"),
    ("3.5", "#### 3.5", "right"),  # decimals, compared as written
    ("42", "#### 42 apples.\nThank you!", "right"),  # trailing text
    ("42", "#### 41 no wait #### 42", "wrong"),  # the first #### counts
    ("42", "#### 42 or #### 41", "right"),
    ("42", "the answer is 42", "no_answer"),
    ("42", "####42", "no_answer"),  # "#### " then the number, as the reference's regex
])
def test_reward_parsing(reference, completion, expected):
    assert rl.outcome(ToySums(), _reference(reference), completion, stopped=True, refused=0) == expected


def test_runaway_and_refused_tool_calls_score_zero_even_with_the_right_answer():
    conv = _reference("42")
    assert rl.outcome(ToySums(), conv, "#### 42", stopped=False, refused=0) == "max_tokens"
    assert rl.outcome(ToySums(), conv, "#### 42", stopped=True, refused=1) == "tool_refused"


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
    source = rl.RLSource(_rl_cfg(), ToySums(), tokenizer, CFG, seed=0)
    batch, info = source.next_batch(params)
    assert {k: v.shape for k, v in batch.items()} == {k: (12, 52) for k in ("inputs", "targets", "weights")}
    assert sum(info[k] for k in rl.OUTCOMES) == 12 and 0 <= info["mean_reward"] <= 1
    assert info["rollout_tok_s"] > 0 and 0 < info["answer_tokens"] <= 12
    # weights follow the advantages: zero-sum over each question's sampled tokens only where all equal
    assert np.all(batch["weights"][batch["targets"] == -1] == 0)
    traces = dict(engine_lib.TRACES)
    lengths = set()
    for _ in range(3):  # other questions (prompts of other lengths), new params: nothing compiles again
        lengths |= {len(tokenizer.render_for_completion(ToySums()[i])) for i in source.questions(source.step)}
        source.next_batch(jax.tree.map(lambda x: x * 1.01, params))
    assert len(lengths) > 1
    assert dict(engine_lib.TRACES) == traces


def test_resumed_source_repeats_questions_and_samples(tokenizer, params):
    a = rl.RLSource(_rl_cfg(), ToySums(), tokenizer, CFG, seed=3)
    for _ in range(2):
        a.next_batch(params)
    state = a.get_state()
    expected = a.next_batch(params)
    b = rl.RLSource(_rl_cfg(), ToySums(), tokenizer, CFG, seed=3)
    b.set_state(state)
    got = b.next_batch(params)
    for k in expected[0]:
        np.testing.assert_array_equal(got[0][k], expected[0][k])
    other = rl.RLSource(_rl_cfg(), ToySums(), tokenizer, CFG, seed=4)
    other.set_state(state)
    assert other.questions(2) != a.questions(2)


def test_questions_cover_an_epoch_then_reshuffle(tokenizer):
    source = rl.RLSource(_rl_cfg(), ToySums(n=12), tokenizer, CFG, seed=0)
    epoch = [q for s in range(3) for q in source.questions(s)]
    assert sorted(epoch) == list(range(12))
    assert sorted(q for s in range(3, 6) for q in source.questions(s)) == list(range(12))
    assert epoch != [q for s in range(3, 6) for q in source.questions(s)]


def test_long_prompts_are_left_out_and_counted(tokenizer):
    task = ToySums(n=20)
    lengths = [len(tokenizer.render_for_completion(task[i])) for i in range(20)]
    cut = sorted(lengths)[10]
    source = rl.RLSource(_rl_cfg(max_prompt_tokens=cut), task, tokenizer, CFG, seed=0)
    assert source.too_long == sum(n > cut for n in lengths) > 0
    assert all(lengths[q] <= cut for s in range(2) for q in source.questions(s))


def test_pass_at_k_eval_runs_every_question(tokenizer, params):
    evaluate = rl.make_pass_at_k_eval(_rl_cfg(), ToySums(), tokenizer, CFG, seed=0)
    out = evaluate(params)
    assert set(out) == {"pass@1", "pass@2", "eval_mean_reward", "eval_questions"}
    assert out["eval_questions"] == 6 and 0 <= out["pass@1"] <= out["pass@2"] <= 1
