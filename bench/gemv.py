"""Decode-shaped matmuls: (B, D) x (D, N) bf16 with the weight stored (in, out) as Flax keeps it, or
(out, in). Prints GB/s of weight traffic (median of 50 calls) for the shapes of a d20 decode step.

    python bench/gemv.py
"""
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax


def bench(f, *args, n=50):
    f(*args).block_until_ready()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f(*args).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    L = 20  # a layer stack, so the weights do not sit in L2 between calls
    print(f"{'B':>4}{'D':>6}{'N':>7}{'(in,out) GB/s':>15}{'(out,in) GB/s':>15}")
    for B in (1, 32):
        for D, N in ((1280, 3840), (1280, 5120), (5120, 1280), (1280, 65536)):
            k = jax.random.split(jax.random.key(0), 2)
            x = jax.random.normal(k[0], (B, D), jnp.bfloat16)
            w = jax.random.normal(k[1], (L, D, N), jnp.bfloat16)
            wt = jnp.swapaxes(w, 1, 2).copy()
            f_in_out = jax.jit(lambda x, w: lax.fori_loop(0, L, lambda i, acc: acc + (x @ w[i])[:, :8].sum(),
                                                          jnp.zeros((), jnp.bfloat16)))
            f_out_in = jax.jit(lambda x, w: lax.fori_loop(0, L, lambda i, acc: acc + lax.dot_general(
                x, w[i], (((1,), (1,)), ((), ())))[:, :8].sum(), jnp.zeros((), jnp.bfloat16)))
            gb = L * D * N * 2 / 1e9
            print(f"{B:>4}{D:>6}{N:>7}{gb / bench(f_in_out, x, w):>15.0f}{gb / bench(f_out_in, x, wt):>15.0f}")


if __name__ == "__main__":
    main()
