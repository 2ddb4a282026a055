"""Checks that only mean something on a GPU: cuDNN flash attention against XLA's attention.

Skipped on machines without a CUDA GPU (CI has none); run on the GPU machine with
`JAX_PLATFORMS=cuda python -m pytest -q tests/test_gpu.py` (tests/conftest.py otherwise pins the CPU).
"""
import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_paths
from nanochat_jax import kernels
from nanochat_jax import model as M
from nanochat_jax.kernels import relu2_mlp, sym_matmul

pytestmark = pytest.mark.skipif(jax.devices()[0].platform != "gpu",
                                reason="cuDNN attention needs a CUDA GPU; this machine has none")


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("n_kv_head", [0, 2])
def test_cudnn_attention_matches_xla_forward_and_gradients(n_kv_head):
    cfg = M.ModelConfig.from_depth(4, vocab_size=1024, sequence_len=512, n_kv_head=n_kv_head,
                                   compute_dtype="bfloat16", attention="cudnn")
    params = M.init_params(cfg, jax.random.key(0))
    # init zeroes the output projections and the head: give them values so every path carries signal
    keys = iter(jax.random.split(jax.random.key(1), 8))
    params["lm_head"]["kernel"] = 0.02 * jax.random.normal(next(keys), params["lm_head"]["kernel"].shape)
    for name in ("attn", "mlp"):
        k = params["blocks"][name]["c_proj"]["kernel"]
        params["blocks"][name]["c_proj"]["kernel"] = 0.02 * jax.random.normal(next(keys), k.shape)
    tokens = jax.random.randint(jax.random.key(2), (4, 512), 0, 1024)
    targets = jnp.roll(tokens, -1, axis=1)
    xla = dataclasses.replace(cfg, attention="xla")
    loss_grad = lambda c: jax.jit(jax.value_and_grad(lambda p: M.loss_fn(p, c, tokens, targets)[0]))(params)
    logits = {c.attention: jax.jit(lambda p, c=c: M.logits_fn(p, c, tokens))(params) for c in (cfg, xla)}
    (l_cudnn, g_cudnn), (l_xla, g_xla) = loss_grad(cfg), loss_grad(xla)
    # both run bf16 matmuls and bf16 attention inputs: agreement at bf16 rounding, not bit-equality
    grad_errs = [_rel(a, b) for a, b in zip(jax.tree.leaves(g_cudnn), jax.tree.leaves(g_xla))]
    print(f"cudnn vs xla: logits {_rel(logits['cudnn'], logits['xla']):.2e}, loss {float(l_cudnn):.5f} vs "
          f"{float(l_xla):.5f}, worst grad {max(grad_errs):.2e}")
    assert _rel(logits["cudnn"], logits["xla"]) < 2e-2
    assert abs(float(l_cudnn) - float(l_xla)) < 1e-2 * float(l_xla)
    assert max(grad_errs) < 5e-2


def test_bf16_generation_path_matches_the_training_forward():
    """inference_params ((out, in) bf16 kernels, fused q/k/v) + KV cache + attention over the first
    attend_len slots, against the cuDNN training forward, both bf16: agreement at bf16 rounding."""
    from nanochat_jax import engine as E

    cfg = M.ModelConfig.from_depth(4, vocab_size=1024, sequence_len=512, compute_dtype="bfloat16",
                                   attention="cudnn")
    params = M.init_params(cfg, jax.random.key(0))
    params["lm_head"]["kernel"] = 0.02 * jax.random.normal(jax.random.key(1), params["lm_head"]["kernel"].shape)
    seq = jax.random.randint(jax.random.key(2), (1, 200), 0, 1024)
    full = jax.jit(lambda p: M.logits_fn(p, cfg, seq))(params)[0]
    inf_params, inf_cfg = M.inference_params(params, dataclasses.replace(cfg, scan_layers=False))
    tokens = np.zeros((1, 128), np.int32)
    tokens[0, :120] = np.asarray(seq[0, :120])
    logits, cache, positions = E.prefill(inf_params, inf_cfg, tokens, np.array([120], np.int32), max_len=256,
                                         copies=1)
    got = [logits[0]]
    for step in range(79):  # positions 120..198: crosses the 128-slot attention length
        cfg_step = dataclasses.replace(inf_cfg, attend_len=E.attend_len(120 + step + 1, 256))
        _, logits, positions, cache = E.decode(inf_params, cfg_step, None, None, logits, jax.random.key(0), step,
                                               jnp.float32(1.0), seq[:, 120 + step].astype(jnp.int32), positions, cache)
        got.append(logits[0])
    err = _rel(jnp.stack(got), full[119:199])
    print(f"generation path vs training forward (bf16): {err:.2e}")
    assert err < 2e-2


hopper = pytest.mark.skipif(not kernels.available("mosaic"),
                            reason="the fused matmul kernels use Hopper's wgmma: they need a Hopper GPU (H100/H200), "
                                   "and this machine has none")


def _fused_up_calls(jaxpr, rows, d_in, d_out):
    """Equations (at any depth) that are not a dot but compute a (rows, d_out) array from (rows, d_in) and
    (d_in, d_out) operands: the fused up-projection kernel."""
    found = 0
    for eqn in jaxpr.eqns:
        shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
        if (eqn.primitive.name != "dot_general" and (rows, d_in) in shapes and (d_in, d_out) in shapes
                and (rows, d_out) in [tuple(v.aval.shape) for v in eqn.outvars]):
            found += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _fused_up_calls(sub, rows, d_in, d_out)
    return found


