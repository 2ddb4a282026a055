"""The kernels (nanochat_jax/kernels/): the Triton ones (RoPE + QK-norm, residual add + norm, the loss's pass
over the logits) give the plain-JAX functions' values and gradients, alone and inside the whole model; the
order in which the Mosaic GPU kernels (Hopper only) walk their output tiles; and the one switch. On CPU Pallas interprets the kernels; on the GPU machine
the same tests compile them with Triton (`JAX_PLATFORMS=cuda python -m pytest -q tests/test_kernels.py`)."""
import dataclasses
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_paths
from nanochat_jax import kernels
from nanochat_jax import model as M
from nanochat_jax.kernels import add_norm, cross_entropy, relu2_mlp, rope_qk_norm, sym_matmul
from nanochat_jax.config import ConfigError


def xla_path(qkv, cos, sin, n_q, n_kv):
    return rope_qk_norm.reference(qkv, cos, sin, n_q, n_kv)


def kernel_path(qkv, cos, sin, n_q, n_kv):
    return rope_qk_norm.fused(qkv, cos[0], sin[0], n_q, n_kv)


def weighted_sum(fn, weights):
    """A scalar of all three outputs, so the gradient reaches every output (and v's pass-through)."""
    return lambda qkv, *a: sum(jnp.sum(o.astype(jnp.float32) * w) for o, w in zip(fn(qkv, *a), weights))


# B=2 with T=128: two row blocks a sequence, so the cos/sin block wraps at the second row; GQA and MHA
@pytest.mark.parametrize("n_q,n_kv", [(4, 2), (2, 2)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, None)])
def test_kernel_matches_xla_values_and_gradients(n_q, n_kv, dtype, tol):
    B, T, hd = 2, 128, 32
    qkv = (3 * jax.random.normal(jax.random.key(0), (B, T, n_q + 2 * n_kv, hd))).astype(dtype)
    cos, sin = M.rope_tables(jnp.arange(T)[None, :], hd, jnp.float32)
    want, got = xla_path(qkv, cos, sin, n_q, n_kv), kernel_path(qkv, cos, sin, n_q, n_kv)
    weights = [jax.random.normal(jax.random.key(i + 1), o.shape) for i, o in enumerate(want)]
    g_want = jax.grad(weighted_sum(xla_path, weights))(qkv, cos, sin, n_q, n_kv)
    g_got = jax.grad(weighted_sum(kernel_path, weights))(qkv, cos, sin, n_q, n_kv)
    assert g_got.shape == qkv.shape and g_got.dtype == qkv.dtype
    for a, b in list(zip(want, got)) + [(g_want, g_got)]:
        assert a.shape == b.shape and a.dtype == b.dtype
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if tol is None:  # bf16: the kernel rounds once where XLA rounds per op; allow two bf16 ulps
            np.testing.assert_allclose(b, a, rtol=2 * 2.0 ** -8, atol=2 * 2.0 ** -8 * np.abs(a).max())
        else:
            np.testing.assert_allclose(b, a, rtol=tol, atol=tol)
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(qkv[:, :, n_q + n_kv:]))  # v is a copy
    assert (np.abs(np.asarray(g_got, np.float32)).sum(axis=(0, 1, 3)) > 0).all(), "every head gets a gradient"


