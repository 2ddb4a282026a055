"""Conversations -> rows (mid's packed stream, SFT's padded masked rows) and the step's weighted loss."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nanochat_jax import chat_data, train
from nanochat_jax import model as model_lib
from nanochat_jax.tokenizer import Tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. What is two plus three? It is five. "
        "Spell the word apple: a,p,p,l,e. How many r are in strawberry? ") * 40


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], vocab_size=300)


def _conv(q="What is 2+3?", a="It is 5."):
    return {"messages": [{"role": "user", "content": q},
                         {"role": "assistant", "content": [{"type": "text", "text": "Let me see. "},
                                                           {"type": "python", "text": "2+3"},
                                                           {"type": "python_output", "text": "5"},
                                                           {"type": "text", "text": a}]}]}


BAD = [
    {"messages": [{"content": "no role"}]},
    {"messages": [{"role": "robot", "content": "unknown role"}]},
    {"messages": [{"role": "assistant", "content": "starts with the assistant"}]},
    {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
    {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "empty question"}]},
    {"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "x"}]},
    {"messages": "not a list"},
    None,
]


def test_bad_conversations_are_counted_never_crash_never_vanish(tok):
    counts = chat_data.RenderCounts()
    good = _conv()
    refused = {"messages": [{"role": "user", "content": "q"},
                            {"role": "assistant", "content": [{"type": "python", "text": "__import__('os')"},
                                                              {"type": "text", "text": "no"}]}]}
    out = [chat_data.render(tok, c, 10_000, counts) for c in [good, *BAD, refused]]
    assert out[0] == tuple(tok.render_conversation(good)) and out[-1] is not None
    assert all(o is None for o in out[1:-1])
    assert counts == {"rendered": 2, "skipped_invalid": len(BAD), "calculator_refused": 1}
    long_ids, _ = chat_data.render(tok, _conv(a="It is five. " * 50), 40, counts)
    assert len(long_ids) == 40 and counts["truncated"] == 1
    assert "skipped_invalid 8" in counts.markdown("x") and "truncated 1" in counts.markdown("x")


def test_packed_rows_follow_the_stream_and_resume(tok):
    convs = [_conv(a=f"It is {i}.") for i in range(30)]
    counts = chat_data.RenderCounts()
    tokens, mask = chat_data.render_stream(tok, convs, 1000, counts)
    ids, m = tok.render_conversation(convs[0])
    assert tokens[:len(ids)].tolist() == ids and mask[:len(ids)].tolist() == m  # each starts with its own BOS
    T = 15
    src = chat_data.PackedChatSource(tokens, mask, T, rows_per_step=4)
    b0, _ = src.next_batch()
    rows = tokens[:4 * (T + 1)].reshape(4, T + 1)  # rows of T+1 straight from the stream, no padding
    np.testing.assert_array_equal(b0["inputs"], rows[:, :-1])
    np.testing.assert_array_equal(b0["targets"], rows[:, 1:])  # mid trains on every token by default
    b1, _ = src.next_batch()
    state = src.get_state()
    b2, _ = src.next_batch()
    again = chat_data.PackedChatSource(tokens, mask, T, rows_per_step=4)
    again.set_state(state)
    np.testing.assert_array_equal(again.next_batch()[0]["inputs"], b2["inputs"])
    assert not np.array_equal(b1["inputs"], b2["inputs"])
    masked = chat_data.PackedChatSource(tokens, mask, T, rows_per_step=4, supervise="assistant").next_batch()[0]
    np.testing.assert_array_equal(masked["targets"], np.where(mask[:4 * (T + 1)].reshape(4, T + 1)[:, 1:] == 1,
                                                             rows[:, 1:], -1))
    # two processes take disjoint halves of each step's rows
    halves = [chat_data.PackedChatSource(tokens, mask, T, 4, "all", p, 2).next_batch()[0]["inputs"] for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(halves), b0["inputs"])


def test_padded_rows_mask_everything_but_the_assistant(tok):
    pad = tok.encode_special("<|assistant_end|>")
    rendered = [tok.render_conversation(_conv(a="It is 5." * k)) for k in (1, 3)]
    src = chat_data.PaddedChatSource(rendered, rows_per_step=2, pad_id=pad, max_len=256)
    batch, _ = src.next_batch()
    assert batch["inputs"].shape == (2, 64)  # the longest row rounded up to the 64 bucket
    for row, (ids, mask) in enumerate(rendered):
        n = len(ids) - 1
        assert batch["inputs"][row, :n].tolist() == ids[:-1] and set(batch["inputs"][row, n:].tolist()) <= {pad}
        want = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        assert batch["targets"][row, :n].tolist() == want and set(batch["targets"][row, n:].tolist()) == {-1}
    supervised = tok.decode([t for t in batch["targets"][0] if t >= 0])
    assert supervised == "Let me see. <|python_start|>2+3<|python_end|>It is 5.<|assistant_end|>"
    assert chat_data.row_bucket([(list(range(300)), [])], 256) == 256  # capped at the context


def _tiny_model():
    cfg = model_lib.ModelConfig.from_depth(1, vocab_size=300, sequence_len=64, aspect_ratio=64, head_dim=32,
                                           compute_dtype="float32", attention="xla", kernels="xla")
    params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
    head = params["lm_head"]["kernel"]  # zero at init (SPEC): uniform logits would make every target alike
    params["lm_head"]["kernel"] = 0.1 * jax.random.normal(jax.random.PRNGKey(1), head.shape, head.dtype)
    return cfg, params


_SGD = optax.sgd(1.0)
_STEPS = {}


def _step_grads(cfg, params, batch):
    """loss and gradients of train.make_train_step's step (SGD with LR 1: new params = params - grads)."""
    step = _STEPS.setdefault(cfg, jax.jit(train.make_train_step(cfg, _SGD)))  # one compile per batch shape
    new, _, m = step(params, _SGD.init(params), {k: jnp.asarray(v) for k, v in batch.items()})
    return float(m["loss"]), jax.tree.map(lambda a, b: a - b, params, new)


