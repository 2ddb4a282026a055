"""Pallas (Triton) kernels for the training step's memory-bound work, where XLA's fusions need more
passes than the data requires. Off GPU, Pallas interprets them (tests). jax 0.11 deprecates Pallas'
Triton backend (in favour of Mosaic GPU): where it is gone, `available()` is False and 'auto' picks XLA.

RoPE + QK-norm (SPEC §2), one pass each way. XLA runs this step between the qkv GEMM and cuDNN attention
as five passes a layer: the norm statistics, the q/k outputs, a copy of v, their re-run for the
backward, and the backward into d(qkv). Here the forward reads the GEMM's (B, T, H + 2 Hkv, hd) output
once and writes q and k (rotated, then RMS-normalised), v and each head's inverse RMS; the backward reads
dq, dk, dv and the normalised q and k (which attention keeps for its own backward anyway) and writes
d(qkv) in the GEMM's layout. Same math as model.rope_qk_norm: RoPE's output is rounded to the compute
dtype before the fp32 norm.

Cross-entropy (model._fused_ce): over one chunk's raw logits (rows, V), in one pass, the sum of the
exponentials of the softcapped logits (shifted by c) and the scores e^(softcapped - c) x softcap', which
model._fused_ce scales per row into d(loss)/d(raw logits). XLA's passes for this (8.7 + 8.5 ms of a d20 step
on an H100) are bound by its IEEE-exact exponential and division, not by memory; PTX's approximate ex2 and
rcp are within 2 fp32 ulp, far below the bf16 rounding of the scores. Same formulas as model._softcap_terms:
with r = 1 / (1 + e^(2z/c)), c tanh(z/c) = c (1 - 2r) and its derivative is 4 r (1 - r). One pass where there
were two (the logsumexp, then d(logits)): d20 on an H100 12.3 -> 6.2 ms a step.

Residual add + RMSNorm (model.add_rms_norm), one pass each way (d20 on an H100: 23.7 -> 20.7 ms a step).

On a mesh every kernel runs on each device's rows, in a shard_map over the batch axes.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from nanochat_jax.sharding import per_device, row_shards

try:
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # a jax without Pallas' Triton backend
    plgpu = None


def available() -> bool:
    return plgpu is not None


def _pallas_call(kernel, grid, in_specs, out_specs, out_shape, num_warps=4, num_stages=1):
    interpret = jax.default_backend() != "gpu"
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          interpret=interpret, compiler_params=None if interpret else
                          plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages))


# ----------------------------------------------------------------------------------------------
# RoPE + QK-norm

BLOCK_ROWS = 64  # token positions per program; each program handles one head of them


def rope_supported(seq_len: int, head_dim: int) -> bool:
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


def _rows_and_table(cos_Txh):
    """Token positions per program, and the cos/sin block of a program's rows (row i of the flattened
    (B T) rows is position i mod T)."""
    T, h = cos_Txh.shape
    rows = min(BLOCK_ROWS, T)
    return rows, pl.BlockSpec((rows, h), lambda i, j: (i % (T // rows), 0))


@per_device(in_dims=(0, None, None), out_dims=(0, 0, 0, 1))
def _forward(qkv_RxNxd, cos_Txh, sin_Txh, *, n_q, n_kv):
    R, N, hd = qkv_RxNxd.shape
    rows, table = _rows_and_table(cos_Txh)
    kernel = functools.partial(_fwd_kernel, n_q=n_q, n_kv=n_kv, eps=float(jnp.finfo(qkv_RxNxd.dtype).eps))
    dt = qkv_RxNxd.dtype
    return _pallas_call(
        kernel, (R // rows, N),
        [pl.BlockSpec((rows, pl.squeezed, hd), lambda i, j: (i, j, 0)), table, table],
        [_head_specs(rows, n_q, hd, lambda j: j), _head_specs(rows, n_kv, hd, lambda j: j - n_q),
         _head_specs(rows, n_kv, hd, lambda j: j - n_q - n_kv),
         pl.BlockSpec((pl.squeezed, rows), lambda i, j: (jnp.minimum(j, n_q + n_kv - 1), i))],
        [jax.ShapeDtypeStruct((R, n_q, hd), dt), jax.ShapeDtypeStruct((R, n_kv, hd), dt),
         jax.ShapeDtypeStruct((R, n_kv, hd), dt), jax.ShapeDtypeStruct((n_q + n_kv, R), jnp.float32)]
    )(qkv_RxNxd, cos_Txh, sin_Txh)


@per_device(in_dims=(0, 0, 0, 0, 0, 1, None, None), out_dims=0)
def _backward(dq, dk, dv, q, k, rs, cos_Txh, sin_Txh):
    R, n_q, hd = q.shape
    n_kv = k.shape[1]
    rows, table = _rows_and_table(cos_Txh)
    qs, ks = _head_specs(rows, n_q, hd, lambda j: j), _head_specs(rows, n_kv, hd, lambda j: j - n_q)
    return _pallas_call(
        functools.partial(_bwd_kernel, n_q=n_q, n_kv=n_kv), (R // rows, n_q + 2 * n_kv),
        [qs, ks, _head_specs(rows, n_kv, hd, lambda j: j - n_q - n_kv), qs, ks,
         pl.BlockSpec((pl.squeezed, rows), lambda i, j: (jnp.minimum(j, n_q + n_kv - 1), i)), table, table],
        pl.BlockSpec((rows, pl.squeezed, hd), lambda i, j: (i, j, 0)),
        jax.ShapeDtypeStruct((R, n_q + 2 * n_kv, hd), q.dtype))(dq, dk, dv, q, k, rs, cos_Txh, sin_Txh)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _rope_qk_norm(qkv_RxNxd, cos_Txh, sin_Txh, n_q, n_kv):
    return _forward(qkv_RxNxd, cos_Txh, sin_Txh, n_q=n_q, n_kv=n_kv)[:3]


def _rope_qk_norm_fwd(qkv_RxNxd, cos_Txh, sin_Txh, n_q, n_kv):
    q, k, v, rs = _forward(qkv_RxNxd, cos_Txh, sin_Txh, n_q=n_q, n_kv=n_kv)
    return (q, k, v), (q, k, rs, cos_Txh, sin_Txh)


def _rope_qk_norm_bwd(n_q, n_kv, res, cotangents):
    q, k, rs, cos_Txh, sin_Txh = res
    dqkv = _backward(*cotangents, q, k, rs, cos_Txh, sin_Txh)
    return dqkv, jnp.zeros_like(cos_Txh), jnp.zeros_like(sin_Txh)


_rope_qk_norm.defvjp(_rope_qk_norm_fwd, _rope_qk_norm_bwd)


def rope_qk_norm_split(qkv_BxTxNxd, cos_Txh, sin_Txh, n_q: int, n_kv: int):
    """(q, k, v) from the qkv GEMM's output, as model.rope_qk_norm + slicing computes them: q and k
    rotated then RMS-normalised, v as is. Every row has positions 0..T-1 (training); cos/sin (T, hd/2)."""
    B, T, N, hd = qkv_BxTxNxd.shape
    dt = qkv_BxTxNxd.dtype
    q, k, v = _rope_qk_norm(qkv_BxTxNxd.reshape(B * T, N, hd), cos_Txh.astype(dt), sin_Txh.astype(dt), n_q, n_kv)
    return q.reshape(B, T, n_q, hd), k.reshape(B, T, n_kv, hd), v.reshape(B, T, n_kv, hd)


# ----------------------------------------------------------------------------------------------
# Cross-entropy

CE_ROWS, CE_COLS = 16, 1024  # rows per program; vocabulary columns per loop step
LOG2E = 1.4426950408889634


def _approx(op, x):
    """PTX's approximate ex2 / rcp (within 2 fp32 ulp; Pallas' own exp and division are the IEEE-exact
    libdevice ones, which made this kernel compute-bound); the exact operations when interpreted."""
    if jax.default_backend() != "gpu":
        return jnp.exp2(x) if op == "ex2" else 1 / x
    [y] = plgpu.elementwise_inline_asm(f"{op}.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
                                       result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])
    return y


def ce_supported(n_rows: int, vocab: int) -> bool:
    cols = min(CE_COLS, vocab)
    return n_rows % (CE_ROWS * row_shards()) == 0 and vocab % cols == 0 and cols & (cols - 1) == 0 and cols >= 16


def _ce_kernel(raw_ref, sum_ref, *scores_ref, softcap):
    R, V = raw_ref.shape
    C = min(CE_COLS, V)
    f32 = jnp.float32

    def tile(k, total):  # vocabulary columns [k C, (k + 1) C): e^(softcap(z) - softcap) summed, scores written
        z = raw_ref[:, pl.ds(k * C, C)].astype(f32)
        r = _approx("rcp", 1 + _approx("ex2", z * (2 * LOG2E / softcap)))
        e = _approx("ex2", (-2 * softcap * LOG2E) * r)
        if scores_ref:
            scores_ref[0][:, pl.ds(k * C, C)] = (e * (4 * r * (1 - r))).astype(scores_ref[0].dtype)
        return total + e

    # summed tile-wise, reduced across the tile once at the end
    total = lax.fori_loop(0, V // C, tile, jnp.zeros((R, C), f32))
    sum_ref[...] = jnp.sum(total, axis=1)


@per_device(in_dims=(0,), out_dims=0)
def _ce_call(raw_NxV, *, softcap, grads):
    N, V = raw_NxV.shape
    row = pl.BlockSpec((CE_ROWS,), lambda i: (i,))
    full = pl.BlockSpec((CE_ROWS, V), lambda i: (i, 0))
    out_shape = [jax.ShapeDtypeStruct((N,), jnp.float32)] + [jax.ShapeDtypeStruct((N, V), raw_NxV.dtype)] * grads
    return _pallas_call(functools.partial(_ce_kernel, softcap=softcap), (N // CE_ROWS,), [full],
                        [row] + [full] * grads, out_shape, num_warps=8, num_stages=3)(raw_NxV)


def softcap_sum_and_scores(raw_NxV, softcap: float, grads: bool):
    """(S (N,) fp32, the sum of e^(softcapped - softcap) with softcapped = softcap * tanh(raw / softcap), and
    the scores e^(softcapped - softcap) x softcap'(raw) (N, V) in raw's dtype, or None without grads):
    model._softcap_sum_and_scores in one pass."""
    out = _ce_call(raw_NxV, softcap=softcap, grads=grads)
    return out[0], (out[1] if grads else None)


# ----------------------------------------------------------------------------------------------
# Residual add + RMSNorm

NORM_ROWS = 2  # rows per program (2 warps); each row is held whole, in column tiles, between the two steps


def _norm_tile(d_model: int) -> int:
    """Columns per tile: the largest power of two <= 128 dividing d_model (Triton tiles are powers of two)."""
    return math.gcd(d_model, 128)


def norm_supported(n_rows: int, d_model: int) -> bool:
    return _norm_tile(d_model) >= 16 and n_rows % (NORM_ROWS * row_shards()) == 0


def _add_norm_fwd_kernel(x_ref, y_ref, s_ref, h_ref, r_ref, *, tile, eps):
    f32 = jnp.float32
    cols = [pl.ds(j, tile) for j in range(0, x_ref.shape[1], tile)]
    sums, tiles = jnp.zeros((x_ref.shape[0],), f32), []
    for c in cols:
        s = (x_ref[:, c].astype(f32) + y_ref[:, c].astype(f32)).astype(s_ref.dtype)  # the stream's rounding
        s_ref[:, c] = s
        tiles.append(s.astype(f32))
        sums += jnp.sum(tiles[-1] * tiles[-1], axis=1)
    r = lax.rsqrt(sums / x_ref.shape[1] + eps)
    r_ref[...] = r
    for c, s in zip(cols, tiles):
        h_ref[:, c] = (s * r[:, None]).astype(h_ref.dtype)


def _add_norm_bwd_kernel(s_ref, r_ref, dh_ref, ds_ref, dx_ref, *, tile):
    # h = s r with r = (mean(s^2) + eps)^-1/2  =>  ds += r (dh - h mean(dh h)), h unrounded
    f32 = jnp.float32
    cols = [pl.ds(j, tile) for j in range(0, s_ref.shape[1], tile)]
    r, dots, tiles = r_ref[...], jnp.zeros((s_ref.shape[0],), f32), []
    for c in cols:
        n, g = s_ref[:, c].astype(f32) * r[:, None], dh_ref[:, c].astype(f32)
        tiles.append((n, g))
        dots += jnp.sum(n * g, axis=1)
    dots = dots / s_ref.shape[1]
    for c, (n, g) in zip(cols, tiles):
        dx_ref[:, c] = (ds_ref[:, c].astype(f32) + r[:, None] * (g - n * dots[:, None])).astype(dx_ref.dtype)


def _norm_call(kernel, args, out_shape):
    """One program per NORM_ROWS rows of (N, D) and (N,) arrays."""
    N, D = args[0].shape
    spec = lambda a: pl.BlockSpec((NORM_ROWS, D), lambda i: (i, 0)) if a.ndim == 2 else \
        pl.BlockSpec((NORM_ROWS,), lambda i: (i,))
    return _pallas_call(kernel, (N // NORM_ROWS,), [spec(a) for a in args], [spec(o) for o in out_shape],
                        out_shape, num_warps=2)(*args)


@per_device(in_dims=(0, 0), out_dims=0)
def _add_norm_forward(x_NxD, y_NxD):
    N, D = x_NxD.shape
    kernel = functools.partial(_add_norm_fwd_kernel, tile=_norm_tile(D), eps=float(jnp.finfo(x_NxD.dtype).eps))
    return _norm_call(kernel, (x_NxD, y_NxD), [jax.ShapeDtypeStruct((N, D), x_NxD.dtype)] * 2 +
                      [jax.ShapeDtypeStruct((N,), jnp.float32)])


@per_device(in_dims=(0, 0, 0, 0), out_dims=0)
def _add_norm_backward(s_NxD, r_N, dh_NxD, ds_NxD):
    kernel = functools.partial(_add_norm_bwd_kernel, tile=_norm_tile(s_NxD.shape[1]))
    return _norm_call(kernel, (s_NxD, r_N, dh_NxD, ds_NxD), [jax.ShapeDtypeStruct(s_NxD.shape, s_NxD.dtype)])[0]


@jax.custom_vjp
def _add_rms_norm(x_NxD, y_NxD):
    return _add_rms_norm_fwd(x_NxD, y_NxD)[0]


def _add_rms_norm_fwd(x_NxD, y_NxD):
    s, h, r = _add_norm_forward(x_NxD, y_NxD)
    return (s, h), (s, r)


def _add_rms_norm_bwd(res, cotangents):
    s, r = res
    ds, dh = cotangents
    dx = _add_norm_backward(s, r, dh, ds)
    return dx, dx  # s = x + y


_add_rms_norm.defvjp(_add_rms_norm_fwd, _add_rms_norm_bwd)


def add_rms_norm(x_BxTxD, y_BxTxD):
    """(s, rms_norm(s)) with s = x + y (rounded to x's dtype), as model.add_rms_norm computes them, in one
    pass each way. XLA takes two each way (forward: the add with the norm's statistics, then the scaling;
    backward: the statistic, then d(x)): eleven reads and writes of a (B, T, D) array, the kernels eight."""
    shape = x_BxTxD.shape
    s, h = _add_rms_norm(x_BxTxD.reshape(-1, shape[-1]), y_BxTxD.astype(x_BxTxD.dtype).reshape(-1, shape[-1]))
    return s.reshape(shape), h.reshape(shape)