def test_model_with_kernel_matches_xla_path():
    """A whole loss (chunked, the last chunk padded) and its gradients: kernels='pallas' (interpreted) ==
    'xla', GQA, fp32."""
    cfg = M.ModelConfig.from_depth(2, 256, 64, 2, aspect_ratio=64, head_dim=32, compute_dtype="float32",
                                   attention="xla", kernels="xla", loss_chunk=24)
    rows = jax.random.randint(jax.random.key(2), (2, 65), 0, 256)
    with jax.default_matmul_precision("highest"):  # on a GPU, fp32 GEMMs would otherwise round to TF32
        grads = {k: v for k, (v, _) in kernel_paths.loss_and_grads(cfg, kernel_paths.small_params(cfg), rows).items()}
    np.testing.assert_allclose(grads["pallas"][0], grads["xla"][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads["xla"][1]), jax.tree.leaves(grads["pallas"][1])):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_unsupported_lengths_fall_back_and_bad_choice_is_refused():
    assert rope_qk_norm.supported(2048, 128) and not rope_qk_norm.supported(24, 128)
    assert not rope_qk_norm.supported(64, 48) and not cross_entropy.supported(8, 256)
    assert not cross_entropy.supported(16, 1000)
    cfg = M.ModelConfig.from_depth(1, 256, 24, aspect_ratio=64, head_dim=32, compute_dtype="float32",
                                   attention="xla", kernels="pallas", loss_chunk=6)
    params = M.init_params(cfg, jax.random.key(0))
    rows = jax.random.randint(jax.random.key(2), (2, 25), 0, 256)
    want = M.loss_fn(params, dataclasses.replace(cfg, kernels="xla"), rows[:, :-1], rows[:, 1:])[0]
    assert M.loss_fn(params, cfg, rows[:, :-1], rows[:, 1:])[0] == want  # T=24, 2 x 6 loss rows: XLA runs
    with pytest.raises(ConfigError, match="kernels"):
        dataclasses.replace(cfg, kernels="triton")


@pytest.mark.parametrize("dtype,d_model", [(jnp.float32, 192), (jnp.bfloat16, 192), (jnp.bfloat16, 48)])
def test_add_rms_norm_kernel_matches_xla_values_and_gradients(dtype, d_model):
    """s = x + y and rms_norm(s), and d/dx = d/dy of a weighted sum of both outputs: the kernel against
    add_norm.reference (d_model 192: tiles of 64 columns; 48: of 16), 32 rows of 4."""
    x, y = (jax.random.normal(jax.random.key(i), (2, 16, d_model)).astype(dtype) for i in (0, 1))
    w_s, w_h = (jax.random.normal(jax.random.key(i), (2, 16, d_model)) for i in (2, 3))
    assert add_norm.supported(32, d_model)
    outs, grads = {}, {}
    for use_kernel in (False, True):
        f = lambda x, y: add_norm.add_rms_norm(x, y, "pallas" if use_kernel else "xla")
        outs[use_kernel] = f(x, y)
        loss = lambda x, y: sum(jnp.sum(o.astype(jnp.float32) * w) for o, w in zip(f(x, y), (w_s, w_h)))
        grads[use_kernel] = jax.grad(loss, argnums=(0, 1))(x, y)
    tol = dict(rtol=2e-6, atol=2e-6) if dtype == jnp.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    for a, b in zip(outs[False] + grads[False], outs[True] + grads[True]):
        assert b.dtype == dtype
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), **tol)
    np.testing.assert_array_equal(outs[True][0], outs[False][0])  # the add rounds the same way
    assert not add_norm.supported(31, d_model) and not add_norm.supported(32, 40)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cross_entropy_kernel_matches_xla(dtype):
    """The sum of e^(softcapped - c) and the scores e^(softcapped - c) softcap' over 2 x 16 rows of a
    2,048-way vocabulary (two column tiles), with large raw logits (the softcap saturates)."""
    N, V = 32, 2048
    raw = (20 * jax.random.normal(jax.random.key(0), (N, V))).astype(dtype)
    want = cross_entropy.softcap_sum_and_scores(raw, jnp.float32, dtype, True)
    got = cross_entropy.fused_sum_and_scores(raw, M.SOFTCAP, True)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert got[1].dtype == dtype and got[1].shape == (N, V)
    s_got, s_want = np.asarray(got[1], np.float32), np.asarray(want[1], np.float32)
    np.testing.assert_allclose(s_got, s_want, rtol=1e-5 if dtype == jnp.float32 else 2 ** -7, atol=1e-12)
    assert (s_got > 0).all() and s_got.max() <= 1  # e^(softcapped - c) <= 1 and softcap' in (0, 1]
    sum_only, none = cross_entropy.fused_sum_and_scores(raw, M.SOFTCAP, False)
    assert none is None and np.array_equal(sum_only, got[0])


