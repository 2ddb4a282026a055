"""The residual add and the norm that reads it: s = x + y (rounded to x's dtype) and rms_norm(s).

Every add in the model is followed by a norm of the sum (the next sublayer's input, or the final norm),
so the residual stream travels as `Residual`, the stream with its norm: `x + y` computes both, and
norm(x) reads the second. XLA takes two passes each way for the pair (forward: the add with the norm's
statistics, then the scaling; backward: the statistic, then d(x)), eleven reads and writes of a (B, T, D)
array; the Triton kernel takes one each way, eight.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from nanochat_jax import kernels
from nanochat_jax import model as M
from nanochat_jax.sharding import per_device, row_shards

# ----------------------------------------------------------------------------------------------
# The plain-JAX function


def reference(x, y):
    s = x + y.astype(x.dtype)
    return s, M.rms_norm(s)


# ----------------------------------------------------------------------------------------------
# The Triton kernel: one pass each way

NORM_ROWS = 2  # rows per program (2 warps); each row is held whole, in column tiles, between the two steps


def _norm_tile(d_model: int) -> int:
    """Columns per tile: the largest power of two <= 128 dividing d_model (Triton tiles are powers of two)."""
    return math.gcd(d_model, 128)


def supported(n_rows: int, d_model: int) -> bool:
    return _norm_tile(d_model) >= 16 and n_rows % (NORM_ROWS * row_shards()) == 0


def _fwd_kernel(x_ref, y_ref, s_ref, h_ref, r_ref, *, tile, eps):
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


def _bwd_kernel(s_ref, r_ref, dh_ref, ds_ref, dx_ref, *, tile):
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
    """One program per NORM_ROWS rows of (R, D) and (R,) arrays."""
    R, D = args[0].shape
    spec = lambda a: pl.BlockSpec((NORM_ROWS, D), lambda i: (i, 0)) if a.ndim == 2 else \
        pl.BlockSpec((NORM_ROWS,), lambda i: (i,))
    return kernels.triton_call(kernel, (R // NORM_ROWS,), [spec(a) for a in args], [spec(o) for o in out_shape],
                               out_shape, num_warps=2)(*args)


@per_device(in_dims=(0, 0), out_dims=0)
def _forward(x_RxD, y_RxD):
    R, D = x_RxD.shape
    kernel = functools.partial(_fwd_kernel, tile=_norm_tile(D), eps=float(jnp.finfo(x_RxD.dtype).eps))
    return _norm_call(kernel, (x_RxD, y_RxD), [jax.ShapeDtypeStruct((R, D), x_RxD.dtype)] * 2 +
                      [jax.ShapeDtypeStruct((R,), jnp.float32)])


@per_device(in_dims=(0, 0, 0, 0), out_dims=0)
def _backward(s_RxD, r_R, dh_RxD, ds_RxD):
    kernel = functools.partial(_bwd_kernel, tile=_norm_tile(s_RxD.shape[1]))
    return _norm_call(kernel, (s_RxD, r_R, dh_RxD, ds_RxD), [jax.ShapeDtypeStruct(s_RxD.shape, s_RxD.dtype)])[0]


@jax.custom_vjp
def _add_rms_norm(x_RxD, y_RxD):
    return _add_rms_norm_fwd(x_RxD, y_RxD)[0]


def _add_rms_norm_fwd(x_RxD, y_RxD):
    s, h, r = _forward(x_RxD, y_RxD)
    return (s, h), (s, r)


def _add_rms_norm_bwd(res, cotangents):
    s, r = res
    ds, dh = cotangents
    dx = _backward(s, r, dh, ds)
    return dx, dx  # s = x + y


_add_rms_norm.defvjp(_add_rms_norm_fwd, _add_rms_norm_bwd)


def fused(x_BxTxD, y_BxTxD):
    """`reference` as one kernel each way."""
    shape = x_BxTxD.shape
    s, h = _add_rms_norm(x_BxTxD.reshape(-1, shape[-1]), y_BxTxD.astype(x_BxTxD.dtype).reshape(-1, shape[-1]))
    return s.reshape(shape), h.reshape(shape)


# ----------------------------------------------------------------------------------------------


def add_rms_norm(x, y, choice: str):
    """(x + y, rms_norm(x + y)), the sum in x's dtype."""
    if kernels.use(choice, "add_norm") and supported(math.prod(x.shape[:-1]), x.shape[-1]):
        return fused(x, y)
    return reference(x, y)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["x", "norm"], meta_fields=["choice"])
@dataclasses.dataclass(frozen=True)
class Residual:
    """The residual stream x and rms_norm(x): `stream + y` is the stream x + y with its norm."""
    x: jax.Array
    norm: jax.Array
    choice: str  # the kernels switch

    @classmethod
    def of(cls, x, choice: str) -> "Residual":
        return cls(x, M.rms_norm(x), choice)

    def __add__(self, y) -> "Residual":
        return Residual(*add_rms_norm(self.x, y, self.choice), self.choice)
