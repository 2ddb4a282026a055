"""Decode-shaped matmuls: (B, D) x (D, N) bf16 for the shapes of a d20 decode step, over a stack of
L=20 layers (so the weights do not sit in L2 between calls), each layer a static slice of the stack
as in the engine's unrolled decode. Prints GB/s of weight traffic, median of 50 calls, per variant:

  xla          XLA's default lowering, weight (in, out) as Flax keeps it
  xla-out-in   the same with the weight stored (out, in)
  cublas-pad16 rows padded to 16 and XLA's Triton GEMMs off (so cuBLAS runs it)
  pallas       the Pallas kernel below: one (bk, bn) weight tile per program, partial sums over K
  pallas-slice the same given w[i] rather than the stack and i (XLA copies the slice first)

Findings (bench/NOTES.md): (out, in) is the fastest for the block weights, so the engine stores them
that way (model.inference_params); the Pallas kernel is no better and stays here.

    python bench/gemv.py
"""
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

L = 20
SHAPES = ((1280, 3840), (1280, 1280), (1280, 5120), (5120, 1280), (1280, 65536))


def gemv(x_1xK, w, layer: int | None = None):
    """x (1, K) @ w (K, N), or @ w[layer] for a stacked w (L, K, N): each program reads one (bk, bn)
    tile of w (powers of two, as Triton wants), multiplies by its slice of x, sums the tile's rows in
    fp32; the K // bk partial rows are summed afterwards."""
    K, N = w.shape[-2:]
    bk, bn = next(b for b in (256, 128, 64) if K % b == 0), next(b for b in (128, 64) if N % b == 0)

    def kernel(x_ref, w_ref, o_ref):
        x = x_ref[...].astype(jnp.float32).reshape(bk, 1)
        o_ref[...] = jnp.sum(x * w_ref[...].astype(jnp.float32), axis=0).reshape(1, bn)

    w_spec = (pl.BlockSpec((bk, bn), lambda n, k: (k, n)) if layer is None
              else pl.BlockSpec((None, bk, bn), lambda n, k: (layer, k, n)))
    partial_sums = pl.pallas_call(
        kernel, grid=(N // bn, K // bk), in_specs=[pl.BlockSpec((1, bk), lambda n, k: (0, k)), w_spec],
        out_specs=pl.BlockSpec((1, bn), lambda n, k: (k, n)),
        out_shape=jax.ShapeDtypeStruct((K // bk, N), jnp.float32))(x_1xK, w)
    return partial_sums.sum(axis=0, keepdims=True).astype(x_1xK.dtype)


def bench(f, *args, n=50):
    f(*args).block_until_ready()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f(*args).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def layers(product):
    """sum over the stack of product(x, w, i), one static layer index at a time (an unrolled decode)."""
    return jax.jit(lambda x, w: sum(product(x, w, i)[:, :8].astype(jnp.float32).sum() for i in range(L)))


VARIANTS = {
    "xla": lambda: layers(lambda x, w, i: x @ w[i]),
    "xla-out-in": lambda: layers(lambda x, w, i: lax.dot_general(x, w[i], (((1,), (1,)), ((), ())))),
    "cublas-pad16": lambda: jax.jit(
        lambda x, w: sum((jnp.pad(x, ((0, 16 - x.shape[0]), (0, 0))) @ w[i])[:x.shape[0], :8].astype(jnp.float32).sum()
                         for i in range(L)), compiler_options={"xla_gpu_enable_triton_gemm": False}),
    "pallas": lambda: layers(lambda x, w, i: gemv(x, w, layer=i)),
    "pallas-slice": lambda: layers(lambda x, w, i: gemv(x, w[i])),  # does XLA copy the slice first?
}


def main():
    print(f"{'D':>6}{'N':>7}" + "".join(f"{v:>14}" for v in VARIANTS) + "   (GB/s of weights, B=1)")
    for D, N in SHAPES:
        k = jax.random.split(jax.random.key(0), 2)
        x = jax.random.normal(k[0], (1, D), jnp.bfloat16)
        w = jax.random.normal(k[1], (L, D, N), jnp.bfloat16)
        wt = jnp.swapaxes(w, 1, 2).copy()
        gb = L * D * N * 2 / 1e9
        row = []
        for name, make in VARIANTS.items():
            try:
                row.append(f"{gb / bench(make(), x, wt if name == 'xla-out-in' else w):>14.0f}")
            except Exception as e:  # a variant this GPU/jax cannot lower: say so, go on
                print(f"{name}: {type(e).__name__}: {str(e)[:300]}")
                row.append(f"{'failed':>14}")
        print(f"{D:>6}{N:>7}" + "".join(row))


if __name__ == "__main__":
    main()
