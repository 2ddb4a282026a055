"""One-row matrix products for decoding: x (1, K) @ w (K, N) as a Pallas kernel on GPU.

XLA lowers a one-row bf16 product to a reduction fusion that reads the weights at 0.4–0.9 TB/s of
the H100's ~3 TB/s (bench/gemv.py); a decode step of one sample is little else. Here each program
reads one (bk, bn) tile of w, multiplies it by its slice of x and sums over the tile's rows in fp32;
the K // bk partial rows are summed afterwards. Many small independent tiles keep enough loads in
flight to stream the weights. A stacked (L, K, N) weight is read in place at a static `layer`
(slicing it first would copy the layer).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def tile_sizes(K: int, N: int) -> tuple[int, int] | None:
    """(bk, bn) powers of two dividing K and N (Triton blocks are powers of two), or None."""
    bk = next((b for b in (256, 128, 64) if K % b == 0), None)
    bn = next((b for b in (128, 64) if N % b == 0), None)
    return (bk, bn) if bk and bn else None


@functools.partial(jax.jit, static_argnames=("layer", "interpret"))
def gemv(x_1xK, w, layer: int | None = None, interpret: bool = False):
    """x (1, K) @ w (K, N), or @ w[layer] for a stacked w (L, K, N); fp32 accumulation, x's dtype out."""
    K, N = w.shape[-2:]
    bk, bn = tile_sizes(K, N)

    def kernel(x_ref, w_ref, o_ref):
        x = x_ref[...].astype(jnp.float32).reshape(bk, 1)
        o_ref[...] = jnp.sum(x * w_ref[...].astype(jnp.float32), axis=0).reshape(1, bn)

    if layer is None:
        w_spec = pl.BlockSpec((bk, bn), lambda n, k: (k, n))
    else:
        w_spec = pl.BlockSpec((None, bk, bn), lambda n, k: (layer, k, n))
    partial_sums = pl.pallas_call(
        kernel, grid=(N // bn, K // bk),
        in_specs=[pl.BlockSpec((1, bk), lambda n, k: (0, k)), w_spec],
        out_specs=pl.BlockSpec((1, bn), lambda n, k: (k, n)),
        out_shape=jax.ShapeDtypeStruct((K // bk, N), jnp.float32), interpret=interpret)(x_1xK, w)
    return partial_sums.sum(axis=0, keepdims=True).astype(x_1xK.dtype)
