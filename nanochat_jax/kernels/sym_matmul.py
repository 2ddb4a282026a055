"""Muon's symmetric products: gram(x) = x x^T, and symmetric_square(y) = y y for an exactly symmetric y (then
y y = y y^T). Both are x x^T of one operand read by rows: an entry and its mirror are sums of the same
products, so the result is symmetric bitwise. On a Hopper GPU in bf16 a Mosaic GPU kernel computes only
the output tiles on and above the diagonal and writes each off-diagonal one twice, as itself and
transposed: 58% of the multiply-adds at d26's 1,664 (13 tiles a side), 60% at d20's 1,280. Elsewhere XLA
computes the whole product.

One CTA per block of 256 rows (row tiles 2R and 2R + 1) by one column tile c, for R <= c / 2: the blocks
that touch the upper triangle. Each of two compute warpgroups accumulates one 128 x 128 tile in fp32 over
64-wide K slices (3 pipeline stages; the column tile's rows are read transposed) and stores it,
rounded once to bf16, if it is on or above the diagonal, then its transpose below. A row tile past the end
(13 tiles: the last block's second) reads zeros (TMA fills out-of-bounds rows) and stores nothing. The
stack's matrices run one after another on a one-dimensional grid (a (tile, layer) grid issues the CTAs
layer-fastest, which shares no operand in L2).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from nanochat_jax import kernels
from nanochat_jax.kernels import mosaic_backend as plgpu
from nanochat_jax.kernels.relu2_mlp import swizzled

# ----------------------------------------------------------------------------------------------
# The plain-JAX functions


def reference_gram(x_MxK):
    return x_MxK @ jnp.swapaxes(x_MxK, -1, -2)


def reference_square(y_MxM):
    return y_MxM @ y_MxM


# ----------------------------------------------------------------------------------------------
# The Mosaic GPU kernel

TILE, TILE_K, STAGES = 128, 64, 3


def supported(m: int, k: int, dtype) -> bool:
    """On a Hopper, bf16, and (m, k) operands that whole tiles cover."""
    return kernels.available("mosaic") and jnp.dtype(dtype) == jnp.bfloat16 and m % TILE == 0 and k % TILE_K == 0


def _blocks_per_column(n: int) -> list[int]:
    """Column tile c meets the upper triangle in row blocks R = 0 .. c // 2."""
    return [c // 2 + 1 for c in range(n)]


def blocks_per_matrix(n: int) -> int:
    return sum(_blocks_per_column(n))


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


def _kernel(x_gmem, out_gmem, o_smem):
    wg = lax.axis_index("wg")
    n = x_gmem.shape[1] // TILE
    layer, t = divmod(lax.axis_index("t"), blocks_per_matrix(n))
    R, c = block_of(t, n)
    x, out = x_gmem.at[layer], out_gmem.at[layer]
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

    def step(_, rows_smem, cols_smem, acc):
        def mma(acc_ref):
            plgpu.wgmma(acc_ref, rows_smem.at[pl.ds(wg * TILE, TILE)], cols_smem.transpose((1, 0)))
        return pl.run_state(mma)(plgpu.ACC.init(acc))

    plgpu.emit_pipeline_warp_specialized(
        step, grid=(x.shape[1] // TILE_K,),
        in_specs=[plgpu.BlockSpec((2 * TILE, TILE_K), lambda k: (R, k), transforms=swizzled()),
                  plgpu.BlockSpec((TILE, TILE_K), lambda k: (c, k), transforms=swizzled())],
        compute_context=compute, max_concurrent_steps=STAGES, num_compute_wgs=2, memory_registers=40,
        wg_axis="wg")(x, x)


@jax.jit
def _stack_gram(x_LxMxK):
    L, M, _ = x_LxMxK.shape

    def kernel(x_gmem, out_gmem):
        pl.run_scoped(lambda o_smem: _kernel(x_gmem, out_gmem, o_smem),
                      plgpu.SMEM((2, TILE, TILE), x_LxMxK.dtype, transforms=swizzled()), collective_axes="wg")

    return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((L, M, M), x_LxMxK.dtype),
                        grid=(L * blocks_per_matrix(M // TILE),), grid_names=("t",), num_threads=3,
                        thread_name="wg")(x_LxMxK)


def _kernel_gram(x_MxK, choice):
    """x x^T by the kernel where the switch and the shapes allow (a stack, batched over the leading axes),
    else None."""
    *lead, m, k = x_MxK.shape
    if not (kernels.use(choice, "sym_matmul") and supported(m, k, x_MxK.dtype)):
        return None
    return _stack_gram(x_MxK.reshape(-1, m, k)).reshape(*lead, m, m)


# ----------------------------------------------------------------------------------------------


def gram(x_MxK, choice: str = "auto"):
    """x @ x^T over the last two axes of a (..., M, K) stack, in x's dtype."""
    out = _kernel_gram(x_MxK, choice)
    return reference_gram(x_MxK) if out is None else out


def symmetric_square(y_MxM, choice: str = "auto"):
    """y @ y over the last two axes of a (..., M, M) stack of exactly symmetric matrices, in y's dtype."""
    out = _kernel_gram(y_MxM, choice)
    return reference_square(y_MxM) if out is None else out
