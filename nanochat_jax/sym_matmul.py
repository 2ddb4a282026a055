"""Products whose result is symmetric, for Muon's Newton-Schulz: gram(x) = x x^T, and symmetric_product(a, b)
= a b for an exactly symmetric b (Muon: Y Y). Both are a b^T with both operands read by rows, which is
what the kernel computes. On a Hopper GPU in bf16 a Mosaic GPU kernel computes only the output tiles on
and above the diagonal and writes each off-diagonal one twice, as itself and transposed: 58% of the
multiply-adds at d26's 1,664 (13 tiles a side), 60% at d20's 1,280. Elsewhere XLA computes all of it.

One CTA per block of 256 rows (row tiles 2R and 2R + 1) by one column tile c, for R <= c / 2: the blocks
that touch the upper triangle. Each of two compute warpgroups accumulates one 128 x 128 tile in fp32 over
64-wide K slices (3 pipeline stages, both operands K-major, so b's tile is read transposed) and stores it,
rounded once to bf16, if it is on or above the diagonal, then its transpose below. A row tile past the end
(13 tiles: the last block's second) reads zeros (TMA fills out-of-bounds rows) and stores nothing. The
stack's matrices run one after another on a one-dimensional grid: with a (tile, layer) grid the CTAs were
issued layer-fastest, and every product ran 1.4x slower than the same tiles in layer order.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from nanochat_jax.fused_matmul import on_hopper, plgpu, swizzled

TILE, TILE_K, STAGES = 128, 64, 3


def supported(m: int, k: int, dtype) -> bool:
    """On a Hopper, bf16, and (m, k) operands that whole tiles cover."""
    return on_hopper() and jnp.dtype(dtype) == jnp.bfloat16 and m % TILE == 0 and k % TILE_K == 0


def _blocks_per_column(n: int) -> list[int]:
    """Column tile c meets the upper triangle in row blocks R = 0 .. c // 2."""
    return [c // 2 + 1 for c in range(n)]


def block_of(t, n: int):
    """(R, c) of CTA t of one matrix with n tiles a side: column by column, rows within a column."""
    starts = [0]
    for count in _blocks_per_column(n)[:-1]:
        starts.append(starts[-1] + count)
    c, first = jnp.int32(0), jnp.int32(0)
    for k in range(1, n):  # unrolled: n compares of scalars
        hit = t >= starts[k]
        c = c + jnp.where(hit, 1, 0).astype(jnp.int32)
        first = jnp.where(hit, starts[k], first).astype(jnp.int32)
    return t - first, c


def _kernel(a_gmem, b_gmem, out_gmem, o_smem):
    wg = lax.axis_index("wg")
    n = a_gmem.shape[1] // TILE
    per_matrix = sum(_blocks_per_column(n))
    g = lax.axis_index("t")
    R, c = block_of(g % per_matrix, n)
    a, b, out = a_gmem.at[g // per_matrix], b_gmem.at[g // per_matrix], out_gmem.at[g // per_matrix]
    rt = 2 * R + wg  # this warpgroup's row tile

    def compute(pipeline):
        acc = pipeline(plgpu.layout_cast(jnp.zeros((TILE, TILE), jnp.float32), plgpu.Layout.WGMMA))
        tile = acc.astype(out.dtype)

        @pl.when(rt <= c)
        def _():
            o_smem[wg] = tile
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[wg], out.at[pl.ds(rt * TILE, TILE), pl.ds(c * TILE, TILE)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # before the buffer takes the transpose

        @pl.when(rt < c)
        def _():  # the transposed layout is a register shuffle; the transposed ref stores it as tile^T
            o_smem.at[wg].transpose((1, 0))[...] = plgpu.layout_cast(tile, plgpu.Layout.WGMMA_TRANSPOSED)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[wg], out.at[pl.ds(c * TILE, TILE), pl.ds(rt * TILE, TILE)])

        plgpu.wait_smem_to_gmem(0)

    def step(_, a_smem, b_smem, acc):
        def mma(acc_ref):
            plgpu.wgmma(acc_ref, a_smem.at[pl.ds(wg * TILE, TILE)], b_smem.transpose((1, 0)))
        return pl.run_state(mma)(plgpu.ACC.init(acc))

    plgpu.emit_pipeline_warp_specialized(
        step, grid=(a.shape[1] // TILE_K,),
        in_specs=[plgpu.BlockSpec((2 * TILE, TILE_K), lambda k: (R, k), transforms=swizzled()),
                  plgpu.BlockSpec((TILE, TILE_K), lambda k: (c, k), transforms=swizzled())],
        compute_context=compute, max_concurrent_steps=STAGES, num_compute_wgs=2, memory_registers=40,
        wg_axis="wg")(a, b)


@jax.jit
def _stack_gemm(a_LxMxK, b_LxMxK):
    L, M, _ = a_LxMxK.shape

    def kernel(a_gmem, b_gmem, out_gmem):
        pl.run_scoped(lambda o_smem: _kernel(a_gmem, b_gmem, out_gmem, o_smem),
                      plgpu.SMEM((2, TILE, TILE), a_LxMxK.dtype, transforms=swizzled()), collective_axes="wg")

    return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((L, M, M), a_LxMxK.dtype),
                        grid=(L * sum(_blocks_per_column(M // TILE)),), grid_names=("t",), num_threads=3,
                        thread_name="wg")(a_LxMxK, b_LxMxK)


def _upper_and_mirror(a, b):
    *lead, m, k = a.shape
    return _stack_gemm(a.reshape(-1, m, k), b.reshape(-1, m, k)).reshape(*lead, m, m)


def gram(x):
    """x @ x^T over the last two axes of a (..., m, k) stack, in x's dtype."""
    if supported(x.shape[-2], x.shape[-1], x.dtype):
        return _upper_and_mirror(x, x)
    return x @ jnp.swapaxes(x, -1, -2)


def symmetric_product(a, b):
    """a @ b over the last two axes of (..., m, m) stacks, in a's dtype, for a b the caller knows to be exactly
    symmetric (the kernel reads its rows as columns) and a symmetric a b (the kernel mirrors its upper
    triangle; XLA, where it runs, computes all of it). Only for a = b = Y is a b symmetric bitwise: for
    matrices that merely commute the mirror differs from XLA's product by rounding."""
    if supported(a.shape[-2], a.shape[-1], a.dtype):
        return _upper_and_mirror(a, b)
    return a @ b
