"""Muon (nanochat_jax/muon.py) against SPEC §4, optax.contrib.muon, stacking and sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nanochat_jax import sharding
from nanochat_jax.muon import muon, orthogonalize


# ---- a float64 NumPy transcription of SPEC §4, in the reference's (out, in) weight layout ----

def ns5_reference(g):
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(5):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    return x.T if g.shape[0] > g.shape[1] else x


def muon_reference_step(grad_out_in, buf, lr, mu, nesterov):
    """One step on one (out, in) matrix: returns (delta W, new buffer)."""
    buf = buf + (1 - mu) * (grad_out_in - buf)  # buf.lerp_(g, 1 - mu)
    g = grad_out_in + mu * (buf - grad_out_in) if nesterov else buf  # g.lerp_(buf, mu)
    rows, cols = grad_out_in.shape
    return -lr * max(1, rows / cols) ** 0.5 * ns5_reference(g), buf


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_newton_schulz_singular_values_in_band():
    # Measured on these Gaussian matrices (bf16 NS5): singular values in [0.57, 1.19]; the smallest
    # come from the square 64x64 case, whose smallest input singular values are near 0.
    rng = np.random.default_rng(0)
    for shape in [(64, 64), (32, 128), (128, 32), (100, 300), (4, 16, 48)]:
        out = jax.jit(orthogonalize)(jnp.asarray(rng.standard_normal(shape), jnp.float32))
        assert out.shape == shape and out.dtype == jnp.bfloat16
        s = np.linalg.svd(np.asarray(out, np.float32), compute_uv=False)
        assert 0.5 < s.min() and s.max() < 1.5, (shape, s.min(), s.max())


@pytest.mark.parametrize("nesterov", [True, False])
def test_three_steps_match_float64_transcription(nesterov):
    rng = np.random.default_rng(1)
    # Flax (in, out) kernels: an up-projection (scale 2), a down-projection, and a layer stack.
    shapes = {"up": (16, 64), "down": (64, 16), "stack": (3, 24, 24)}
    lr_at = lambda count: 0.02 * (1.0 - 0.1 * count)  # schedules: check they are read at the step
    mu_at = lambda count: 0.85 + 0.05 * count
    opt = muon(lr_at, mu_at, nesterov=nesterov)
    params = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
    state = opt.init(params)
    update = jax.jit(opt.update)
    # reference state: one (out, in) buffer per matrix
    bufs = {k: np.zeros(s[:-2] + s[-1:] + s[-2:-1]) for k, s in shapes.items()}
    for step in range(3):
        grads = {k: rng.standard_normal(s) for k, s in shapes.items()}
        updates, state = update(jax.tree.map(jnp.float32, grads), state)
        for k, g in grads.items():
            g_oi = np.swapaxes(g, -1, -2)
            if g.ndim == 2:
                expect, bufs[k] = muon_reference_step(g_oi, bufs[k], lr_at(step), mu_at(step), nesterov)
            else:
                pairs = [muon_reference_step(g_oi[i], bufs[k][i], lr_at(step), mu_at(step), nesterov)
                         for i in range(g.shape[0])]
                expect, bufs[k] = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
            # bf16 Newton-Schulz vs float64: measured relative error 4-7% (the same code iterating
            # in fp32 lands within 1e-6, so the gap is bf16 rounding, amplified by NS's slope at 0)
            assert rel_err(np.swapaxes(updates[k], -1, -2), expect) < 0.1, (step, k)
            assert rel_err(np.swapaxes(state.momentum[k], -1, -2), bufs[k]) < 1e-6
    assert int(state.count) == 3


def test_stacked_equals_separate_matrices():
    rng = np.random.default_rng(2)
    L, m, n = 4, 24, 40
    opt = muon(0.02, 0.95)
    stack = {"w": jnp.zeros((L, m, n))}
    singles = {f"w{i}": jnp.zeros((m, n)) for i in range(L)}
    s_stack, s_single = opt.init(stack), opt.init(singles)
    update = jax.jit(opt.update)
    for _ in range(2):
        g = jnp.asarray(rng.standard_normal((L, m, n)), jnp.float32)
        u_stack, s_stack = update({"w": g}, s_stack)
        u_single, s_single = update({f"w{i}": g[i] for i in range(L)}, s_single)
        for i in range(L):
            np.testing.assert_array_equal(u_stack["w"][i], u_single[f"w{i}"])


fake_cpu_devices = pytest.mark.skipif(jax.devices()[0].platform != "cpu",
                                      reason="needs tests/conftest.py's 8 fake CPU devices; "
                                             "JAX_PLATFORMS=cuda gives the machine's GPUs instead")


@fake_cpu_devices
def test_sharded_along_layers_runs_without_collectives():
    devices = np.array(jax.devices())
    assert len(devices) == 8  # tests/conftest.py: 8 fake CPU devices
    mesh = Mesh(devices, ("layers",))
    by_layer = NamedSharding(mesh, P("layers"))
    rng = np.random.default_rng(3)
    g = jnp.asarray(rng.standard_normal((8, 32, 64)), jnp.float32)
    opt = muon(0.02, 0.9)
    state = opt.init({"w": g})
    expect, _ = jax.jit(opt.update)({"w": g}, state)  # jit both: eager rounds bf16 between ops

    g_sh = jax.device_put(g, by_layer)
    state_sh = jax.device_put(state, jax.tree.map(lambda x: by_layer if x.ndim else NamedSharding(mesh, P()), state))
    step = jax.jit(opt.update)
    hlo = step.lower({"w": g_sh}, state_sh).compile().as_text()
    for collective in ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter"):
        assert collective not in hlo, collective
    got, new_state = step({"w": g_sh}, state_sh)
    assert got["w"].sharding.is_equivalent_to(by_layer, 3)
    assert new_state.momentum["w"].sharding.is_equivalent_to(by_layer, 3)
    # (the CPU compiler fuses the bf16 polynomial into the GEMMs differently when sharded: one bf16
    # rounding apart: measured 0.17% relative)
    assert rel_err(got["w"], np.asarray(expect["w"], np.float64)) < 0.01


def _flops(compiled):
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


@fake_cpu_devices
@pytest.mark.parametrize("data,fsdp", [(8, 1), (2, 4)])
def test_on_a_mesh_each_device_orthogonalises_its_share_of_the_layers(data, fsdp):
    """In the train step (sharding.traced_on), a stack of 5 layers is padded to 8 and each device runs
    Newton-Schulz on one layer, not on all 5 as a data-parallel device did; the update is the same."""
    devices = np.array(jax.devices())
    mesh = Mesh(devices.reshape(data, fsdp), sharding.BATCH_AXES)
    g = {"w": jnp.asarray(np.random.default_rng(4).standard_normal((5, 16, 48)), jnp.float32)}
    opt = muon(0.02, 0.9, ns_dtype=jnp.float32)
    state = opt.init(g)
    alone = jax.jit(opt.update).lower(g, state).compile()
    g_rep, state_rep = jax.device_put((g, state), sharding.replicated(mesh))  # as data parallelism lays them out
    on_mesh = jax.jit(sharding.traced_on(mesh, opt.update)).lower(g_rep, state_rep).compile()
    assert _flops(on_mesh) < 0.3 * _flops(alone)  # one layer's Newton-Schulz of five, per device
    expect, got = alone(g, state)[0]["w"], on_mesh(g_rep, state_rep)[0]["w"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(expect), rtol=1e-5, atol=1e-6)


def _optax_bf16_newton_schulz(g):
    """optax's scale_by_muon with beta=0 and no Nesterov is its bare Newton-Schulz (same quintic
    coefficients, Frobenius pre-scaling, transpose of tall matrices); fed bf16 it iterates in bf16, as the
    reference does: x <- a x + B x with B = b A + c A^2."""
    ns = optax.contrib.scale_by_muon(beta=0.0, nesterov=False, eps=1e-7,
                                     weight_dimension_numbers={"w": optax.contrib.MuonDimensionNumbers()})
    g = {"w": jnp.asarray(g, jnp.bfloat16)}
    return ns.update(g, ns.init(g))[0]["w"]


def test_orthogonalization_matches_optax_contrib():
    # Ours multiplies by P = c (A + beta I)^2 + gamma I, optax's polynomial (see the helper above) with its
    # square completed (one GEMM, no pass over x for the add; the identity terms in place), which rounds
    # differently: measured 3.4-4.1% apart; ours 1.9-3.7% from float64, theirs 3.3-6.1%, ours the closer
    # on every shape.
    rng = np.random.default_rng(4)
    for shape in [(32, 48), (48, 32), (128, 512)]:
        g = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
        theirs = _optax_bf16_newton_schulz(g)
        ours, exact = orthogonalize(g), ns5_reference(np.asarray(g, np.float64))
        assert rel_err(ours, np.asarray(theirs, np.float64)) < 0.05, shape
        assert rel_err(ours, exact) <= rel_err(theirs, exact), shape


def test_gram_newton_schulz_is_the_same_iteration():
    """Wide matrices (n > 1.5 m, the MLP's) iterate on the Gram matrix: the same iterates in exact
    arithmetic (fp32: within 1e-4 of the float64 transcription), for 14 m^3 + 4 m^2 n multiply-adds where
    the plain form takes 5 m^3 + 10 m^2 n. In bf16 it must stay closer to float64 than the reference's own
    bf16 iteration, also on a decaying spectrum, where rounding leaves spurious negative eigenvalues in
    the Gram matrix: without the restart it lands 14-40x off (1/k spectrum: measured 0.037 vs 0.042)."""
    rng = np.random.default_rng(6)
    m, n = 128, 512
    u, _, vt = np.linalg.svd(rng.standard_normal((m, n)), full_matrices=False)
    for g in (rng.standard_normal((m, n)), (u / np.arange(1, m + 1)) @ vt):
        exact = ns5_reference(g)
        with jax.default_matmul_precision("float32"):  # not TF32, a GPU's default for fp32 matmuls
            assert rel_err(orthogonalize(jnp.asarray(g, jnp.float32), dtype=jnp.float32), exact) < 1e-4
        ours = jax.jit(orthogonalize)(jnp.asarray(g, jnp.float32))
        ours_err, theirs_err = rel_err(ours, exact), rel_err(_optax_bf16_newton_schulz(g), exact)
        assert ours_err < theirs_err, (ours_err, theirs_err)
    flops = _flops(jax.jit(orthogonalize).lower(jnp.zeros((m, n), jnp.bfloat16)).compile())
    assert flops < 1.05 * 2 * (14 * m**3 + 4 * m * m * n), flops
    assert flops < 0.75 * 2 * (5 * m**3 + 10 * m * m * n), flops


@pytest.mark.parametrize("nesterov,steps", [(False, 3), (True, 1)])
def test_full_update_matches_optax_contrib_muon(nesterov, steps):
    """Where optax.contrib.muon defines the same thing it must agree with ours.

    Its momentum is the same EMA but bias-corrected. Without Nesterov the correction is one scalar
    per step, which the Frobenius pre-scaling of Newton-Schulz removes, so every step agrees. With
    Nesterov it corrects the buffer and the gradient by different factors, so only the first step
    (where both are multiples of g) agrees. Its width scale sqrt(max(1, fan_out/fan_in)) with
    (reduction, output) = (in, out) is SPEC's. It iterates in fp32, we in bf16: measured relative
    difference 4-7%, as against float64.
    """
    rng = np.random.default_rng(5)
    shapes = {"up": (16, 64), "down": (64, 16)}
    ours = muon(0.02, 0.9, nesterov=nesterov)
    theirs = optax.contrib.muon(0.02, beta=0.9, eps=1e-7, nesterov=nesterov)
    params = {k: jnp.zeros(s) for k, s in shapes.items()}
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    for _ in range(steps):
        g = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
        u_ours, s_ours = jax.jit(ours.update)(g, s_ours)
        u_theirs, s_theirs = jax.jit(theirs.update)(g, s_theirs, params)
        for k in shapes:
            assert rel_err(u_ours[k], np.asarray(u_theirs[k], np.float64)) < 0.1, k


def test_rejects_non_matrix_parameters():
    with pytest.raises(ValueError, match=r"\['b'\]"):
        muon(0.02, 0.95).init({"w": jnp.zeros((4, 4)), "b": jnp.zeros((4,))})
