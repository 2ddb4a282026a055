"""Model tests: SPEC §1–3 pinned on tiny CPU configs (fp32; fp64 for finite differences)."""
import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanochat_jax import model as M
from nanochat_jax.kernels import relu2_mlp
from nanochat_jax.config import ConfigError, base_config, validate

V, T = 256, 16


def tiny(depth=2, n_kv_head=0, **kw):
    """d_model 64, 4 heads of 16 (2 kv heads when asked), vocab 256, fp32, XLA attention."""
    kw = {"compute_dtype": "float32", "attention": "xla", **kw}
    return M.ModelConfig.from_depth(depth, V, T, n_kv_head, aspect_ratio=32, head_dim=16, **kw)


def random_params(cfg, seed=0):
    """SPEC init, then the zero-initialised matrices (lm_head, output projections) made random too,
    so every path of the network carries signal."""
    params = M.init_params(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [M._matrix_init(k, a.shape) if not a.any() else a for k, a in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, leaves)


def tokens(shape, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, V, dtype=jnp.int32)


# ---------------------------------------------------------------- sizes, config, init


@pytest.mark.parametrize("depth,n_kv_head", [(1, 0), (2, 0), (3, 1), (4, 2)])
def test_param_count_formula(depth, n_kv_head):
    cfg = tiny(depth, n_kv_head)
    D, H, Hkv, hd = cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    per_layer = D * H * hd * 2 + D * Hkv * hd * 2 + 8 * D * D  # q, o, k, v, fc, proj
    counts = M.param_counts(cfg)
    assert counts["total"] == 2 * V * D + depth * per_layer


def test_d20_numbers_and_summary_cli(capsys):
    cfg = M.ModelConfig.from_depth(20, compute_dtype="float32", attention="xla")
    assert (cfg.d_model, cfg.n_head, cfg.head_dim) == (1280, 10, 128)
    assert M.param_counts(cfg)["total"] == 560_988_160
    assert M.estimate_flops(cfg) == pytest.approx(3.49e9, rel=2e-3)
    M.main(["--depth", "20", "--summary"])
    out = capsys.readouterr().out
    assert "560,988,160" in out and "3.492e+09" in out and "2,243,952,640" in out


def test_from_config_and_errors():
    c = base_config()
    c.model.depth, c.model.head_dim, c.tokenizer.vocab_size, c.model.n_kv_head = 4, 64, 4096, 2
    cfg = M.ModelConfig.from_config(c)
    assert (cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.vocab_size) == (256, 4, 2, 4096)
    assert (cfg.compute_dtype, cfg.attention) == ("float32", "xla")  # 'auto' on CPU
    with pytest.raises(ConfigError, match="n_kv_head"):
        tiny(n_kv_head=3)
    with pytest.raises(ConfigError, match="cudnn"):
        M.ModelConfig.from_depth(2, compute_dtype="float32", attention="cudnn")
    with pytest.raises(ConfigError, match="remat"):
        tiny(remat="sometimes")


@pytest.mark.parametrize("key,value,match", [("n_kv_head", 3, "n_kv_head=3 must divide n_head=10"),
                                             ("head_dim", 63, "head_dim must be even"),
                                             ("remat", "sometimes", "config.model.remat must be one of"),
                                             ("kernels", "triton", "config.model.kernels must be one of"),
                                             ("compute_dtype", "float16", "config.model.compute_dtype must be one of")])
def test_validate_checks_the_model_section_with_the_models_own_classes(key, value, match):
    """config.validate's model checks are ModelShape's and RunOptions' (one place each), naming the key."""
    c = base_config()
    validate(c)  # d20 as configured
    c.model[key] = value
    with pytest.raises(ConfigError, match=match):
        validate(c)


def test_config_parts_compose_and_replace_by_field_name():
    cfg = tiny(n_kv_head=2)
    assert (cfg.shape.n_kv_head, cfg.options.kernels, cfg.engine.attend_len) == (2, "auto", 0)
    changed = dataclasses.replace(cfg, attend_len=7, scan_layers=False, n_kv_head=4)
    assert (changed.engine.attend_len, changed.options.scan_layers, changed.shape.n_kv_head) == (7, False, 4)
    assert changed.shape.d_model == cfg.d_model and changed != cfg and hash(dataclasses.replace(cfg)) == hash(cfg)
    with pytest.raises(TypeError, match="unknown fields"):
        dataclasses.replace(cfg, n_layers=3)


def test_init_matches_spec():
    cfg = M.ModelConfig.from_depth(4, 512, 64, 2, head_dim=64, compute_dtype="float32", attention="xla")
    p = M.init_params(cfg, jax.random.key(0))
    D = cfg.d_model
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(p))
    assert np.std(p["wte"]["embedding"]) == pytest.approx(1.0, rel=0.03)
    attn, mlp = p["blocks"]["attn"], p["blocks"]["mlp"]
    assert np.std(attn["c_q"]["kernel"]) == pytest.approx(D ** -0.5, rel=0.03)
    # k: fan_out 128 < fan_in 256 -> shrunk by sqrt(128/256); fc: fan_out > fan_in -> 1/sqrt(fan_in)
    assert np.std(attn["c_k"]["kernel"]) == pytest.approx(D ** -0.5 * 0.5 ** 0.5, rel=0.03)
    assert np.std(mlp["c_fc"]["kernel"]) == pytest.approx(D ** -0.5, rel=0.03)
    for zero in (p["lm_head"]["kernel"], attn["c_proj"]["kernel"], mlp["c_proj"]["kernel"]):
        assert not np.any(zero)
    # every layer gets its own draw
    assert not np.allclose(attn["c_q"]["kernel"][0], attn["c_q"]["kernel"][1])