def _pallas_calls(jaxpr, inside=False):
    """[(number of outputs, nested in a shard_map?)] for every pallas_call of a (closed) jaxpr."""
    calls = []
    for eqn in jaxpr.eqns:
        here = inside or eqn.primitive.name == "shard_map"
        if eqn.primitive.name == "pallas_call":
            calls.append((len(eqn.outvars), here))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            calls += _pallas_calls(sub, here)
    return calls


@pytest.mark.parametrize("fsdp", [1, 4])
def test_kernels_run_on_each_devices_rows_of_a_mesh(fsdp):
    """On a mesh (8 fake devices; every GPU on the GPU machine) the real train step runs every kernel
    inside a shard_map over the batch axes (a kernel is one custom call: XLA would gather the whole batch
    onto every device and run it there), and its loss and updated params are those of the XLA path."""
    n = jax.device_count()
    if n < 2 or n % fsdp:
        pytest.skip(f"needs a mesh of several devices with fsdp={fsdp} dividing them; this machine has {n}")
    cfg = M.ModelConfig.from_depth(2, 256, 64, 2, aspect_ratio=64, head_dim=32, compute_dtype="float32",
                                   attention="xla", kernels="pallas", loss_chunk=16)
    results = kernel_paths.mesh_train_step(cfg, fsdp, rows_per_device=1, seq=64)
    calls = _pallas_calls(results["pallas"][3])
    # RoPE forward (q, k, v, inverse RMS), add + norm forward (s, h, inverse RMS), the backward
    # passes (d qkv; d x), the loss (lse, d logits)
    assert {n for n, _ in calls} == {4, 3, 1, 2} and all(inside for _, inside in calls), calls
    assert results["pallas"][0] == pytest.approx(results["xla"][0], rel=1e-6)
    for a, b in zip(jax.tree.leaves(results["xla"][2]), jax.tree.leaves(results["pallas"][2])):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("m_tiles,n_tiles", [(256, 26), (40, 3), (7, 20), (1, 1)])
def test_fused_matmul_tile_order_covers_every_tile_once(m_tiles, n_tiles):
    """The fused MLP kernels (GPU-only) give CTA t the tile _tile_of(t): every tile exactly once, the last
    group of rows short where the groups do not divide them, and the first CTAs on 16 rows of x."""
    t = jnp.arange(m_tiles * n_tiles)
    m, n = (np.asarray(v) for v in relu2_mlp._tile_of(t, m_tiles, n_tiles, relu2_mlp.GROUP_ROWS))
    assert sorted(zip(m.tolist(), n.tolist())) == [(i, j) for i in range(m_tiles) for j in range(n_tiles)]
    first = min(m_tiles, relu2_mlp.GROUP_ROWS) * min(n_tiles, 8)
    assert len(set(m[:first].tolist())) == min(m_tiles, relu2_mlp.GROUP_ROWS)


@pytest.mark.parametrize("n", [1, 2, 10, 13])
def test_symmetric_product_blocks_cover_the_upper_triangle_once(n):
    """Muon's symmetric-product kernel (sym_matmul, GPU-only) gives CTA t the block block_of(t) of two row tiles by one
    column tile: together the blocks hold every tile on or above the diagonal exactly once, and no block
    lies wholly below it (row tiles past n only in the last block, when n is odd)."""
    t = jnp.arange(sym_matmul.blocks_per_matrix(n))
    R, c = (a.tolist() for a in np.broadcast_arrays(*sym_matmul.block_of(t, n)))
    tiles = [(2 * r + w, col) for r, col in zip(R, c) for w in (0, 1)]
    assert sorted(t for t in tiles if t[0] <= t[1]) == [(i, j) for i in range(n) for j in range(i, n)]
    assert all(2 * r <= col for r, col in zip(R, c))
    assert sorted({t[0] for t in tiles if t[0] >= n}) == ([n] if n % 2 else [])


# ---------------------------------------------------------------------------------------------- the one switch

