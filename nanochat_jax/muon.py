"""Muon (SPEC §4): Nesterov momentum, then the update orthogonalised by Newton-Schulz, as one optax
transform.

Every leaf it sees is a matrix or a stack of matrices `(..., in, out)` in Flax's kernel layout; the
leading axes are batch axes, so a layer stack `(L, in, out)` is orthogonalised matrix by matrix with
batched matmuls only. Nothing mixes the leading axes, so on a mesh each device orthogonalises its own
share of the layers (sharding.split_layers) and the updates are gathered after, as the reference's
distributed Muon splits its parameters over ranks.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nanochat_jax import sharding
from nanochat_jax.kernels.sym_matmul import gram, symmetric_square

# Quintic Newton-Schulz coefficients (Keller Jordan's Muon): they maximise the slope at 0, so five
# steps push the singular values of a Gaussian matrix into about [0.57, 1.19], not exactly to 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


class MuonState(NamedTuple):
    count: jax.Array  # int32 scalar: updates applied so far (the step the schedules read)
    momentum: optax.Updates  # one buffer per parameter, same shape and dtype


def _add_to_diagonal(m, value):
    i = jnp.arange(m.shape[-1])
    return m.at[..., i, i].add(jnp.asarray(value, m.dtype))


# x x^T and Y Y for Y = x x^T + beta I are symmetric bitwise: on a Hopper kernels/sym_matmul.py computes only
# their upper triangle (d26: 58% of their multiply-adds). The Gram iteration's later products are symmetric only in exact
# arithmetic: with their mirrored upper triangles (and Y Y^T for Y Y) the bf16 iteration diverged on decaying
# spectra (128 x 512, 1/k singular values: 6e4 from float64), so XLA computes all of them.


def _ns_polynomial(A, kernels, exactly_symmetric=True):
    """a I + b A + c A^2 with the square completed: c (A + beta I)^2 + gamma I. The identity terms are
    then diagonal updates of GEMM outputs that nothing else reads, done in place (the b I + c A operand
    and the a I + ... sum were two passes over each (m, m) matrix); it also rounds better in bf16 (0.022
    from fp32 NS where the plain form is 0.029). exactly_symmetric:
    A is a scaled x x^T (symmetric bitwise), so Y Y may use sym_matmul's kernel; `kernels`: the switch."""
    a, b, c = NS_COEFFS
    Y = _add_to_diagonal(A, b / (2 * c))
    square = symmetric_square(Y, kernels) if exactly_symmetric else Y @ Y
    return _add_to_diagonal(c * square, a - b * b / (4 * c))


# Gram Newton-Schulz recomputes A = x x^T from x every this many steps: between restarts bf16 rounding
# leaves small negative eigenvalues in A that the polynomial blows up (5 steps without a restart: 1.3-40x
# off float64 on decaying spectra; with one after 3: as close as the plain iteration, 0.016-0.37 vs
# 0.015-0.43 on 128x512 to 1280x5120; a restart after 2 was worse on a power-law spectrum, 0.067 vs 0.034).
GRAM_SEGMENT = 3


def _scaled(m, scale, power=1):
    """m * scale^power in m's dtype (scale: fp32, one per matrix; None: m as is). Not via fp32: XLA may
    fold an upcast of a GEMM's output into the GEMM, so the rounding would depend on how it fused."""
    return m if scale is None else m * (scale ** power).astype(m.dtype)


def _newton_schulz_gram(x, steps, inv_norm, kernels):
    """The same iterates as x <- P(x x^T) x, carried on the (m, m) Gram matrix (Dao lab's Gram
    Newton-Schulz): x_k = Q_k x with Q_{k+1} = P_k Q_k and A_{k+1} = P_k A_k P_k, so the wide (m, n)
    matrix is only read to form A and written once per segment. For 5 steps: 14 m^3 + 4 m^2 n
    multiply-adds where the plain iteration takes 5 m^3 + 10 m^2 n (the MLP's n = 4m: -33%).
    `x` is not normalised: x / |x| = inv_norm x enters as A_0 = inv_norm^2 x x^T and Q_0 = inv_norm P_0."""
    for start in range(0, steps, GRAM_SEGMENT):
        seg = min(GRAM_SEGMENT, steps - start)
        A, Q = _scaled(gram(x, kernels), inv_norm, 2), None
        for k in range(seg):
            P = _ns_polynomial(A, kernels, exactly_symmetric=k == 0)
            Q = _scaled(P, inv_norm) if Q is None else P @ Q
            if k + 1 < seg:
                A = P @ (A @ P)
        x, inv_norm = Q @ x, None  # normalised from here on
    return x


