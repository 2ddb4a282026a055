"""The loss (SPEC §2): cross-entropy of the softcapped logits softcap(x @ w), weighted and summed.

`chunked` computes the same sum over chunks of positions x all rows, so the (B, T, V) logits never exist,
and differentiated it computes the gradients in its forward pass (the loss is a weighted sum, so its
cotangent is one scalar that the backward pass only multiplies in): each chunk's logits come from one
GEMM and are read once, and the LM-head GEMM is not recomputed in the backward pass. That one pass writes
the scores e^(softcap - SOFTCAP) softcap' while it sums the exponentials, before the logsumexp is known;
each row's 1 / S and weight then scale the two GEMMs' (rows, D) sides (dx's output, x for dw), and the
target's term is one entry a row. (XLA's own differentiation of softcap + logsumexp made ~8 fp32 passes
over the logits.) The pass is plain JAX or a Triton kernel: XLA's version is bound by its IEEE-exact
exponential and division, not by memory; PTX's approximate ex2 and rcp are within 2 fp32 ulp, far below
the bf16 rounding of the scores.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from nanochat_jax import kernels
from nanochat_jax import model as M
from nanochat_jax.sharding import per_device, row_shards

# ----------------------------------------------------------------------------------------------
# The plain-JAX function


def token_losses(logits_BxTxV, targets_BxT):
    """Cross-entropy per token in the logits' dtype; 0 where target == -1."""
    lse = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    picked = jnp.take_along_axis(logits_BxTxV, jnp.maximum(targets_BxT, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(targets_BxT != -1, lse - picked, 0.0)


# ----------------------------------------------------------------------------------------------
# The same sum in one pass over each chunk of logits (XLA)


def _chunks(a, chunk, fill):
    """(B, T, ...) -> (n, B, chunk, ...) over positions, padded with `fill` (rows stay whole, so a
    batch sharded over rows stays sharded)."""
    B, T = a.shape[:2]
    n = -(-T // chunk)
    pad = [(0, 0), (0, n * chunk - T)] + [(0, 0)] * (a.ndim - 2)
    return jnp.pad(a, pad, constant_values=fill).reshape(B, n, chunk, *a.shape[2:]).swapaxes(0, 1)


def _softcap_terms(raw):
    """(e^(softcap(raw) - SOFTCAP), softcap'(raw)). softcap(raw) = SOFTCAP (1 - 2r) and softcap'(raw) = 4 r (1 - r)
    with r = 1 / (1 + e^(2 raw / SOFTCAP)): one exponential and one division, where tanh and its derivative
    cost several; e^.. = inf gives r = 0. The softcapped logits are <= SOFTCAP: a safe shift, so no max."""
    r = 1 / (1 + jnp.exp(raw * (2 / M.SOFTCAP)))
    return jnp.exp(-2 * M.SOFTCAP * r), 4 * r * (1 - r)


def softcap_sum_and_scores(raw, acc, dtype, grads):
    """S = the sum of e^(softcap(raw) - SOFTCAP) over the last axis (logsumexp = SOFTCAP + log S), and (with
    grads) the scores e^(softcap(raw) - SOFTCAP) x softcap'(raw) in `dtype` (None without grads)."""
    e, slope = _softcap_terms(raw.astype(acc))
    return jnp.sum(e, axis=-1), (e * slope).astype(dtype) if grads else None


def _with_target_term(scores, raw_t, t0, S):
    """The scores with each row's target entry t0 replaced by softcap'(raw_t) (e_t - S): then wt / S times
    the result is d(wt x cross-entropy)/d(raw) = wt (softmax - onehot) softcap'. (A row whose target is -1
    has weight 0; its entry at column 0 is overwritten, harmlessly.)"""
    e_t, slope_t = _softcap_terms(raw_t)
    value = (slope_t * (e_t - S)).astype(scores.dtype)
    return scores.at[(*jnp.indices(t0.shape, sparse=True), t0)].set(value, unique_indices=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def chunked(x_BxTxD, w_DxV, targets_BxT, weights_BxT, chunk, dtype, choice="xla"):
    """(sum of weights x cross-entropy of softcap(x @ w), per-token losses) over chunks of `chunk` positions
    x all rows; only the first output is differentiable. Weights must be 0 where targets == -1 (and the
    padded tail of the last chunk gets weight 0). `choice`: the kernels switch."""
    (total, losses), _ = _chunked_fwd(x_BxTxD, w_DxV, targets_BxT, weights_BxT, chunk, dtype, choice, grads=False)
    return total, losses


def _chunked_fwd(x_BxTxD, w_DxV, targets_BxT, weights_BxT, chunk, dtype, choice="xla", grads=True):
    B, T, D = x_BxTxD.shape
    w = w_DxV.astype(dtype)
    V = w.shape[1]
    acc = jnp.promote_types(dtype, jnp.float32)

    def one(dw, xtw):
        x, t, wt = xtw
        raw = M.matmul(x, w, dtype)  # the GEMM's compute-dtype output is all that is stored
        t0 = jnp.maximum(t, 0)
        raw_t = jnp.take_along_axis(raw, t0[..., None], axis=-1)[..., 0].astype(acc)
        if kernels.use(choice, "cross_entropy") and supported(t.size, V):
            S, scores = fused_sum_and_scores(raw.reshape(-1, V), M.SOFTCAP, grads)
            S, scores = S.reshape(t.shape), scores if scores is None else scores.reshape(raw.shape)
        else:
            S, scores = softcap_sum_and_scores(raw, acc, dtype, grads)
        losses = jnp.where(t != -1, M.SOFTCAP + jnp.log(S) - M.softcap(raw_t), 0.0)
        if not grads:
            return dw, (losses, None)
        d = _with_target_term(scores, raw_t, t0, S)  # d(loss)/d(raw) = scale x d
        scale = (wt / S)[..., None]
        dx = (lax.dot_general(d, w, (((2,), (1,)), ((), ())), preferred_element_type=x.dtype) * scale).astype(x.dtype)
        dw = dw + lax.dot_general((x * scale).astype(dtype), d, (((0, 1), (0, 1)), ((), ())),
                                  preferred_element_type=dw.dtype)
        return dw, (losses, dx)

    dw0 = jnp.zeros(w_DxV.shape, w_DxV.dtype) if grads else None
    dw, (losses, dx) = lax.scan(one, dw0, (_chunks(x_BxTxD, chunk, 0), _chunks(targets_BxT, chunk, -1),
                                          _chunks(weights_BxT.astype(acc), chunk, 0)))
    losses = losses.swapaxes(0, 1).reshape(B, -1)[:, :T]
    total = jnp.sum(losses * weights_BxT)
    if not grads:
        return (total, losses), None
    return (total, losses), (dx.swapaxes(0, 1).reshape(B, -1, D)[:, :T], dw)


def _chunked_bwd(chunk, dtype, choice, res, cotangents):
    g, _ = cotangents  # per-token losses are not differentiable (loss_fn stops their gradient)
    dx, dw = res
    return (g * dx).astype(dx.dtype), g * dw, None, None


chunked.defvjp(_chunked_fwd, _chunked_bwd)


# ----------------------------------------------------------------------------------------------
# The Triton kernel for softcap_sum_and_scores: one pass where XLA needs two (the logsumexp, then the scores)

CE_ROWS, CE_COLS = 16, 1024  # rows per program; vocabulary columns per loop step
LOG2E = 1.4426950408889634


def _approx(op, x):
    """PTX's approximate ex2 / rcp (Pallas' own exp and division are the IEEE-exact libdevice ones, which
    made this kernel compute-bound); the exact operations when interpreted."""
    if kernels.interpret():
        return jnp.exp2(x) if op == "ex2" else 1 / x
    [y] = kernels.triton_backend.elementwise_inline_asm(
        f"{op}.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])
    return y


def supported(n_rows: int, vocab: int) -> bool:
    cols = min(CE_COLS, vocab)
    return n_rows % (CE_ROWS * row_shards()) == 0 and vocab % cols == 0 and cols & (cols - 1) == 0 and cols >= 16


def _kernel(raw_ref, sum_ref, *scores_ref, softcap):
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
def _call(raw_RxV, *, softcap, grads):
    R, V = raw_RxV.shape
    row = pl.BlockSpec((CE_ROWS,), lambda i: (i,))
    full = pl.BlockSpec((CE_ROWS, V), lambda i: (i, 0))
    out_shape = [jax.ShapeDtypeStruct((R,), jnp.float32)] + [jax.ShapeDtypeStruct((R, V), raw_RxV.dtype)] * grads
    return kernels.triton_call(functools.partial(_kernel, softcap=softcap), (R // CE_ROWS,), [full],
                               [row] + [full] * grads, out_shape, num_warps=8, num_stages=3)(raw_RxV)


def fused_sum_and_scores(raw_RxV, softcap: float, grads: bool):
    """softcap_sum_and_scores of (R, V) raw logits in one kernel: (S (R,) fp32, scores (R, V) in raw's dtype
    or None without grads)."""
    out = _call(raw_RxV, softcap=softcap, grads=grads)
    return out[0], (out[1] if grads else None)
