"""Engine: cached logits equal full-forward logits, both drivers sample what they should, tools are forced."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanochat_jax import engine as E
from nanochat_jax import model as M

SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]


class ByteTokenizer:
    """Minimal stand-in: ids 0..255 are bytes, 256.. the special tokens."""
    bos_id = 256

    def encode_special(self, name):
        return 256 + SPECIALS.index(name)

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def render_for_completion(self, conversation):
        sp = self.encode_special
        ids = [self.bos_id]
        for m in conversation["messages"]:
            role = "<|user_start|>" if m["role"] == "user" else "<|assistant_start|>"
            ids += [sp(role), *self.encode(m["content"]), sp(role.replace("start", "end"))]
        return ids + [sp("<|assistant_start|>")]


TOK = ByteTokenizer()
PS, PE, OS, OE = (TOK.encode_special(n) for n in SPECIALS[5:])
END = TOK.encode_special("<|assistant_end|>")
CFG = M.ModelConfig.from_depth(2, vocab_size=512, sequence_len=256, aspect_ratio=32, head_dim=16,
                               compute_dtype="float32", attention="xla")


@pytest.fixture(scope="module")
def params():
    """Random init with every leaf perturbed (the zero-initialised projections and head would make
    all logits equal)."""
    p = M.init_params(CFG, jax.random.key(0))
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def engine(params):
    return E.Engine(params, CFG, TOK)


def full_forward_greedy(params, prompt, max_tokens, stop_ids):
    """Argmax of a full causal forward at the last token, one token at a time (right-padded to a fixed
    length, which causality makes harmless, so it compiles once)."""
    forward = jax.jit(lambda p, toks: M.logits_fn(p, CFG, toks))
    seq, out = list(prompt), []
    for _ in range(max_tokens):
        padded = np.zeros((1, CFG.sequence_len), np.int32)
        padded[0, :len(seq)] = seq
        t = int(jnp.argmax(forward(params, padded)[0, len(seq) - 1]))
        if t in stop_ids:
            break
        seq.append(t)
        out.append(t)
    return out


def test_prefill_and_decode_logits_equal_full_forward(params):
    """Two prompts of different lengths in one batch (per-row positions), then forced tokens."""
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 256, 30).tolist(), rng.integers(0, 256, 30).tolist()]
    lengths = [11, 20]
    tokens = np.zeros((2, 64), np.int32)
    for row, s, n in zip(tokens, seqs, lengths):
        row[:n] = s[:n]
    logits, cache, positions = E.prefill(params, CFG, tokens, np.array(lengths, np.int32), max_len=128, copies=1)
    cached = [[logits[0]], [logits[1]]]
    key = jax.random.key(0)
    for step in range(8):
        forced = np.array([s[n + step] for s, n in zip(seqs, lengths)], np.int32)
        _, logits, positions, cache = E.decode(params, CFG, None, None, logits, key, step, jnp.float32(1.0), forced,
                                               positions, cache)
        for row in range(2):
            cached[row].append(logits[row])
    for row, (s, n) in enumerate(zip(seqs, lengths)):
        full = M.logits_fn(params, CFG, jnp.array([s[:n + 8]]))[0, n - 1:]
        got = jnp.stack(cached[row])
        assert float(jnp.max(jnp.abs(got - full)) / jnp.max(jnp.abs(full))) < 1e-4


def test_greedy_equals_argmax_of_full_forward_in_both_drivers(engine, params):
    """The longer row passes position 128, where both drivers move from reading the cache's first 128
    slots to all 256 (the on-device driver from its first while loop to its second)."""
    prompts = [[1, 2, 3, 4, 5], list(range(60, 120))]
    assert E._attend_buckets(64 + 1, 256) == [128, 256]
    want = [full_forward_greedy(params, p, 80, engine.stop_ids) for p in prompts]
    assert len(want[1]) + 60 > 128, "the test needs a row that crosses the first attention length"
    on_device, masks = engine.generate_batch(prompts, max_tokens=80, temperature=0.0)
    streamed, _ = engine.generate_batch(prompts, max_tokens=80, temperature=0.0, use_tools=True)
    assert on_device == want and streamed == want
    assert masks == [[1] * len(r) for r in want]


def test_sampling_is_deterministic_per_seed_and_drivers_agree(engine):
    kw = dict(num_samples=3, max_tokens=16, temperature=1.0, top_k=50)
    a, _ = engine.generate_batch([7, 8, 9], seed=1, **kw)
    b, _ = engine.generate_batch([7, 8, 9], seed=1, **kw)
    c, _ = engine.generate_batch([7, 8, 9], seed=2, **kw)
    streamed, _ = engine.generate_batch([7, 8, 9], seed=1, use_tools=True, **kw)
    assert a == b == streamed
    assert a != c


def test_num_samples_share_one_prefill(engine):
    """Greedy copies equal the single greedy row; sampled copies are independent rows."""
    single, _ = engine.generate_batch([3, 1, 4, 1, 5], max_tokens=10, temperature=0.0)
    copies, _ = engine.generate_batch([3, 1, 4, 1, 5], num_samples=4, max_tokens=10, temperature=0.0)
    assert copies == single * 4
    sampled, _ = engine.generate_batch([3, 1, 4, 1, 5], num_samples=4, max_tokens=10, temperature=2.0)
    assert len({tuple(r) for r in sampled}) > 1


@pytest.mark.parametrize("k", [1, 50, 1024])
def test_two_round_top_k_equals_lax_top_k(k):
    x = jax.random.normal(jax.random.key(0), (3, 16 * E.TOP_K_BLOCK))
    x = x.at[1, 5].set(x[1].max() + 1).at[2, -1].set(x[2].max() + 1)  # winners in the first and last block
    vals, idx = E._top_k(x, k)
    ref_vals, ref_idx = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(vals, ref_vals)
    np.testing.assert_array_equal(idx, ref_idx)  # distinct random values: no ties to order


@pytest.mark.parametrize("top_k, top_p", [(3, None), (None, 0.6), (10, 0.5)])
def test_top_k_top_p_restrict_the_support(top_k, top_p):
    logits = jax.random.normal(jax.random.key(3), (1, 64)) * 2.0
    draws = jax.vmap(lambda k: E.sample_tokens(logits, k, 1.0, top_k, top_p)[0])(
        jax.random.split(jax.random.key(4), 2000))
    order = np.argsort(-np.asarray(logits[0]))
    allowed = order[:top_k] if top_k else order
    if top_p:
        kept = np.asarray(logits[0])[allowed]
        probs = np.exp(kept - kept.max()) / np.exp(kept - kept.max()).sum()
        before = np.cumsum(probs) - probs
        allowed = allowed[before < top_p]
    seen = set(np.asarray(draws).tolist())
    assert seen <= set(allowed.tolist())
    assert len(seen) == len(allowed)  # 2000 draws hit every allowed token (each has mass >= 1/64-ish)


def bigram_params(successor: dict[int, int]):
    """A real GPT whose blocks add nothing and whose head maps the current token to successor[token]:
    a scripted model for the tool and stop tests."""
    p = jax.tree.map(jnp.zeros_like, M.init_params(CFG, jax.random.key(0)))
    D = CFG.d_model
    slots = {t: i + 1 for i, t in enumerate(successor)}  # slot 0: every other token
    wte = np.zeros((CFG.vocab_size, D), np.float32)
    wte[:, 0] = 1.0
    head = np.zeros((D, CFG.vocab_size), np.float32)
    for t, nxt in successor.items():
        wte[t] = 0.0
        wte[t, slots[t]] = 1.0
        head[slots[t], nxt] = 5.0
    p["wte"]["embedding"] = jnp.asarray(wte)
    p["lm_head"]["kernel"] = jnp.asarray(head)
    return p


def script(*pieces):
    """Successor table from a token path: ints stay, strings become their bytes."""
    path = [t for piece in pieces for t in (TOK.encode(piece) if isinstance(piece, str) else [piece])]
    table = dict(zip(path[:-1], path[1:]))
    assert len(table) == len(path) - 1, "a scripted token must not repeat"
    return table


A = ord("A")


def stream(engine, prompt, **kw):
    return [(col[0], mask[0]) for col, mask in engine.generate(prompt, temperature=0.0, **kw)]


def test_tool_output_is_forced_after_python_end():
    table = script(A, PS, "1+2", PE, ord("z"), END)
    table[OE] = END
    eng = E.Engine(bigram_params(table), CFG, TOK)
    got = stream(eng, [A], max_tokens=30)
    assert [t for t, _ in got] == [PS, *TOK.encode("1+2"), PE, OS, ord("3"), OE, END]
    assert [m for _, m in got] == [1, 1, 1, 1, 1, 0, 0, 0, 1]
    without = stream(eng, [A], max_tokens=30, use_tools=False)
    assert [t for t, _ in without] == [PS, *TOK.encode("1+2"), PE, ord("z"), END]
    tokens, masks = eng.generate_batch([A], max_tokens=30, temperature=0.0, use_tools=True)
    assert tokens == [[t for t, _ in got[:-1]]] and masks == [[m for _, m in got[:-1]]]


def test_refused_expression_forces_nothing_and_generation_goes_on():
    table = script(A, PS, "os.getcwd()", PE, ord("z"), END)
    eng = E.Engine(bigram_params(table), CFG, TOK)
    got = [t for t, _ in stream(eng, [A], max_tokens=40)]
    assert got == [PS, *TOK.encode("os.getcwd()"), PE, ord("z"), END]


@pytest.mark.parametrize("stop", [END, TOK.bos_id])
def test_rows_stop_on_assistant_end_or_bos(stop):
    eng = E.Engine(bigram_params(script(A, ord("b"), ord("c"), stop)), CFG, TOK)
    tokens, _ = eng.generate_batch([[A], [ord("b")]], max_tokens=20, temperature=0.0)
    assert tokens == [[ord("b"), ord("c")], [ord("c")]]
    columns = list(eng.generate([[A], [ord("b")]], max_tokens=20, temperature=0.0))
    assert len(columns) == 3  # row 1 stops at step 2, row 0 at step 3
    assert columns[1] == ([ord("c"), stop], [1, 1]) and columns[2] == ([stop, TOK.bos_id], [1, 0])


def test_max_tokens_and_context_end_bound_generation():
    eng = E.Engine(bigram_params({A: ord("b"), ord("b"): A}), CFG, TOK)
    tokens, _ = eng.generate_batch([A], max_tokens=7, temperature=0.0)
    assert tokens == [[ord("b"), A] * 3 + [ord("b")]]
    long_prompt = [A] * (CFG.sequence_len - 5)
    assert len(list(eng.generate(long_prompt, temperature=0.0))) == 5  # max_tokens None: until the context is full
    with pytest.raises(ValueError, match="no room"):
        eng.generate_batch([A] * CFG.sequence_len)
    for bad in (dict(num_samples=0), dict(top_k=0), dict(top_p=0.0), dict(max_tokens=0)):
        with pytest.raises(ValueError):
            eng.generate_batch([A], **bad)
    with pytest.raises(ValueError, match="at least one token"):
        eng.generate_batch([[A], []])


def test_twenty_turn_chat_compiles_a_bounded_number_of_times(engine):
    """Growing prompts (cut to the context like the CLI) hit at most one prefill per length bucket
    and one decode compile per attention length."""
    before = E.TRACES.copy()
    prompt = [TOK.bos_id]
    for turn in range(20):
        prompt += [TOK.encode_special("<|user_start|>"), *TOK.encode(f"turn {turn}"),
                   TOK.encode_special("<|user_end|>"), TOK.encode_special("<|assistant_start|>")]
        prompt = prompt[-(CFG.sequence_len - 16):]
        stream = engine.generate(prompt, temperature=0.7, top_k=20, seed=turn)  # max_tokens None, as in chat
        prompt += [col[0] for col, _ in itertools.islice(stream, 6)]
    buckets = len({64, 128, 256})
    assert E.TRACES["prefill"] - before["prefill"] <= buckets
    assert E.TRACES["decode"] - before["decode"] <= len({128, 256})


# ----------------------------------------------------------------------------------------------
# Python API and CLI session

AS, US, UE = (TOK.encode_special(n) for n in ("<|assistant_start|>", "<|user_start|>", "<|user_end|>"))


@pytest.fixture(scope="module")
def ok_model():
    """Answers every turn with 'ok'."""
    return E.ChatModel(E.Engine(bigram_params(script(AS, ord("o"), ord("k"), END)), CFG, TOK))


def test_chat_model_api(ok_model):
    assert ok_model.chat([{"role": "user", "content": "hi"}], temperature=0.0) == "ok"
    assert list(ok_model.generate([TOK.bos_id, AS], temperature=0.0)) == [ord("o"), ord("k"), END]


def test_chat_session_keeps_tokens_refuses_empty_and_cuts_from_the_left(ok_model):
    import io

    from nanochat_jax.chat_cli import ChatSession

    out = io.StringIO()
    session = ChatSession(ok_model, temperature=0.0, out=out)
    assert session.ask("   ") is None and session.history == [] and "empty" in out.getvalue()
    assert session.ask("hi") == "ok"
    first = [TOK.bos_id, US, *TOK.encode("hi"), UE, AS, ord("o"), ord("k"), END]
    assert session.history == first
    assert session.ask("yo") == "ok"
    assert session.history == first + [US, *TOK.encode("yo"), UE, AS, ord("o"), ord("k"), END]
    assert "notice" not in out.getvalue()
    assert session.ask("x" * 300) == "ok"
    assert "notice" in out.getvalue() and "dropped" in out.getvalue()
    assert session.history[0] == TOK.bos_id
    assert session.history[-9:] == [*TOK.encode("xxxx"), UE, AS, ord("o"), ord("k"), END]
    assert len(session.history) == CFG.sequence_len - session.reserve + 3


def test_cli_refuses_empty_prompt_and_reports_a_missing_checkpoint(tmp_path, capsys):
    from nanochat_jax.chat_cli import main

    assert main(["-p", "  ", "--base_dir", str(tmp_path)]) == 2
    assert "non-empty prompt" in capsys.readouterr().err
    assert main(["--stage", "sft", "--base_dir", str(tmp_path), "-p", "hello"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint of stage 'sft'" in err and "Traceback" not in err


def test_load_model_is_importable_from_the_package():
    from nanochat_jax import load_model

    assert load_model is E.load_model


def test_cli_end_to_end_through_a_saved_checkpoint(tmp_path):
    """Train a tiny tokenizer, save a tiny random model through checkpoint.py, answer one prompt
    with `python -m nanochat_jax.chat_cli`."""
    import os
    import subprocess
    import sys

    from nanochat_jax import tokenizer as tokenizer_lib
    from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir
    from nanochat_jax.config import base_config

    texts = [f"hello world, the cat number {i} sat on {i * 7} mats; quick brown fox." for i in range(300)]
    tok = tokenizer_lib.Tokenizer.train(texts, 300)
    tok.save(str(tmp_path / "tokenizer"))
    config = base_config()
    config.model.depth, config.model.head_dim, config.model.sequence_len = 1, 64, 128
    config.model.compute_dtype, config.tokenizer.vocab_size = "float32", tok.vocab_size
    params = M.init_params(M.ModelConfig.from_config(config), jax.random.key(0))
    ckpt = Checkpointer(checkpoint_dir(str(tmp_path), "sft", "tiny"), async_save=False)
    ckpt.save(3, params, {"count": jnp.zeros((), jnp.int32)}, {"step": 3},
              {"config": config.to_json(), "tokenizer_hash": tok.hash})
    ckpt.close()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = lambda *args: subprocess.run([sys.executable, "-m", "nanochat_jax.chat_cli", "--base_dir", str(tmp_path),
                                        *args], capture_output=True, text=True, env=env, timeout=300)
    done = run("--stage", "sft", "-p", "hello " * 200, "--temperature", "0")
    assert done.returncode == 0, done.stderr
    assert "notice" in done.stdout and "dropped" in done.stdout  # 200+ tokens > the 128-token context
    missing = run("--stage", "sft", "--step", "7", "-p", "hello")
    assert missing.returncode == 2 and "no checkpoint at step 7" in missing.stderr
    assert "Traceback" not in missing.stderr


# ----------------------------------------------------------------------------------------------
# Tools on device, many prompts


def streamed_rows(engine, prompts, **kw):
    """(rows, masks) as the streaming driver yields them, each row cut before its stop token."""
    n = len(E._as_batch(prompts)) * kw.get("num_samples", 1)
    rows, masks, done = [[] for _ in range(n)], [[] for _ in range(n)], [False] * n
    for column, mask in engine.generate(prompts, **kw):
        for i, (t, m) in enumerate(zip(column, mask)):
            done[i] = done[i] or (m == 1 and t in engine.stop_ids)
            if not done[i]:
                rows[i].append(t)
                masks[i].append(m)
    return rows, masks


def test_tool_calls_on_device_equal_the_streaming_driver():
    """Row 1 closes its call while row 0 is still forcing its 10-token result (the host keeps what is
    left of row 0's buffer); a refused call forces nothing; a 19-character result outgrows the 16-wide buffer."""
    C, D, F, G = (ord(c) for c in "CDFG")
    table = script(C, D, F, A, PS, "12345*6789", PE, G, END)
    table[OE] = G
    eng = E.Engine(bigram_params(table), CFG, TOK)
    before = E.TRACES.copy()
    prompts = [[A], [C], [G]]
    got = eng.generate_batch(prompts, max_tokens=40, temperature=0.0, use_tools=True)
    want = streamed_rows(eng, prompts, max_tokens=40, temperature=0.0)
    assert got == want
    result = TOK.encode(str(12345 * 6789))
    rows, masks = got
    assert rows[0] == [PS, *TOK.encode("12345*6789"), PE, OS, *result, OE, G]
    assert rows[1][:3] == [D, F, A] and rows[1][3:] == rows[0] and rows[2] == []
    assert masks[0] == [1] * 12 + [0] * (len(result) + 2) + [1]
    # two exits (steps 12 and 15), one resume compile: both buffers are 16 wide
    assert E.TRACES["generate"] - before["generate"] == 1 and E.TRACES["resume"] - before["resume"] == 1

    # the same shapes below (3 rows, 40 tokens): compiled already
    long_table = script(A, PS, "1/7", PE, G, END)  # 0.14285714285714285: 21 forced tokens
    long_table[OE] = END
    for table, n_forced in ((long_table, 21), (script(A, PS, "os.getcwd()", PE, G, END), 0)):
        eng = E.Engine(bigram_params(table), CFG, TOK)
        rows, masks = eng.generate_batch([[A]] * 3, max_tokens=40, temperature=0.0, use_tools=True)
        assert (rows, masks) == streamed_rows(eng, [[A]] * 3, max_tokens=40, temperature=0.0)
        assert masks[0].count(0) == n_forced and rows[0][-1] == (OE if n_forced else G)
    assert TOK.decode(rows[0]) == "os.getcwd()G"  # refused: nothing forced, generation goes on


def test_tools_on_device_sample_like_the_streaming_driver(engine):
    kw = dict(num_samples=2, max_tokens=24, temperature=1.0, top_k=50, seed=3)
    assert engine.generate_batch([[7, 8, 9], [1] * 70], use_tools=True, **kw) == \
        streamed_rows(engine, [[7, 8, 9], [1] * 70], **kw)


def test_many_prompts_go_in_fixed_chunks_sorted_by_length(engine):
    """40 prompts of 3..150 tokens in chunks of 8: one compile per prompt-length bucket (64, 128, 256),
    and the same greedy rows as one batch of all 40, in the callers' order."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 256, n).tolist() for n in rng.integers(3, 150, 40)]
    whole, _ = engine.generate_batch(prompts, max_tokens=6, temperature=0.0)
    before = E.TRACES.copy()
    chunked, masks = engine.generate_batch(prompts, max_tokens=6, temperature=0.0, batch_size=8, use_tools=True)
    assert chunked == whole and masks == [[1] * len(r) for r in whole]
    buckets = {min(256, max(64, 1 << (len(p) - 1).bit_length())) for p in prompts}
    assert E.TRACES["generate"] - before["generate"] == len(buckets) == 3