def test_loss_at_init_is_ln_vocab():
    cfg = tiny()
    p = M.init_params(cfg, jax.random.key(0))
    x = tokens((2, T))
    loss, per_tok = M.loss_fn(p, cfg, x, jnp.roll(x, -1, axis=1))
    assert float(loss) == pytest.approx(math.log(V), rel=1e-6)
    np.testing.assert_allclose(per_tok, math.log(V), rtol=1e-6)


# ---------------------------------------------------------------- the forward pass is SPEC §2


def numpy_forward(params, cfg, toks):
    """Float64 NumPy transcription of SPEC §2 (kv heads repeated explicitly for GQA)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    eps = np.finfo(np.float32).eps

    def rms(x):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)

    def rope(x):  # (B, T, N, hd)
        hd = x.shape[-1]
        inv_freq = 1.0 / 10000 ** (np.arange(0, hd, 2) / hd)
        freqs = np.outer(np.arange(x.shape[1]), inv_freq)[None, :, None, :]
        cos, sin = np.cos(freqs), np.sin(freqs)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return np.concatenate([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], axis=-1)

    B, Tn = toks.shape
    H, Hkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    x = rms(p["wte"]["embedding"][np.asarray(toks)])
    a, m = p["blocks"]["attn"], p["blocks"]["mlp"]
    causal = np.tril(np.ones((Tn, Tn), bool))
    for l in range(cfg.depth):
        h = rms(x)
        q = (h @ a["c_q"]["kernel"][l]).reshape(B, Tn, H, hd)
        k = (h @ a["c_k"]["kernel"][l]).reshape(B, Tn, Hkv, hd)
        v = (h @ a["c_v"]["kernel"][l]).reshape(B, Tn, Hkv, hd)
        q, k = rms(rope(q)), rms(rope(k))
        k, v = np.repeat(k, H // Hkv, axis=2), np.repeat(v, H // Hkv, axis=2)
        s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd)
        s = np.where(causal, s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        y = np.einsum("bhts,bshd->bthd", w, v).reshape(B, Tn, H * hd)
        x = x + y @ a["c_proj"]["kernel"][l]
        x = x + np.maximum(rms(x) @ m["c_fc"]["kernel"][l], 0) ** 2 @ m["c_proj"]["kernel"][l]
    return 15 * np.tanh(rms(x) @ p["lm_head"]["kernel"] / 15)


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_forward_matches_float64_numpy_transcription():
    cfg = tiny(n_kv_head=2)
    p = random_params(cfg)
    # a larger lm_head so the softcap's tanh is well into its non-linear range
    p["lm_head"]["kernel"] = p["lm_head"]["kernel"] * 40
    toks = tokens((2, T))
    ref = numpy_forward(p, cfg, toks)
    assert np.abs(ref).max() > 10  # the softcap is exercised
    assert rel_err(M.logits_fn(p, cfg, toks), ref) < 1e-5


def test_rope_qknorm_softcap_pieces_at_large_positions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 4, 2, 128))
    pos = np.array([[0, 1, 1000, 2047]])
    cos, sin = M.rope_tables(jnp.asarray(pos), 128, jnp.float32)
    got = M.rms_norm(M.apply_rope(jnp.asarray(x, jnp.float32), cos, sin))
    f = pos[0][:, None] * (1.0 / 10000 ** (np.arange(0, 128, 2) / 128))
    c, s = np.cos(f)[None, :, None], np.sin(f)[None, :, None]
    r = np.concatenate([x[..., :64] * c + x[..., 64:] * s, -x[..., :64] * s + x[..., 64:] * c], -1)
    r = r / np.sqrt(np.mean(r * r, -1, keepdims=True) + np.finfo(np.float32).eps)
    assert rel_err(got, r) < 1e-5
    z = rng.normal(scale=30, size=1000)
    assert rel_err(M.softcap(jnp.asarray(z, jnp.float32)), 15 * np.tanh(z / 15)) < 1e-6


def test_causality():
    cfg = tiny()
    p = random_params(cfg)
    a = tokens((2, T))
    b = a.at[:, 10:].set(tokens((2, T - 10), seed=5))
    la, lb = M.logits_fn(p, cfg, a), M.logits_fn(p, cfg, b)
    np.testing.assert_array_equal(la[:, :10], lb[:, :10])
    assert not np.allclose(la[:, 10:], lb[:, 10:])


def test_gqa_equals_mha_with_tied_heads():
    gqa = tiny(n_kv_head=2)
    mha = dataclasses.replace(gqa, n_kv_head=gqa.n_head)
    p = random_params(gqa)
    q = jax.tree.map(lambda a: a, p)
    L, D, hd, G = gqa.depth, gqa.d_model, gqa.head_dim, gqa.n_head // gqa.n_kv_head
    for name in ("c_k", "c_v"):  # kv head j serves query heads j*G .. j*G+G-1
        w = p["blocks"]["attn"][name]["kernel"].reshape(L, D, gqa.n_kv_head, hd)
        q["blocks"]["attn"][name]["kernel"] = jnp.repeat(w, G, axis=2).reshape(L, D, gqa.n_head * hd)
    toks = tokens((2, T))
    np.testing.assert_allclose(M.logits_fn(p, gqa, toks), M.logits_fn(q, mha, toks), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- loss and gradients


def test_loss_ignores_minus_one_and_matches_log_softmax():
    cfg = tiny()
    p = random_params(cfg)
    x = tokens((2, T))
    y = jnp.roll(x, -1, axis=1).at[0, 3:7].set(-1).at[1, -1].set(-1)
    loss, per_tok = M.loss_fn(p, cfg, x, y)
    logits = np.asarray(M.logits_fn(p, cfg, x), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    yy = np.asarray(y)
    ref = np.where(yy != -1, -np.take_along_axis(logp, np.maximum(yy, 0)[..., None], -1)[..., 0], 0)
    np.testing.assert_allclose(per_tok, ref, rtol=1e-5, atol=1e-6)
    assert float(loss) == pytest.approx(ref.sum() / (yy != -1).sum(), rel=1e-5)


def loss_and_grads(cfg, p, x, y):
    """((mean loss, per-token losses), grads), jitted."""
    return jax.jit(jax.value_and_grad(lambda p: M.loss_fn(p, cfg, x, y), has_aux=True))(p)


@pytest.fixture(scope="module")
def plain():
    """Reference loss and grads of the plain path (no chunking, no remat), shared by two tests."""
    cfg = tiny()
    p = random_params(cfg)
    x = tokens((2, T))
    y = jnp.roll(x, -1, axis=1).at[1, 2:5].set(-1)
    return cfg, p, x, y, loss_and_grads(cfg, p, x, y)


def test_chunked_loss_equals_plain_loss_and_grads(plain):
    cfg, p, x, y, ((loss, per_tok), grads) = plain
    # 5 does not divide T=16: the padded tail is exercised
    (c_loss, c_per_tok), c_grads = loss_and_grads(dataclasses.replace(cfg, loss_chunk=5), p, x, y)
    assert float(c_loss) == pytest.approx(float(loss), rel=1e-6)
    np.testing.assert_allclose(c_per_tok, per_tok, rtol=1e-6, atol=1e-6)
    for g1, g2 in zip(jax.tree.leaves(grads), jax.tree.leaves(c_grads)):
        np.testing.assert_allclose(g2, g1, rtol=1e-4, atol=1e-7)


def test_chunked_loss_scales_its_gradients_by_the_cotangent(plain):
    """The chunked loss computes its gradients in the forward pass; the backward pass must still apply
    the cotangent (here 3x the loss), and the un-differentiated call must give the same losses."""
    cfg, p, x, y, ((loss, per_tok), grads) = plain
    cfg = dataclasses.replace(cfg, loss_chunk=4)
    g3 = jax.jit(jax.grad(lambda p: 3.0 * M.loss_fn(p, cfg, x, y)[0]))(p)
    for g1, g2 in zip(jax.tree.leaves(grads), jax.tree.leaves(g3)):
        # two fp32 sums in different orders: each is within ~8e-7 of its leaf's largest entry from float64
        np.testing.assert_allclose(g2, 3.0 * g1, rtol=1e-4, atol=2e-6 * np.abs(3.0 * g1).max())
    e_loss, e_per_tok = jax.jit(lambda p: M.loss_fn(p, cfg, x, y))(p)
    assert float(e_loss) == pytest.approx(float(loss), rel=1e-6)
    np.testing.assert_allclose(e_per_tok, per_tok, rtol=1e-6, atol=1e-6)


def test_unrolled_layers_give_the_scanned_loss_and_gradients(plain):
    cfg, p, x, y, ((loss, _), grads) = plain
    (u_loss, _), u_grads = loss_and_grads(dataclasses.replace(cfg, scan_layers=False, remat="full"), p, x, y)
    assert float(u_loss) == pytest.approx(float(loss), rel=1e-6)
    for g1, g2 in zip(jax.tree.leaves(grads), jax.tree.leaves(u_grads)):
        np.testing.assert_allclose(g2, g1, rtol=1e-4, atol=1e-7)


def test_unrolled_layers_assemble_the_stacked_gradient_by_concatenation(plain):
    """Each layer's gradient lands in the (L, ...) stack through one concatenate, not as a sum of L
    zero-padded copies (indexing p[i] per layer differentiates to that: O(L) work per element in every
    consumer of the stacked gradient, 25 ms of a d26 step on an H100)."""
    cfg, p, x, y, _ = plain
    cfg = dataclasses.replace(cfg, depth=4, scan_layers=False)
    p = random_params(cfg)
    hlo = jax.jit(jax.grad(lambda p: M.loss_fn(p, cfg, x, y)[0])).lower(p).as_text()
    stacks = {"x".join(map(str, leaf.shape)) for leaf in jax.tree.leaves(p["blocks"])}
    padded = [line for line in hlo.split("\n") if "stablehlo.pad" in line]  # (RoPE's q/k/v slices pad too)
    assert not [line for line in padded if any(f"-> tensor<{s}xf32>" in line for s in stacks)]
    concatenated = [line for line in hlo.split("\n") if "stablehlo.concatenate" in line]
    assert all(any(f"-> tensor<{s}xf32>" in line for line in concatenated) for s in stacks)


@pytest.mark.parametrize("remat", ["full", "dots_with_no_batch_dims_saveable"])
def test_remat_policies_leave_gradients_unchanged(plain, remat):
    cfg, p, x, y, (_, grads) = plain
    _, r_grads = loss_and_grads(dataclasses.replace(cfg, remat=remat), p, x, y)
    for g1, g2 in zip(jax.tree.leaves(grads), jax.tree.leaves(r_grads)):
        np.testing.assert_allclose(g2, g1, rtol=1e-5, atol=1e-8)


_FD_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, sys.argv[1])
    from test_model import random_params, tiny, tokens
    from nanochat_jax import model as M

    def attention64(q, k, v, scale, is_causal=False, mask=None, implementation=None):
        # jax's XLA attention always takes its softmax in fp32, too coarse for finite differences;
        # this float64 stand-in has the same signature subset and semantics (GQA by repetition).
        k, v = (jnp.repeat(t, q.shape[2] // k.shape[2], axis=2) for t in (k, v))
        s = jnp.einsum("bthd,bshd->bhts", q, k) * scale
        if is_causal:
            s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
        return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)

    jax.nn.dot_product_attention = attention64
    cfg = tiny(n_kv_head=2, compute_dtype="float64", loss_chunk=int(sys.argv[2]))
    p = jax.tree.map(lambda a: a.astype(jnp.float64), random_params(cfg))
    x = tokens((2, 8))
    y = jnp.roll(x, -1, axis=1).at[0, 2].set(-1)
    loss = jax.jit(lambda p: M.loss_fn(p, cfg, x, y)[0])
    grads = jax.grad(loss)(p)
    flat, treedef = jax.tree.flatten(p)
    gflat = jax.tree.leaves(grads)
    rng = np.random.default_rng(0)
    out, eps = [], 1e-6
    for i, (a, g) in enumerate(zip(flat, gflat)):
        for _ in range(2):
            idx = tuple(int(rng.integers(n)) for n in a.shape)
            if a.ndim == 2 and a.shape[0] == cfg.vocab_size:  # embedding: pick a row that is used
                idx = (int(x[0, 0]),) + idx[1:]
            def at(d):
                f = list(flat); f[i] = a.at[idx].add(d)
                return float(loss(jax.tree.unflatten(treedef, f)))
            out.append((float(g[idx]), (at(eps) - at(-eps)) / (2 * eps)))
    print(json.dumps(out))
""")