KERNEL_CALLS = {"triton": "__gpu$xla.gpu.triton", "mosaic": "mosaic_gpu_v2"}  # their custom calls in CUDA's HLO


def _pretend_gpu(monkeypatch, cc, triton=True):
    """The availability probes of a GPU of compute capability `cc` (None: no GPU), with or without Pallas'
    Triton backend, and Pallas compiling (not interpreting): the step then lowers for CUDA on this CPU."""
    monkeypatch.setattr(kernels, "compute_capability", lambda: cc)
    monkeypatch.setattr(kernels, "interpret", lambda: False)
    if not triton:
        monkeypatch.setattr(kernels, "triton_backend", None)


def _custom_calls_of_the_step(choice):
    """The custom-call targets of the real bf16 train step (model, loss, Muon + AdamW) lowered for CUDA, at
    shapes every kernel tiles (d_model 128, 2 rows of 64 positions, vocab 1024)."""
    from nanochat_jax import sharding, train
    from nanochat_jax.config import base_config
    cfg = M.ModelConfig.from_depth(2, 1024, 64, aspect_ratio=64, head_dim=64, compute_dtype="bfloat16",
                                   attention="xla", kernels=choice, loss_chunk=32)
    c = base_config()
    c.mesh.data = c.mesh.fsdp = 1
    c.train.device_batch_size, c.train.total_batch_size = 2, 2 * 64
    step, _, (params, opt_state), _, _ = train.build_step(cfg, c.train, 10, sharding.make_mesh(c.mesh, jax.devices()[:1]))
    batch = {k: jax.ShapeDtypeStruct((1, 2, 64), dt)
             for k, dt in (("inputs", jnp.int32), ("targets", jnp.int32), ("weights", jnp.float32))}
    text = step.trace(params, opt_state, batch).lower(lowering_platforms=("cuda",)).as_text()
    return set(re.findall(r"custom_call @([\w$.]+)", text))


def test_xla_runs_no_kernel_anywhere_in_the_step(monkeypatch):
    """kernels='xla' on an H100 with both backends: the lowered step (Muon included) has no Triton or Mosaic GPU
    custom call, nor any custom call but sharding annotations; 'pallas' on the same GPU has both kinds."""
    _pretend_gpu(monkeypatch, 9.0)
    calls = _custom_calls_of_the_step("xla")
    assert not calls - {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}, calls
    assert set(KERNEL_CALLS.values()) <= _custom_calls_of_the_step("pallas")


@pytest.mark.parametrize("cc,triton,want", [(9.0, True, {"triton", "mosaic"}), (9.0, False, {"mosaic"}),
                                            (8.0, True, {"triton"}), (None, True, set())])
def test_auto_picks_each_kernel_by_its_own_availability(monkeypatch, cc, triton, want):
    """'auto' on an H100, an H100 whose jax lost Pallas' Triton backend (the Mosaic kernels stay on), an A100
    (no Mosaic GPU kernels: Hopper only) and no GPU: each kernel by its own backend, in the lowered step."""
    _pretend_gpu(monkeypatch, cc, triton)
    assert {name for name in kernels.BACKEND if kernels.use("auto", name)} == \
        {name for name, backend in kernels.BACKEND.items() if backend in want}
    calls = _custom_calls_of_the_step("auto")
    assert {backend for backend, call in KERNEL_CALLS.items() if call in calls} == want


@pytest.mark.parametrize("choice,kernel", [("xla", False), ("pallas", True), ("auto", True)])
def test_the_switch_governs_muons_kernel(monkeypatch, choice, kernel):
    """Muon's symmetric products follow the model's switch (optim passes it): on an H100 'xla' lowers
    Newton-Schulz without the Mosaic GPU kernel."""
    from nanochat_jax.muon import orthogonalize
    _pretend_gpu(monkeypatch, 9.0)
    g = jax.ShapeDtypeStruct((2, 128, 512), jnp.float32)
    text = jax.jit(lambda g: orthogonalize(g, kernels=choice)).trace(g).lower(lowering_platforms=("cuda",)).as_text()
    assert (KERNEL_CALLS["mosaic"] in text) == kernel