def test_padding_and_masked_targets_never_reach_the_loss(tok):
    cfg, params = _tiny_model()
    pad = tok.encode_special("<|assistant_end|>")
    rendered = [tok.render_conversation(_conv(a="It is 5." * k)) for k in (1, 4)]
    batch = chat_data.padded_batch(rendered, pad, 64)
    batch = {k: v[None] for k, v in batch.items()}  # one micro-batch
    loss, grads = _step_grads(cfg, params, batch)
    rng = np.random.default_rng(0)
    junk = dict(batch)
    ignored = batch["targets"] == -1
    n0 = len(rendered[0][0]) - 1
    junk["inputs"] = batch["inputs"].copy()
    junk["inputs"][0, 0, n0:] = rng.integers(0, 300, 64 - n0)  # other padding (after the row's last token)
    junk["weights"] = np.where(ignored, rng.normal(size=ignored.shape) * 100, batch["weights"]).astype(np.float32)
    loss2, grads2 = _step_grads(cfg, params, junk)
    assert loss2 == pytest.approx(loss, rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, grads2)
    changed = dict(batch, targets=np.where(ignored, batch["targets"], (batch["targets"] + 1) % 300))
    assert _step_grads(cfg, params, changed)[0] != pytest.approx(loss)  # a supervised target does count


def test_weighted_step_of_ones_is_the_mean_over_the_whole_step():
    """Weights 1 over two micro-batches of unequal supervised counts = one mean over every supervised token
    (not the mean of the two micro-batch means)."""
    cfg, params = _tiny_model()
    rng = np.random.default_rng(1)
    inputs = rng.integers(0, 300, (2, 2, 32)).astype(np.int32)
    targets = rng.integers(0, 300, (2, 2, 32)).astype(np.int32)
    targets[1, :, 8:] = -1  # the second micro-batch supervises 16 tokens, the first 64
    loss, grads = _step_grads(cfg, params, dict(inputs=inputs, targets=targets, weights=np.ones((2, 2, 32), np.float32)))
    flat = lambda a: a.reshape(4, 32)
    want, want_grads = jax.value_and_grad(lambda p: model_lib.loss_fn(p, cfg, flat(inputs), flat(targets))[0])(params)
    assert loss == pytest.approx(float(want), rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7), grads, want_grads)


def test_sft_multiple_choice_eval_scores_the_params_it_is_given(tok, monkeypatch):
    """SFT's MMLU / ARC-Easy accuracy: the chat evals' categorical scorer on the current params (one Forward,
    params swapped in), here on a 4-problem task whose right letter the test controls."""
    from evals import chat_eval
    from nanochat_jax import chat_train, sharding
    from nanochat_jax.config import base_config

    cfg, params = _tiny_model()
    conv = lambda answer: {"messages": [{"role": "user", "content": "Pick one: A or B?"}], "letters": ["A", "B"],
                           "answer": answer}
    task = type("Task", (), {"eval_type": "categorical", "name": "ab", "__len__": lambda self: 4,
                             "__getitem__": lambda self, i: conv("AB"[i % 2])})()
    monkeypatch.setattr(chat_eval, "load_eval_task", lambda name, limit, data_dir: task)
    config = base_config()
    config.sft.mc_eval_tasks = "ARC-Easy"
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    evaluate = chat_train._mc_eval(config, cfg, mesh, tok, config.sft)
    a, b = tok.encode("A")[0], tok.encode("B")[0]
    prefer = lambda letter: {**params, "lm_head": {"kernel": params["lm_head"]["kernel"].at[:, a if letter == "A" else b]
                                                   .add(100.0)}}  # that letter's logit wins everywhere
    assert evaluate(prefer("A")) == {"ARC-Easy": 0.5} and evaluate(prefer("B")) == {"ARC-Easy": 0.5}
    type(task).__getitem__ = lambda self, i: conv("A")  # now every answer is A
    assert evaluate(prefer("A")) == {"ARC-Easy": 1.0} and evaluate(prefer("B")) == {"ARC-Easy": 0.0}