@pytest.mark.parametrize("loss_chunk", [0, 3])  # 3: the fused chunked loss, its padded tail included
def test_gradients_match_finite_differences_in_float64(loss_chunk):
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu", XLA_FLAGS="")
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run([sys.executable, "-c", _FD_SCRIPT, here, str(loss_chunk)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    pairs = np.array(json.loads(res.stdout.strip().splitlines()[-1]))
    assert len(pairs) == 2 * 8 and np.abs(pairs[:, 0]).max() > 1e-3
    np.testing.assert_allclose(pairs[:, 0], pairs[:, 1], rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------- KV cache


@pytest.mark.parametrize("scan_layers,for_inference", [(True, False), (False, False), (True, True), (False, True)])
def test_cached_prefill_and_decode_match_full_logits(scan_layers, for_inference):
    """Against the scanned full forward; the engine decodes with the layers unrolled (scan_layers=False)
    from inference_params ((out, in) block kernels)."""
    cfg = dataclasses.replace(tiny(n_kv_head=2), scan_layers=scan_layers)
    p = random_params(cfg)
    if for_inference:
        p, cfg = M.inference_params(p, cfg)
        assert cfg.weight_layout == "out_in" and p["blocks"]["mlp"]["c_fc"]["kernel"].shape == (2, 4 * cfg.d_model, cfg.d_model)
    seq = tokens((2, T))
    full = np.asarray(M.logits_fn(random_params(tiny(n_kv_head=2)), tiny(n_kv_head=2), seq))
    fwd = jax.jit(lambda c, t, pos: M.forward_cached(p, cfg, t, c, pos))
    cache = M.init_cache(cfg, batch=2, max_len=T + 8)  # longer than used: unwritten slots must be masked
    logits, cache = fwd(cache, seq[:, :6], jnp.array([0, 0]))  # prefill 6 tokens
    np.testing.assert_allclose(logits, full[:, :6], rtol=1e-5, atol=1e-5)
    logits, cache = fwd(cache, seq[:, 6:9], jnp.array([6, 6]))  # a second chunk at offset 6
    np.testing.assert_allclose(logits, full[:, 6:9], rtol=1e-5, atol=1e-5)
    # decode one token at a time, rows at different positions (row 1 lags by one, re-writing a slot)
    pos = np.array([9, 8])
    while pos.min() < T:
        step = jnp.asarray(np.asarray(seq)[np.arange(2), np.minimum(pos, T - 1)][:, None])
        logits, cache = fwd(cache, step, jnp.asarray(pos))
        for b in range(2):
            if pos[b] < T:
                np.testing.assert_allclose(logits[b, 0], full[b, pos[b]], rtol=1e-5, atol=1e-5)
        pos = pos + 1


def test_bfloat16_compute_keeps_fp32_params_logits_and_loss():
    cfg32 = tiny(n_kv_head=2)
    cfg16 = dataclasses.replace(cfg32, compute_dtype="bfloat16")
    p = random_params(cfg32)
    toks = tokens((2, T))
    l32, l16 = M.logits_fn(p, cfg32, toks), M.logits_fn(p, cfg16, toks)
    assert l16.dtype == jnp.float32 and 0 < rel_err(l16, np.asarray(l32, np.float64)) < 3e-2
    loss, per_tok = M.loss_fn(p, cfg16, toks, toks)
    assert loss.dtype == per_tok.dtype == jnp.float32
    cache = M.init_cache(cfg16, 2, T)
    assert cache.dtype == jnp.bfloat16
    lc, cache = M.forward_cached(p, cfg16, toks, cache, jnp.zeros(2, jnp.int32))
    assert lc.dtype == jnp.float32 and rel_err(lc, np.asarray(l16, np.float64)) < 1e-2


def test_relu2_mlp_backward_from_the_relu2_output_matches_autodiff():
    """relu2_mlp.relu2_mlp (the fused MLP's VJP) differentiates through 2 sqrt(a) instead of 2 relu(u), a = relu(u)²:
    the same loss and gradients as autodiff of relu(h @ w_fc)² @ w_proj (fp32, with XLA standing in for
    the kernels), zero through u <= 0."""
    h = jax.random.normal(jax.random.key(0), (64, 32))
    w_fc = jax.random.normal(jax.random.key(1), (32, 96)) / 6
    w_proj = jax.random.normal(jax.random.key(2), (96, 32)) / 10
    g = jax.random.normal(jax.random.key(3), (64, 32))
    up = lambda h, w: relu2_mlp.relu_squared(h @ w)
    down_grad = lambda g, w, a: (g @ w) * 2 * jnp.sqrt(a)
    with jax.default_matmul_precision("highest"):
        want = jax.value_and_grad(lambda *p: jnp.sum((up(p[0], p[1]) @ p[2]) * g), argnums=(0, 1, 2))(h, w_fc, w_proj)
        got = jax.value_and_grad(lambda *p: jnp.sum(relu2_mlp.relu2_mlp(*p, up, down_grad) * g), argnums=(0, 1, 2))(
            h, w_fc, w_proj)
    assert 0.3 < float(jnp.mean(h @ w_fc > 0)) < 0.7  # both branches of the ReLU are exercised
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for a, b in zip(want[1], got[1]):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
