"""The training loop: same losses on 1 and 8 (fake) devices, resumes exactly after SIGKILL, saves on SIGTERM."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pipeline_runs
import pytest

from nanochat_jax import model as model_lib
from nanochat_jax import sharding, train
from nanochat_jax.config import ConfigError, UserError, base_config
from nanochat_jax.tokenizer import Tokenizer

DOCS = "/usr/share/doc/python3.11/html/_sources"


def test_horizon_and_accumulation_follow_spec():
    c = base_config()
    d20 = model_lib.ModelConfig.from_config(c)
    assert train.num_iterations(c.train, d20) == 21400  # SPEC §4: 20 * 560,988,160 // 524,288
    assert train.grad_accum_steps(c.train, 2048, 8) == 1
    assert train.grad_accum_steps(c.train, 2048, 1) == 8  # one GPU keeps the 524,288-token batch
    c.train.target_flops = 1e18
    assert train.num_iterations(c.train, d20) == round(1e18 / (model_lib.estimate_flops(d20) * 524288))
    c.train.num_iterations = 7
    assert train.num_iterations(c.train, d20) == 7
    with pytest.raises(ConfigError, match="total_batch_size"):
        train.grad_accum_steps(c.train, 2048, 3)


class RowIterator:
    """Deterministic stand-in for the data pipeline: two seeded batches of rows in turn (so there is
    something to learn in a few steps), with get/set state like the real iterator."""

    def __init__(self, rows, seq_len, vocab, seed=0):
        self.rows, self.seq_len, self.vocab, self.seed, self.n = rows, seq_len, vocab, seed, 0

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.n % 2])
        self.n += 1
        return rng.integers(0, self.vocab, (self.rows, self.seq_len + 1), dtype=np.int32)

    def get_state(self):
        return {"n": self.n}

    def set_state(self, state):
        self.n = state["n"]


def _docs(folder, n=6):
    texts = []
    for name in sorted(os.listdir(os.path.join(DOCS, folder)))[:n]:
        with open(os.path.join(DOCS, folder, name), encoding="utf-8") as f:
            texts.append(f.read())
    return texts


@pytest.fixture(scope="module")
def small_tokenizer():
    return Tokenizer.train(_docs("tutorial"), vocab_size=512)


def _tiny_config(base_dir, **mesh):
    c = base_config()
    c.base_dir, c.run_name, c.seed = str(base_dir), "t", 0
    c.model.depth, c.model.head_dim, c.model.sequence_len, c.model.compute_dtype = 2, 32, 32, "float32"
    c.tokenizer.vocab_size = 512
    c.train.device_batch_size, c.train.total_batch_size, c.train.num_iterations = 2, 16 * 32, 5
    c.train.eval_every = c.train.sample_every = c.train.save_every = 100
    c.mesh.update(mesh)
    return c


def _losses(metrics_path):
    with open(metrics_path) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def _train(c, tokenizer, val, devices=None):
    """train_loop as the base stage calls it, on the stand-in rows, val bpb at step 0 and the end."""
    mesh = sharding.make_mesh(c.mesh, devices)
    model_cfg = model_lib.ModelConfig.from_config(c)
    evals = [(c.train.eval_every, train.bpb_eval(mesh, model_cfg, tokenizer, val))]
    return train.train_loop(c, "base", c.train, tokenizer, train.PackedSource(RowIterator(16, 32, 512)),
                            c.train.num_iterations, 16, evals, mesh=mesh)


@pytest.mark.parametrize("mesh", [dict(data=8, fsdp=1), dict(data=2, fsdp=4)])
def test_eight_devices_match_one(tmp_path, small_tokenizer, mesh):
    assert jax.device_count() == 8, "conftest gives the session 8 fake CPU devices"
    val = [RowIterator(16, 32, 512, seed=99).__next__()]
    runs = {}
    for name, devices, mesh_cfg in (("one", jax.devices()[:1], dict(data=1, fsdp=1)), ("eight", None, mesh)):
        c = _tiny_config(tmp_path / name, **mesh_cfg)
        out = _train(c, small_tokenizer, val, devices)
        runs[name] = (_losses(out["metrics_path"]), out["history"]["val_bpb"])
    (one, bpb_one), (eight, bpb_eight) = runs["one"], runs["eight"]
    assert len(one) == 5 and one[-1] < one[0]
    np.testing.assert_allclose(eight, one, rtol=1e-5)
    np.testing.assert_allclose([v for _, v in bpb_eight], [v for _, v in bpb_one], rtol=1e-5)


def test_checkpoint_of_an_fsdp_mesh_resumes_on_one_device(tmp_path, small_tokenizer):
    """Orbax reshards on restore: steps 1-3 on 8 devices (params split over fsdp=4), steps 4-5 resumed
    on 1 device, give the losses of 5 steps on 1 device."""
    val = [RowIterator(16, 32, 512, seed=99).__next__()]
    c = _tiny_config(tmp_path / "moved", data=2, fsdp=4)
    c.train.save_every = 3
    _train(c, small_tokenizer, val)
    shutil.rmtree(tmp_path / "moved" / "checkpoints" / "base" / "t" / "5")  # as if killed after step 3's save
    c.mesh.data, c.mesh.fsdp = 1, 1
    moved = _train(c, small_tokenizer, val, jax.devices()[:1])
    ref = _tiny_config(tmp_path / "one", data=1, fsdp=1)
    one = _train(ref, small_tokenizer, val, jax.devices()[:1])
    assert len(_losses(moved["metrics_path"])) == 5
    np.testing.assert_allclose(_losses(moved["metrics_path"]), _losses(one["metrics_path"]), rtol=1e-5)


def test_tokenizer_mismatch_is_refused(tmp_path, small_tokenizer):
    c = _tiny_config(tmp_path)
    c.train.num_iterations = 1
    val = [RowIterator(16, 32, 512, seed=99).__next__()]
    _train(c, small_tokenizer, val)
    other = Tokenizer.train(_docs("howto"), vocab_size=512)  # same size, other text: other merges
    c.train.num_iterations = 2
    with pytest.raises(UserError, match="tokenizer"):
        _train(c, other, val)


# ---- whole-pipeline fault tests: real processes, real Orbax, real SIGKILL ----


@pytest.fixture(scope="module")
def tokenized_run(tmp_path_factory):
    """A base_dir whose tokenizer stage is done (shared by the fault tests)."""
    root = tmp_path_factory.mktemp("pipeline")
    pipeline_runs.run(root / "template", root / "data", "tokenizer", timeout=300)
    return root


def _fresh_run(root, name):
    shutil.copytree(root / "template", root / name)
    return root / name


def test_sigkill_resume_reproduces_uninterrupted_losses(tokenized_run):
    ref_dir = _fresh_run(tokenized_run, "reference")
    pipeline_runs.run(ref_dir, tokenized_run / "data", "base")
    reference = {r["step"]: r["loss"] for r in pipeline_runs.metric_steps(ref_dir)}
    assert sorted(reference) == list(range(1, 25))
    run_dir = _fresh_run(tokenized_run, "killed")
    assert pipeline_runs.kill_until_done(run_dir, tokenized_run / "data", "base", random.Random(1234), 5, 0.2) >= 5
    resumed = pipeline_runs.metric_steps(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, 25)), "every step logged exactly once"
    assert {r["step"]: r["loss"] for r in resumed} == reference  # bit-identical losses after every resume


def test_sigterm_saves_then_rerun_resumes(tokenized_run):
    run_dir = _fresh_run(tokenized_run, "sigterm")
    proc = pipeline_runs.start(run_dir, tokenized_run / "data", "base")
    while proc.poll() is None and len(pipeline_runs.metric_steps(run_dir)) < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "checkpoint saved" in out
    stopped_at = len(pipeline_runs.metric_steps(run_dir))
    ckpt_dir = run_dir / "checkpoints" / "base" / "tiny"
    assert str(stopped_at) in os.listdir(ckpt_dir), (stopped_at, os.listdir(ckpt_dir))
    out = pipeline_runs.run(run_dir, tokenized_run / "data", "base")
    assert f"resumed from step {stopped_at}" in out
    assert [r["step"] for r in pipeline_runs.metric_steps(run_dir)] == list(range(1, 25))
    # a third run finds the stage complete and skips it
    out = pipeline_runs.run(run_dir, tokenized_run / "data", "base", timeout=300)
    assert "skipped (complete)" in out


def test_an_older_checkpoint_config_gets_todays_defaults():
    """A checkpoint saved before a config key existed still loads: its values win, new keys default."""
    from nanochat_jax.checkpoint import _with_defaults

    saved = json.loads(base_config().to_json())
    del saved["model"]["residual_dtype"]
    saved["model"]["depth"], saved["run_name"] = 4, "old"
    config = _with_defaults(saved)
    assert config.model.depth == 4 and config.run_name == "old"
    assert config.model.residual_dtype == base_config().model.residual_dtype


_CACHE_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
from nanochat_jax import checkpoint
checkpoint.use_compile_cache(sys.argv[1], min_compile_secs=0)
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
jax.jit(lambda x: jnp.tanh(x @ x).sum())(jnp.ones((32, 32))).block_until_ready()
print(json.dumps(events.count("/jax/compilation_cache/cache_hits")))
"""


def test_a_second_process_loads_the_compiled_program_from_the_run_dir(tmp_path):
    run = lambda: subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, str(tmp_path)], capture_output=True,
                                 text=True, timeout=120, check=True).stdout.strip().splitlines()[-1]
    assert json.loads(run()) == 0
    assert os.listdir(tmp_path / "xla_cache")
    assert json.loads(run()) >= 1
