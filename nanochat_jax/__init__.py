"""nanochat in JAX/Flax.

Array names end in their shape, one letter an axis (x_BxTxD: rows x positions x d_model), each letter with
one meaning across the package:

    A  micro-batches of a training step        L  layers
    B  rows (sequences) of a batch             D  d_model
    T  positions of a row                      F  the MLP's width, 4 D
    S  slots of the KV cache                   V  vocabulary
    R  rows of a matrix the kernels flatten (B T, or any rows)
    H  query heads                             E  head dim
    G  kv heads (GQA groups of query heads)    P  RoPE's rotation pairs, E / 2
    N  the heads of the fused qkv GEMM output, H + 2 G
    M, K  a matrix's rows and columns (Muon's, M <= K; K is also a GEMM's contracted axis)
    C  a GEMM's output columns

"Kernel" means a hand-written GPU program (nanochat_jax/kernels/); layer matrices are weights, whose
leaves Flax names 'kernel' in the params tree.
"""


def __getattr__(name):
    # `from nanochat_jax import load_model` without importing jax for every `import nanochat_jax`.
    if name == "load_model":
        from nanochat_jax.engine import load_model
        return load_model
    raise AttributeError(f"module 'nanochat_jax' has no attribute {name!r}")
