"""The MLP (SPEC §2): relu(h @ w_fc)² @ w_proj, and the Mosaic GPU kernels that put ReLU² in the epilogues of
the two GEMMs that touch it (Hopper wgmma):

    relu2_matmul(h, w_fc)              = relu(h @ w_fc)²           (the forward's up-projection)
    relu2_grad_matmul(g, w_proj^T, a)  = (g @ w_proj^T) 2 sqrt(a)  (the backward into the up-projection)

With cuBLAS the GEMM writes its (rows, F) result and XLA reads it back for the element-wise step, a pass a
third as long as the GEMM. The backward needs only a = relu(u)² (2 relu(u) = 2 sqrt(a)), so the forward
saves a and never writes u.

One CTA per 128 x 256 output tile: a memory warpgroup streams 64-wide K slices of both operands into
shared memory (3 stages), two compute warpgroups each accumulate a 128 x 128 half in fp32, apply the
epilogue in fp32 and store through shared memory, rounded once to bf16. The backward's a tile is
fetched into the output's staging buffer while the main loop runs.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from nanochat_jax import kernels
from nanochat_jax import model as M
from nanochat_jax.kernels import mosaic_backend as plgpu
from nanochat_jax.sharding import per_device, row_shards

# ----------------------------------------------------------------------------------------------
# The plain-JAX function


# Keeps only its compute-dtype input for the backward pass.
@functools.partial(jax.checkpoint, prevent_cse=False)
def relu_squared(u):
    return jnp.square(jax.nn.relu(u.astype(jnp.promote_types(u.dtype, jnp.float32)))).astype(u.dtype)


def reference(h_BxTxD, w_fc, w_proj, dtype, out_in: bool = False):
    return M.matmul(relu_squared(M.matmul(h_BxTxD, w_fc, dtype, out_in)), w_proj, dtype, out_in)


# ----------------------------------------------------------------------------------------------
# The same product with the element-wise work in the GEMMs, given those GEMMs (the kernels below)


def _dot(x, y, contract):  # a GEMM with x's dtype as output, as M.matmul
    return lax.dot_general(x, y, (contract, ((), ())), preferred_element_type=x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def relu2_mlp(h_RxD, w_fc_DxF, w_proj_FxD, up: Callable, down_grad: Callable):
    """relu(h @ w_fc)² @ w_proj, where up(h, w_fc) = relu(h @ w_fc)² and down_grad(g, w_proj^T, a) =
    (g @ w_proj^T) 2 sqrt(a). The forward keeps a = relu(u)², not u: the backward needs only a
    (d relu(u)² / du = 2 relu(u) = 2 sqrt(a))."""
    return _dot(up(h_RxD, w_fc_DxF), w_proj_FxD, ((1,), (0,)))


def _relu2_mlp_fwd(h, w_fc, w_proj, up, down_grad):
    a = up(h, w_fc)
    return _dot(a, w_proj, ((1,), (0,))), (h, w_fc, w_proj, a)


def _relu2_mlp_bwd(up, down_grad, residuals, g_RxD):
    h, w_fc, w_proj, a = residuals
    du = down_grad(g_RxD, w_proj.T, a)
    return _dot(du, w_fc, ((1,), (1,))), _dot(h, du, ((0,), (0,))), _dot(a, g_RxD, ((0,), (0,)))


relu2_mlp.defvjp(_relu2_mlp_fwd, _relu2_mlp_bwd)


# ----------------------------------------------------------------------------------------------
# The Mosaic GPU kernels

TILE_M, TILE_N, TILE_K, STAGES = 128, 128, 64, 3  # TILE_N per compute warpgroup; two of them per CTA
# Row tiles that walk the column tiles together: row by row, the CTAs in flight spanned a few row tiles and
# every column, so all of w was read again from HBM every few row tiles once it outgrew L2 (d26)
GROUP_ROWS = 16


def supported(rows: int, d_in: int, d_out: int, dtype) -> bool:
    """On a Hopper, bf16, and shapes the tiles divide on each device's rows (either GEMM: the backward's is
    (rows, d_out) @ (d_out, d_in) with the same tiles)."""
    if not kernels.available("mosaic") or jnp.dtype(dtype) != jnp.bfloat16:
        return False
    return rows % (TILE_M * row_shards()) == 0 and d_in % TILE_K == 0 and d_out % (2 * TILE_N) == 0


def swizzled():
    return plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)  # 64 bf16 = one 128-byte row


def _relu2(acc, _):
    r = jnp.maximum(acc, 0.0)
    return r * r


def _times_2_sqrt(acc, a):
    # 2 sqrt(a) as 2 a rsqrt(a) (Mosaic GPU lowers rsqrt); the floor keeps a = 0 at 0, not 0 * inf
    return acc * (2.0 * a * lax.rsqrt(jnp.maximum(a, 1e-30)))


def _load(ref, layout):
    try:  # jax >= 0.11 takes the index through ref.at[...] (passing it as well is deprecated there)
        return plgpu.load(ref, layout=layout)
    except TypeError:  # jax 0.10 requires the index argument
        return plgpu.load(ref, (), layout=layout)


def _tile_of(t, m_tiles, n_tiles, group):
    """Output tile (m, n) of CTA t: groups of `group` row tiles (fewer in the last) walk every column
    tile, rows fastest, so the CTAs in flight share a few row blocks of x and column blocks of w in L2."""
    first = t // (group * n_tiles) * group
    size, r = jnp.minimum(m_tiles - first, group), t % (group * n_tiles)
    return first + r % size, r // size


def _kernel(x_gmem, w_gmem, a_gmem, out_gmem, out_smem, a_ready, *, epilogue):
    wg = lax.axis_index("wg")
    m, n = _tile_of(lax.axis_index("t"), x_gmem.shape[0] // TILE_M, w_gmem.shape[1] // (2 * TILE_N), GROUP_ROWS)
    tile = (pl.ds(m * TILE_M, TILE_M), pl.ds((2 * n + wg) * TILE_N, TILE_N))

    def compute(pipeline):  # each compute warpgroup: its accumulator, then the epilogue on it
        if a_gmem is not None:  # fetch a's tile during the main loop
            plgpu.copy_gmem_to_smem(a_gmem.at[tile], out_smem.at[wg], a_ready.at[wg])
        acc = pipeline(plgpu.layout_cast(jnp.zeros((TILE_M, TILE_N), jnp.float32), plgpu.Layout.WGMMA))
        a = None
        if a_gmem is not None:
            plgpu.barrier_wait(a_ready.at[wg])
            a = _load(out_smem.at[wg], plgpu.Layout.WGMMA).astype(jnp.float32)
        out_smem[wg] = epilogue(acc, a).astype(out_gmem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[tile])
        plgpu.wait_smem_to_gmem(0)

    def step(_, x_smem, w_smem, acc):
        def mma(acc_ref):
            plgpu.wgmma(acc_ref, x_smem, w_smem.at[:, pl.ds(wg * TILE_N, TILE_N)])
        return pl.run_state(mma)(plgpu.ACC.init(acc))

    plgpu.emit_pipeline_warp_specialized(
        step, grid=(x_gmem.shape[1] // TILE_K,),
        in_specs=[plgpu.BlockSpec((TILE_M, TILE_K), lambda k: (m, k), transforms=swizzled()),
                  plgpu.BlockSpec((TILE_K, 2 * TILE_N), lambda k: (k, n), transforms=swizzled())],
        compute_context=compute, max_concurrent_steps=STAGES, num_compute_wgs=2, memory_registers=40,
        wg_axis="wg")(x_gmem, w_gmem)


# jitted, so that every layer's call site shares one lowering (each Mosaic GPU lowering compiles the kernel)
@functools.partial(jax.jit, static_argnums=0)
def _gemm(epilogue, x_RxK, w_KxC, a_RxC=None):
    (R, _), C = x_RxK.shape, w_KxC.shape[1]
    inputs = (x_RxK, w_KxC) if a_RxC is None else (x_RxK, w_KxC, a_RxC)

    def kernel(*refs):
        x_gmem, w_gmem, a_gmem, out_gmem = refs if a_RxC is not None else (refs[0], refs[1], None, refs[2])
        scratch = [plgpu.SMEM((2, TILE_M, TILE_N), x_RxK.dtype, transforms=swizzled())]  # shared by the WGs
        scratch += [plgpu.Barrier(num_barriers=2)] if a_RxC is not None else []
        pl.run_scoped(lambda out_smem, a_ready=None: _kernel(x_gmem, w_gmem, a_gmem, out_gmem, out_smem, a_ready,
                                                             epilogue=epilogue), *scratch, collective_axes="wg")

    # one grid axis, CTAs issued in its order; _tile_of maps each to its tile
    return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((R, C), x_RxK.dtype),
                        grid=((R // TILE_M) * (C // (2 * TILE_N)),), grid_names=("t",), num_threads=3,
                        thread_name="wg")(*inputs)


@per_device(in_dims=(0, None), out_dims=0)
def relu2_matmul(x_RxD, w_DxF):
    """relu(x @ w)² in x's dtype (bf16), accumulated and squared in fp32. Only where `supported`."""
    return _gemm(_relu2, x_RxD, w_DxF.astype(x_RxD.dtype))


@per_device(in_dims=(0, None, 0), out_dims=0)
def relu2_grad_matmul(g_RxD, w_DxF, a_RxF):
    """(g @ w) 2 sqrt(a) in g's dtype: the cotangent of u where a = relu(u)², from that of a (g @ w)."""
    return _gemm(_times_2_sqrt, g_RxD, w_DxF.astype(g_RxD.dtype), a_RxF)


# ----------------------------------------------------------------------------------------------


def mlp(h_BxTxD, w_fc, w_proj, dtype, choice: str, out_in: bool = False):
    """relu(h @ w_fc)² @ w_proj in `dtype` (weights (in, out), or (out, in) with out_in)."""
    R, D = math.prod(h_BxTxD.shape[:-1]), h_BxTxD.shape[-1]
    if kernels.use(choice, "relu2_mlp") and not out_in and supported(R, D, w_fc.shape[1], dtype):
        y = relu2_mlp(h_BxTxD.reshape(R, D).astype(dtype), w_fc.astype(dtype), w_proj.astype(dtype),
                      relu2_matmul, relu2_grad_matmul)
        return y.reshape(h_BxTxD.shape)
    return reference(h_BxTxD, w_fc, w_proj, dtype, out_in)
