"""RoPE then QK-norm on the qkv GEMM's output (SPEC §2): q, k = norm(rope(q)), norm(rope(k)); v as is.

XLA runs this step between the qkv GEMM and attention as five passes a layer: the norm statistics, the q/k
outputs, a copy of v, their re-run for the backward, and the backward into d(qkv). The Triton kernel reads
the GEMM's (B, T, N, E) output once and writes q and k (rotated, then RMS-normalised), v and each head's
inverse RMS; its backward reads dq, dk, dv and the normalised q and k (which attention keeps for its own
backward anyway) and writes d(qkv) in the GEMM's layout. RoPE's output is rounded to the compute dtype
before the fp32 norm, as in the plain function.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from nanochat_jax import kernels
from nanochat_jax import model as M
from nanochat_jax.sharding import per_device

# ----------------------------------------------------------------------------------------------
# The plain-JAX function


# Keeps only its compute-dtype input for the backward pass (the rotation and norm are re-run there).
# RoPE runs in the compute dtype, as the reference's (bf16 cos/sin tables under autocast).
@functools.partial(jax.checkpoint, prevent_cse=False)
def rope_then_norm(x_BxTxNxE, cos_BxTxP, sin_BxTxP):
    dt = x_BxTxNxE.dtype
    return M.rms_norm(M.apply_rope(x_BxTxNxE, cos_BxTxP.astype(dt), sin_BxTxP.astype(dt)))


def reference(qkv_BxTxNxE, cos_BxTxP, sin_BxTxP, n_q: int, n_kv: int):
    qk = rope_then_norm(qkv_BxTxNxE[:, :, :n_q + n_kv], cos_BxTxP, sin_BxTxP)
    return qk[:, :, :n_q], qk[:, :, n_q:], qkv_BxTxNxE[:, :, n_q + n_kv:]


# ----------------------------------------------------------------------------------------------
# The Triton kernel: one pass each way

BLOCK_ROWS = 64  # token positions per program; each program handles one head of them


def supported(seq_len: int, head_dim: int) -> bool:
    """Triton blocks are powers of two; a block of rows must not straddle two sequences (cos/sin rows)."""
    pow2 = lambda n: n > 0 and n & (n - 1) == 0
    return pow2(head_dim) and head_dim >= 32 and pow2(seq_len) and seq_len >= 16


def _head_specs(rows, n_heads, hd, head_of):
    """Block (rows, hd) of head head_of(j) of a (R, n_heads, hd) array, clamped into range (programs for
    other heads map to a block they do not touch)."""
    return pl.BlockSpec((rows, pl.squeezed, hd), lambda i, j: (i, jnp.clip(head_of(j), 0, n_heads - 1), 0))


def _rotate(a1, a2, c, s):
    """RoPE's rotation of the halves (a1, a2); _rotate(.., -s) is its transpose."""
    return a1 * c + a2 * s, a2 * c - a1 * s


def _fwd_kernel(x_ref, cos_ref, sin_ref, q_ref, k_ref, v_ref, rs_ref, *, n_q, n_kv, eps):
    j, h = pl.program_id(1), cos_ref.shape[-1]
    f32 = jnp.float32

    @pl.when(j < n_q + n_kv)
    def _():
        c, s = cos_ref[...].astype(f32), sin_ref[...].astype(f32)
        y1, y2 = _rotate(x_ref[:, :h].astype(f32), x_ref[:, h:].astype(f32), c, s)
        y1, y2 = y1.astype(x_ref.dtype).astype(f32), y2.astype(x_ref.dtype).astype(f32)  # RoPE's output dtype
        r = lax.rsqrt((jnp.sum(y1 * y1, axis=1) + jnp.sum(y2 * y2, axis=1)) / (2 * h) + eps)
        rs_ref[...] = r
        for out_ref, mine in ((q_ref, j < n_q), (k_ref, j >= n_q)):
            @pl.when(mine)
            def _():
                out_ref[:, :h] = (y1 * r[:, None]).astype(out_ref.dtype)
                out_ref[:, h:] = (y2 * r[:, None]).astype(out_ref.dtype)

    @pl.when(j >= n_q + n_kv)
    def _():
        v_ref[...] = x_ref[...]


def _bwd_kernel(dq_ref, dk_ref, dv_ref, q_ref, k_ref, rs_ref, cos_ref, sin_ref, dx_ref, *, n_q, n_kv):
    j, h = pl.program_id(1), cos_ref.shape[-1]
    f32 = jnp.float32
    for g_ref, n_ref, mine in ((dq_ref, q_ref, j < n_q), (dk_ref, k_ref, (j >= n_q) & (j < n_q + n_kv))):
        @pl.when(mine)
        def _():
            g1, g2 = g_ref[:, :h].astype(f32), g_ref[:, h:].astype(f32)
            n1, n2 = n_ref[:, :h].astype(f32), n_ref[:, h:].astype(f32)
            r = rs_ref[...]
            # n = y r with r = (mean(y^2) + eps)^-1/2  =>  dy = r (g - n mean(g n))
            gn = (jnp.sum(g1 * n1, axis=1) + jnp.sum(g2 * n2, axis=1)) / (2 * h)
            dy1, dy2 = r[:, None] * (g1 - n1 * gn[:, None]), r[:, None] * (g2 - n2 * gn[:, None])
            dx1, dx2 = _rotate(dy1, dy2, cos_ref[...].astype(f32), -sin_ref[...].astype(f32))
            dx_ref[:, :h] = dx1.astype(dx_ref.dtype)
            dx_ref[:, h:] = dx2.astype(dx_ref.dtype)

    @pl.when(j >= n_q + n_kv)
    def _():
        dx_ref[...] = dv_ref[...]


