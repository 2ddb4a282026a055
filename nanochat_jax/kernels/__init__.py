"""The GPU kernels: each module holds the plain-JAX function it replaces first, then the kernel, then the
one function the model calls, which picks between them. One switch, `ModelConfig.kernels`, governs them all:

    xla     no kernel anywhere in the step: XLA compiles the plain-JAX functions
    auto    each kernel where its backend runs on this machine (`available`), the plain function elsewhere
    pallas  every kernel; off a GPU Pallas interprets the Triton ones (the tests), the Mosaic ones need a Hopper

    module         replaces                                               backend
    rope_qk_norm   q, k = norm(rope(q)), norm(rope(k)) after the qkv GEMM   Pallas Triton (NVIDIA GPUs)
    add_norm       the residual add x + y and the norm of the sum           Pallas Triton
    cross_entropy  the loss's pass over each chunk of logits                Pallas Triton
    relu2_mlp      relu(h @ w_fc)^2 and its gradient, in the GEMMs' epilogue Pallas Mosaic GPU (Hopper)
    sym_matmul     Muon's x @ x^T, upper triangle only                      Pallas Mosaic GPU (Hopper)

A kernel also runs only on shapes and dtypes it tiles (each module's `supported`); elsewhere its plain
function does, so every choice computes the same math. "Kernel" in this package means such a hand-written
GPU program; a layer's weight matrix is a weight (Flax names its leaf 'kernel', which the params keep).
The modules import nanochat_jax.model for the math they replace, and model imports them: both only read
each other's names at call time.
"""
from __future__ import annotations

from nanochat_jax.config import ConfigError

try:
    from jax.experimental.pallas import triton as triton_backend
except ImportError:  # jax 0.11 deprecates Pallas' Triton backend; where it is gone 'auto' leaves these to XLA
    triton_backend = None
try:
    from jax.experimental.pallas import mosaic_gpu as mosaic_backend
except ImportError:
    mosaic_backend = None

CHOICES = ("auto", "pallas", "xla")
BACKEND = {"rope_qk_norm": "triton", "add_norm": "triton", "cross_entropy": "triton",
           "relu2_mlp": "mosaic", "sym_matmul": "mosaic"}


def compute_capability() -> float | None:
    """The first device's NVIDIA compute capability (9.0 on an H100), None off NVIDIA GPUs."""
    from nanochat_jax.sharding import gpu_compute_capability
    return gpu_compute_capability()


def interpret() -> bool:
    """Off a GPU, Pallas interprets a kernel instead of compiling it."""
    import jax
    return jax.default_backend() != "gpu"


def available(backend: str) -> bool:
    """Whether this machine compiles kernels of `backend`: Triton on any NVIDIA GPU, Mosaic GPU on a Hopper."""
    cc = compute_capability()
    if backend == "triton":
        return triton_backend is not None and cc is not None
    return mosaic_backend is not None and cc is not None and int(cc) == 9


def check(choice: str) -> None:
    if choice not in CHOICES:
        raise ConfigError(f"config.model.kernels must be one of {CHOICES}, got {choice!r}")
    if choice == "pallas" and triton_backend is None:
        raise ConfigError("config.model.kernels='pallas' needs Pallas' Triton backend, which this jax lacks; "
                          "use 'auto' (each kernel where it runs) or 'xla'")


def use(choice: str, name: str) -> bool:
    """Whether the switch's value `choice` turns kernel `name` on (its module still checks its shapes)."""
    if choice == "auto":
        return available(BACKEND[name])
    return choice == "pallas"



def triton_call(kernel, grid, in_specs, out_specs, out_shape, num_warps=4, num_stages=1):
    """pl.pallas_call for the Triton backend: compiled on a GPU, interpreted elsewhere."""
    from jax.experimental import pallas as pl
    off_gpu = interpret()
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          interpret=off_gpu, compiler_params=None if off_gpu else
                          triton_backend.CompilerParams(num_warps=num_warps, num_stages=num_stages))
