"""The MLP's two GEMMs that touch ReLU², with the element-wise work in their epilogues, as Mosaic GPU
(Hopper wgmma) kernels:

    relu2_matmul(h, w_fc)              = relu(h @ w_fc)²           (the forward's up-projection)
    relu2_grad_matmul(g, w_proj^T, a)  = (g @ w_proj^T) 2 sqrt(a)  (the backward into the up-projection)

With cuBLAS the GEMM writes its (rows, 4 D) result and XLA reads it back for the element-wise step: on
d20 each such pass is ~0.4 ms a layer next to a ~1.2 ms GEMM. The backward needs only a = relu(u)²
(2 relu(u) = 2 sqrt(a)), so the forward saves a and never writes u.

One CTA per 128 x 256 output tile: a memory warpgroup streams 64-wide K slices of both operands into
shared memory (3 stages), two compute warpgroups each accumulate a 128 x 128 half in fp32, apply the
epilogue in fp32 and store through shared memory, rounded once to bf16. The backward's a tile is
fetched into the output's staging buffer while the main loop runs. Hopper only: `supported` says where
these run, and the model uses cuBLAS + XLA elsewhere.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from nanochat_jax.sharding import gpu_compute_capability, per_device, row_shards

try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # a jax without Pallas' Mosaic GPU backend
    plgpu = None

TILE_M, TILE_N, TILE_K, STAGES = 128, 128, 64, 3  # TILE_N per compute warpgroup; two of them per CTA
# Row tiles that walk the column tiles together. Row by row, the CTAs in flight spanned ~5 row tiles and
# every column, so all of w (d26: 22 MB) was read again every 5 row tiles, from HBM where L2 had let it
# go. d26's shapes, one H100: forward 1.21 -> 1.17 ms, backward 1.41 -> 1.30 ms; d20's (13 MB): no change
GROUP_ROWS = 16


def on_hopper() -> bool:
    """A Hopper GPU (compute capability 9.x) and a jax with Pallas' Mosaic GPU backend."""
    cc = gpu_compute_capability()
    return plgpu is not None and cc is not None and int(cc) == 9


def supported(rows: int, d_in: int, d_out: int, dtype) -> bool:
    """On a Hopper, bf16, and shapes the tiles divide on each device's rows (either GEMM: the backward's is
    (rows, d_out) @ (d_out, d_in) with the same tiles)."""
    if not on_hopper() or jnp.dtype(dtype) != jnp.bfloat16:
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


# jitted, so that every layer's call site shares one lowering (each Mosaic GPU lowering compiles the
# kernel: d20's step took 48 s to compile with its 40 call sites lowered one by one, 30 s like this)
@functools.partial(jax.jit, static_argnums=0)
def _gemm(epilogue, x_MxK, w_KxN, a_MxN=None):
    (M, _), N = x_MxK.shape, w_KxN.shape[1]
    inputs = (x_MxK, w_KxN) if a_MxN is None else (x_MxK, w_KxN, a_MxN)

    def kernel(*refs):
        x_gmem, w_gmem, a_gmem, out_gmem = refs if a_MxN is not None else (refs[0], refs[1], None, refs[2])
        scratch = [plgpu.SMEM((2, TILE_M, TILE_N), x_MxK.dtype, transforms=swizzled())]  # shared by the WGs
        scratch += [plgpu.Barrier(num_barriers=2)] if a_MxN is not None else []
        pl.run_scoped(lambda out_smem, a_ready=None: _kernel(x_gmem, w_gmem, a_gmem, out_gmem, out_smem, a_ready,
                                                             epilogue=epilogue), *scratch, collective_axes="wg")

    # one grid axis, CTAs issued in its order; _tile_of maps each to its tile
    return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((M, N), x_MxK.dtype),
                        grid=((M // TILE_M) * (N // (2 * TILE_N)),), grid_names=("t",), num_threads=3,
                        thread_name="wg")(*inputs)


@per_device(in_dims=(0, None), out_dims=0)
def relu2_matmul(x_MxK, w_KxN):
    """relu(x @ w)² in x's dtype (bf16), accumulated and squared in fp32. Only where `supported`."""
    return _gemm(_relu2, x_MxK, w_KxN.astype(x_MxK.dtype))


@per_device(in_dims=(0, None, 0), out_dims=0)
def relu2_grad_matmul(g_MxK, w_KxN, a_MxN):
    """(g @ w) 2 sqrt(a) in g's dtype: the cotangent of u where a = relu(u)², from that of a (g @ w)."""
    return _gemm(_times_2_sqrt, g_MxK, w_KxN.astype(g_MxK.dtype), a_MxN)
