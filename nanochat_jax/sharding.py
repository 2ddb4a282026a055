"""The device mesh and how arrays are laid out on it: one code path for 1, 8 fake and 8 real devices.

Mesh axes: `data` (pure data parallelism) x `fsdp` (data parallelism whose params and optimizer
state are also split ZeRO-3 style). The batch is split over both axes; every param / optimizer-state
leaf is split over `fsdp` along one dimension chosen from its shape alone, so params and their Adam
moments / Muon momenta always share a layout.
"""
from __future__ import annotations

import functools
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nanochat_jax.config import ConfigError

log = logging.getLogger(__name__)
BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed() -> None:
    """Join a multi-host run when the launcher says so (see README); a no-op on one host.
    JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID name the run explicitly; with
    NANOCHAT_DISTRIBUTED=1 alone, jax detects SLURM / Open MPI / Kubernetes by itself."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("NANOCHAT_DISTRIBUTED") == "1":
        if not jax.distributed.is_initialized():
            n, i = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
            jax.distributed.initialize(num_processes=int(n) if n else None, process_id=int(i) if i else None)
            log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    fsdp = n if mesh_cfg.fsdp == -1 else mesh_cfg.fsdp
    data = n // fsdp if mesh_cfg.data == -1 else mesh_cfg.data
    if data * fsdp != n:
        raise ConfigError(f"config.mesh: data={mesh_cfg.data} x fsdp={mesh_cfg.fsdp} does not cover the {n} devices "
                          f"(use -1 for 'all the rest')")
    try:  # topology-aware order on GPUs/TPUs; plain order for fake CPU devices
        grid = mesh_utils.create_device_mesh((data, fsdp), devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.array(devices).reshape(data, fsdp)
    return Mesh(grid, BATCH_AXES)


def spec_for_shape(shape: tuple[int, ...], fsdp: int) -> P:
    """Where a param-like leaf is split over `fsdp`: a layer stack (L, in, out) along L when L divides
    (each device then owns whole matrices, so Muon orthogonalises only its own), otherwise along the
    largest dimension that divides; replicated when nothing divides or there is no fsdp axis."""
    if fsdp == 1 or len(shape) == 0:
        return P()
    if len(shape) == 3 and shape[0] % fsdp == 0:
        return P("fsdp", None, None)
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % fsdp == 0:
            return P(*[("fsdp" if i == d else None) for i in range(len(shape))])
    return P()


def tree_shardings(abstract_tree, mesh: Mesh):
    """NamedSharding for every leaf of a tree of arrays / ShapeDtypeStructs (params, opt state, ...)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, spec_for_shape(tuple(x.shape), fsdp)), abstract_tree)


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
    """Split dimension `batch_dim` of an ndim-array over every device; the rest replicated."""
    spec = [None] * ndim
    spec[batch_dim] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def traced_on(mesh: Mesh, fn):
    """fn, traced with `mesh` as the ambient mesh, for jax.jit: the model's Pallas kernels read it to run
    on each device's rows (XLA cannot split a kernel; it would gather the whole batch onto every device)."""
    def on_mesh(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)
    return on_mesh


def gpu_compute_capability() -> float | None:
    """The first device's NVIDIA compute capability (9.0 on an H100), None off NVIDIA GPUs."""
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return None
    try:
        return float(getattr(dev, "compute_capability", ""))
    except ValueError:  # not an NVIDIA device
        return None


def _row_axes() -> tuple:
    """The ambient mesh's batch axes that split rows over devices (traced_on sets the mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return () if mesh.empty else tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)


def row_shards() -> int:
    """How many devices the ambient mesh splits the rows over (1 without a mesh)."""
    return math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in _row_axes())


def per_device(in_dims, out_dims):
    """Decorator: the kernel call runs on each device's rows, built from that device's shapes. Dimension
    in_dims[i] of array argument i (None: the whole array) and out_dims[j] of output j (an int: of every
    output) are split over the mesh's batch axes; keyword arguments are static. A kernel is one custom
    call that XLA's partitioner cannot split: it would all-gather the batch and run it on every device."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*arrays, **static):
            axes, call = _row_axes(), functools.partial(fn, **static)
            if not axes:
                return call(*arrays)
            spec = lambda d: P() if d is None else P(*[None] * d, axes)
            return jax.shard_map(call, mesh=jax.sharding.get_abstract_mesh(), in_specs=tuple(map(spec, in_dims)),
                                 out_specs=jax.tree.map(spec, out_dims), check_vma=False)(*arrays)
        return run
    return wrap


def split_layers(fn, stack):
    """fn(stack) for an fn batched over the leading axis (a layer stack), each device of the ambient mesh
    computing its own share of the layers, the results gathered back. Muon orthogonalises this way: on a
    data-parallel mesh every device would otherwise run Newton-Schulz on every layer (d20: ~20 ms a step).
    The stack is zero-padded to a multiple of the device count (fn must map a zero matrix to zeros) and
    split fsdp-major, which only refines the split over fsdp that params already have."""
    axes = _row_axes()
    if not axes or stack.ndim < 3:
        return fn(stack)
    L = stack.shape[0]
    padded = jnp.pad(stack, [(0, -L % row_shards())] + [(0, 0)] * (stack.ndim - 1))
    spec = P(tuple(reversed(axes)))
    return jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=spec, out_specs=spec,
                         check_vma=False)(padded)[:L]


def global_batch(local_rows: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """This process's rows -> one global jax.Array laid out by `sharding` (works on 1 or many hosts)."""
    return jax.make_array_from_process_local_data(sharding, local_rows)