def _rows_and_table(cos_TxP):
    """Token positions per program, and the cos/sin block of a program's rows (row i of the flattened
    (B T) rows is position i mod T)."""
    T, h = cos_TxP.shape
    rows = min(BLOCK_ROWS, T)
    return rows, pl.BlockSpec((rows, h), lambda i, j: (i % (T // rows), 0))


@per_device(in_dims=(0, None, None), out_dims=(0, 0, 0, 1))
def _forward(qkv_RxNxE, cos_TxP, sin_TxP, *, n_q, n_kv):
    R, N, hd = qkv_RxNxE.shape
    rows, table = _rows_and_table(cos_TxP)
    kernel = functools.partial(_fwd_kernel, n_q=n_q, n_kv=n_kv, eps=float(jnp.finfo(qkv_RxNxE.dtype).eps))
    dt = qkv_RxNxE.dtype
    return kernels.triton_call(
        kernel, (R // rows, N),
        [pl.BlockSpec((rows, pl.squeezed, hd), lambda i, j: (i, j, 0)), table, table],
        [_head_specs(rows, n_q, hd, lambda j: j), _head_specs(rows, n_kv, hd, lambda j: j - n_q),
         _head_specs(rows, n_kv, hd, lambda j: j - n_q - n_kv),
         pl.BlockSpec((pl.squeezed, rows), lambda i, j: (jnp.minimum(j, n_q + n_kv - 1), i))],
        [jax.ShapeDtypeStruct((R, n_q, hd), dt), jax.ShapeDtypeStruct((R, n_kv, hd), dt),
         jax.ShapeDtypeStruct((R, n_kv, hd), dt), jax.ShapeDtypeStruct((n_q + n_kv, R), jnp.float32)]
    )(qkv_RxNxE, cos_TxP, sin_TxP)


@per_device(in_dims=(0, 0, 0, 0, 0, 1, None, None), out_dims=0)
def _backward(dq, dk, dv, q, k, rs, cos_TxP, sin_TxP):
    R, n_q, hd = q.shape
    n_kv = k.shape[1]
    rows, table = _rows_and_table(cos_TxP)
    qs, ks = _head_specs(rows, n_q, hd, lambda j: j), _head_specs(rows, n_kv, hd, lambda j: j - n_q)
    return kernels.triton_call(
        functools.partial(_bwd_kernel, n_q=n_q, n_kv=n_kv), (R // rows, n_q + 2 * n_kv),
        [qs, ks, _head_specs(rows, n_kv, hd, lambda j: j - n_q - n_kv), qs, ks,
         pl.BlockSpec((pl.squeezed, rows), lambda i, j: (jnp.minimum(j, n_q + n_kv - 1), i)), table, table],
        pl.BlockSpec((rows, pl.squeezed, hd), lambda i, j: (i, j, 0)),
        jax.ShapeDtypeStruct((R, n_q + 2 * n_kv, hd), q.dtype))(dq, dk, dv, q, k, rs, cos_TxP, sin_TxP)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _rope_qk_norm(qkv_RxNxE, cos_TxP, sin_TxP, n_q, n_kv):
    return _forward(qkv_RxNxE, cos_TxP, sin_TxP, n_q=n_q, n_kv=n_kv)[:3]


def _rope_qk_norm_fwd(qkv_RxNxE, cos_TxP, sin_TxP, n_q, n_kv):
    q, k, v, rs = _forward(qkv_RxNxE, cos_TxP, sin_TxP, n_q=n_q, n_kv=n_kv)
    return (q, k, v), (q, k, rs, cos_TxP, sin_TxP)


def _rope_qk_norm_bwd(n_q, n_kv, res, cotangents):
    q, k, rs, cos_TxP, sin_TxP = res
    dqkv = _backward(*cotangents, q, k, rs, cos_TxP, sin_TxP)
    return dqkv, jnp.zeros_like(cos_TxP), jnp.zeros_like(sin_TxP)


_rope_qk_norm.defvjp(_rope_qk_norm_fwd, _rope_qk_norm_bwd)


def fused(qkv_BxTxNxE, cos_TxP, sin_TxP, n_q: int, n_kv: int):
    """`reference` as one kernel each way; every row has positions 0..T-1 (training), cos/sin (T, E/2)."""
    B, T, N, hd = qkv_BxTxNxE.shape
    dt = qkv_BxTxNxE.dtype
    q, k, v = _rope_qk_norm(qkv_BxTxNxE.reshape(B * T, N, hd), cos_TxP.astype(dt), sin_TxP.astype(dt), n_q, n_kv)
    return q.reshape(B, T, n_q, hd), k.reshape(B, T, n_kv, hd), v.reshape(B, T, n_kv, hd)


# ----------------------------------------------------------------------------------------------


def rope_qk_norm(qkv_BxTxNxE, cos_BxTxP, sin_BxTxP, n_q: int, n_kv: int, choice: str):
    """(q, k, v) from the qkv GEMM's output: the first n_q heads are q, the next n_kv k, the rest v.
    The kernel needs a training forward: the same positions 0..T-1 in every row (cos/sin of one row)."""
    T, hd = qkv_BxTxNxE.shape[1], qkv_BxTxNxE.shape[3]
    if kernels.use(choice, "rope_qk_norm") and cos_BxTxP.shape[0] == 1 and supported(T, hd):
        return fused(qkv_BxTxNxE, cos_BxTxP[0], sin_BxTxP[0], n_q, n_kv)
    return reference(qkv_BxTxNxE, cos_BxTxP, sin_BxTxP, n_q, n_kv)
