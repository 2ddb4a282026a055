"""The XLA settings a training process starts with, set before jax starts its backend; a value the user
set (the variable, or the flag inside XLA_FLAGS) wins. Figures: bench/NOTES.md."""
from __future__ import annotations

import os

# Training owns the GPU: JAX's allocator may take 90% of its memory (JAX's default is 75%). XLA plans its
# rematerialisation within that limit, so it recomputes fewer activations: d20 at device batch 32 on an
# H100 479.6 ms/step at 66.7 GiB peak, against 484.6 ms at 56.0 GiB.
MEM_FRACTION = "0.9"

# On a mesh, XLA combines the gradients' all-reduces (and Muon's all-gathers of its updates) into
# collectives of up to 256 MB, not its default ~30 MB: fewer, larger NCCL calls. d20 on 4 GPUs, data
# parallel: 420.9-423.6 ms a step against 425.6-427.4. No effect on one device.
XLA_FLAGS = {
    "--xla_gpu_all_reduce_combine_threshold_bytes": str(256 << 20),
    "--xla_gpu_all_gather_combine_threshold_bytes": str(256 << 20),
}


def set_training_defaults() -> None:
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", MEM_FRACTION)
    flags = os.environ.get("XLA_FLAGS", "")
    missing = [f"{name}={value}" for name, value in XLA_FLAGS.items() if name not in flags]
    os.environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()