def orthogonalize(g, ns_steps=5, eps=1e-7, dtype=jnp.bfloat16, kernels="auto"):
    """Approximate U V^T of each matrix in the last two axes of `g`, iterated in `dtype`.

    The first step takes x / |x| (spectral norm <= 1) as x x^T / |x|^2 and P_0 / |x|, two (m, m)
    scalings, so that x / |x| itself is never written: in the optimiser the cast of the Nesterov
    update to `dtype` then fuses into the momentum's pass (a pass over every weight less). `kernels`: the
    model's switch (ModelConfig.kernels), which governs sym_matmul's kernel."""
    if ns_steps < 1:
        raise ValueError(f"orthogonalize: ns_steps must be >= 1, got {ns_steps}")
    x = g.astype(dtype)
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:  # iterate on X X^T of the smaller side: cheaper, and the same result transposed
        x = jnp.swapaxes(x, -1, -2)
    # The barrier keeps the norm's reduction out of the pass that writes x: fused with it (a
    # multi-output reduction), that pass ran at half the memory speed.
    sq = jnp.sum(jnp.square(jax.lax.optimization_barrier(x).astype(jnp.float32)), axis=(-2, -1), keepdims=True)
    inv_norm = 1 / (jnp.sqrt(sq) + eps)
    if x.shape[-1] > 1.5 * x.shape[-2]:  # where the Gram form takes fewer FLOPs (see its docstring)
        x = _newton_schulz_gram(x, ns_steps, inv_norm, kernels)
    else:
        for _ in range(ns_steps):
            x, inv_norm = _scaled(_ns_polynomial(_scaled(gram(x, kernels), inv_norm, 2), kernels), inv_norm) @ x, None
    return x if wide else jnp.swapaxes(x, -1, -2)


def shape_scale(shape):
    """max(1, fan_out / fan_in)^0.5 for an (in, out) kernel: 2 for the MLP up-projection, else 1."""
    fan_in, fan_out = shape[-2], shape[-1]
    return max(1.0, fan_out / fan_in) ** 0.5


def muon(learning_rate, momentum, nesterov=True, ns_steps=5, eps=1e-7,
         ns_dtype=jnp.bfloat16, kernels="auto") -> optax.GradientTransformation:
    """Muon as an optax transform; `learning_rate` and `momentum` are floats or schedules of the step.
    `ns_dtype`: bf16 as SPEC §4 (on GPUs); fp32 where the model computes in fp32 (CPU, T4), where bf16
    matmuls are slow and would also make results depend on how the stack is split over devices.
    `kernels`: the model's switch (auto | pallas | xla), for Newton-Schulz's symmetric products.

    Per parameter: buf <- lerp(buf, g, 1 - mu); g <- lerp(g, buf, mu) (Nesterov) or buf;
    update = -lr * max(1, out/in)^0.5 * NS5(g).
    """

    def value_at(hyper, count):
        return hyper(count) if callable(hyper) else hyper

    def init_fn(params):
        for path, p in jax.tree_util.tree_leaves_with_path(params):
            if p.ndim < 2:
                raise ValueError(f"muon: parameter {jax.tree_util.keystr(path)} has shape {p.shape}; "
                                 "Muon needs matrices (..., in, out)")
        return MuonState(count=jnp.zeros([], jnp.int32), momentum=optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        lr = value_at(learning_rate, state.count)
        mu = value_at(momentum, state.count)
        buffers = optax.tree.update_moment(updates, state.momentum, mu, 1)  # lerp(buf, g, 1 - mu)

        def one(g, buf):
            g = (1 - mu) * g + mu * buf if nesterov else buf  # lerp(g, buf, mu)
            update = sharding.split_layers(lambda x: orthogonalize(x, ns_steps, eps, ns_dtype, kernels), g)
            return -lr * shape_scale(g.shape) * update.astype(buf.dtype)

        new_updates = jax.tree.map(one, updates, buffers)
        return new_updates, MuonState(count=optax.safe_increment(state.count), momentum=buffers)

    return optax.GradientTransformation(init_fn, update_fn)
