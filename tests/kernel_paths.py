"""The same model run with kernels='xla' and kernels='pallas', for tests that compare the two paths
(tests/test_kernels.py on CPU and GPU, tests/test_gpu.py's fused MLP on a Hopper)."""
import dataclasses

import jax
import numpy as np

from nanochat_jax import model as M
from nanochat_jax import sharding, train
from nanochat_jax.config import base_config

KERNELS = ("xla", "pallas")


def small_params(cfg):
    """init_params with its zero-initialised weights made small random ones, so every gradient is nonzero."""
    params = M.init_params(cfg, jax.random.key(0))
    return jax.tree.map(lambda a: a if a.any() else 0.02 * jax.random.normal(jax.random.key(1), a.shape), params)


def loss_and_grads(cfg, params, rows):
    """{kernels: ((loss, grads), jaxpr of that computation)} on `rows` (B, T + 1) for both paths."""
    out = {}
    for kernel in KERNELS:
        c = dataclasses.replace(cfg, kernels=kernel)
        fn = jax.value_and_grad(lambda p: M.loss_fn(p, c, rows[:, :-1], rows[:, 1:])[0])
        out[kernel] = fn(params), jax.make_jaxpr(fn)(params).jaxpr
    return out


def mesh_train_step(cfg, fsdp, rows_per_device, seq):
    """One real train step on a mesh of every device (data x fsdp), for both paths, on the same random rows:
    {kernels: (loss, params before, params after, jaxpr of the step)}."""
    n = jax.device_count()
    c = base_config()
    c.mesh.data, c.mesh.fsdp = -1, fsdp
    c.train.device_batch_size, c.train.total_batch_size = rows_per_device, n * rows_per_device * seq
    mesh = sharding.make_mesh(c.mesh)
    rows = np.asarray(jax.random.randint(jax.random.key(2), (1, n * rows_per_device, seq + 1), 0, cfg.vocab_size))
    out = {}
    for kernel in KERNELS:
        step, init_fn, _, _, batch_sh = train.build_step(dataclasses.replace(cfg, kernels=kernel), c.train, 10, mesh)
        params, opt_state = init_fn(jax.random.key(0))
        batch = {k: jax.device_put(v[None], batch_sh) for k, v in train.rows_batch(rows[0]).items()}
        jaxpr = jax.make_jaxpr(step)(params, opt_state, batch).jaxpr
        before = jax.tree.map(np.asarray, params)  # (the step donates params)
        with jax.default_matmul_precision("highest"):  # fp32 GEMMs on a GPU would otherwise round to TF32
            params, _, metrics = step(params, opt_state, batch)
        out[kernel] = float(metrics["loss"]), before, jax.tree.map(np.asarray, params), jaxpr
    return out