@hopper
# 5,120 rows: 40 row tiles, so the tile order's groups of 16 end with a group of 8
@pytest.mark.parametrize("m,k,n", [(256, 128, 512), (1024, 1664, 6656), (1024, 1280, 5120), (5120, 128, 768)])
def test_fused_matmuls_match_xla(m, k, n):
    """Both kernels against fp32 references: relu(x @ w)², and (g @ w) 2 sqrt(a) with a = relu(u)² of
    some u (zeros included)."""
    assert relu2_mlp.supported(m, k, n, jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
    w = (jax.random.normal(jax.random.key(1), (k, n)) / k ** 0.5).astype(jnp.bfloat16)
    a = jnp.square(jnp.maximum(jax.random.normal(jax.random.key(2), (m, n)), 0)).astype(jnp.bfloat16)
    xw = np.asarray(jnp.dot(x, w, preferred_element_type=jnp.float32), np.float32)
    got = np.asarray(jax.jit(relu2_mlp.relu2_matmul)(x, w), np.float32)
    want = np.square(np.maximum(xw, 0))
    # one bf16 rounding of an fp32 result whose summation order differs from cuBLAS'
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-3 * want.max())
    assert (got[xw <= 0] == 0).all() and (got > 0).mean() > 0.4
    got = np.asarray(jax.jit(relu2_mlp.relu2_grad_matmul)(x, w, a), np.float32)
    want = xw * 2 * np.sqrt(np.asarray(a, np.float32))
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-3 * np.abs(want).max())
    assert (got[np.asarray(a) == 0] == 0).all() and (got != 0).mean() > 0.4


def _bf16_model():  # d_model 128, MLP 512: the fused kernels' tiles divide it at 256 rows
    return M.ModelConfig.from_depth(2, 256, 128, 2, aspect_ratio=64, head_dim=64, compute_dtype="bfloat16",
                                    attention="cudnn", kernels="xla", loss_chunk=64)


@hopper
def test_model_with_fused_mlp_matches_xla_path_in_bf16():
    """kernels='pallas' in bf16 on a Hopper: the MLP runs the fused kernels (the up-projection found in the
    jaxpr), and the loss and gradients match the XLA path's within bf16 rounding."""
    cfg = _bf16_model()
    rows = jax.random.randint(jax.random.key(2), (2, 129), 0, 256)
    out = kernel_paths.loss_and_grads(cfg, kernel_paths.small_params(cfg), rows)
    calls = {k: _fused_up_calls(jaxpr, 256, 128, 512) for k, (_, jaxpr) in out.items()}
    assert calls["pallas"] >= 1 and calls["xla"] == 0  # (B T rows, D -> 4 D)
    (l_x, g_x), (l_p, g_p) = out["xla"][0], out["pallas"][0]
    assert float(l_p) == pytest.approx(float(l_x), rel=1e-2)
    for a, b in zip(jax.tree.leaves(g_x), jax.tree.leaves(g_p)):
        assert _rel(b, a) < 0.05


@hopper
def test_fused_mlp_runs_on_each_gpus_rows_of_a_mesh():
    """On every GPU of the machine (a data-parallel mesh), the real bf16 train step runs the fused MLP
    kernels on each device's rows (found with per-device shapes in the step's jaxpr) and its loss and
    parameter updates match the XLA path's within bf16 rounding."""
    n = jax.device_count()
    if n < 2:
        pytest.skip(f"needs several GPUs for a mesh; this machine has {n}")
    cfg = _bf16_model()
    results = kernel_paths.mesh_train_step(cfg, fsdp=1, rows_per_device=2, seq=128)
    for kernel, (_, _, _, jaxpr) in results.items():
        calls = _fused_up_calls(jaxpr, 2 * 128, 128, 512)
        assert calls >= 1 if kernel == "pallas" else calls == 0, (kernel, calls)
    assert results["pallas"][0] == pytest.approx(results["xla"][0], rel=1e-2)
    updates = {k: jax.tree.map(lambda after, before: after - before, r[2], r[1]) for k, r in results.items()}
    for a, b in zip(jax.tree.leaves(updates["xla"]), jax.tree.leaves(updates["pallas"])):
        if not a.any():  # q, k, v get no gradient while the zero-initialised attention output is zero
            assert not b.any()
        else:  # the updates: gradients through bf16 GEMMs, then Muon / AdamW
            assert _rel(b, a) < 0.1


@hopper
@pytest.mark.parametrize("lead,m,k", [((3,), 384, 192), ((2, 2), 256, 1664), ((1,), 128, 64), ((26,), 1664, 128)])
def test_symmetric_products_match_xla(lead, m, k):
    """Muon's symmetric products on a Hopper (sym_matmul's kernel: upper tiles, mirrored), against fp32
    references: x x^T of a stack (3 and 13 tiles a side leave the last row block half past the end), and
    Y Y for Y = x x^T + beta I (the Newton-Schulz polynomial's square). Both exactly symmetric."""
    assert sym_matmul.supported(m, k, jnp.bfloat16)
    x = (jax.random.normal(jax.random.key(0), (*lead, m, k)) / k ** 0.5).astype(jnp.bfloat16)
    xf = np.asarray(x, np.float32)
    A = jax.jit(sym_matmul.gram)(x)
    want = xf @ np.swapaxes(xf, -1, -2)
    np.testing.assert_allclose(np.asarray(A, np.float32), want, rtol=2 ** -7, atol=1e-3 * np.abs(want).max())
    assert (A == jnp.swapaxes(A, -1, -2)).all()
    Y = (A - 1.175 * jnp.eye(m, dtype=A.dtype)).astype(jnp.bfloat16)
    got = jax.jit(sym_matmul.symmetric_square)(Y)
    Yf = np.asarray(Y, np.float32)
    want = Yf @ Yf
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2 ** -7, atol=1e-3 * np.abs(want).max())
    assert (got == jnp.swapaxes(got, -1, -2)).all()
