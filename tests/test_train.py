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
import pytest

from nanochat_jax import model as model_lib
from nanochat_jax import sharding, train
from nanochat_jax.config import ConfigError, UserError, base_config
from nanochat_jax.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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

PIPELINE_FLAGS = [
    "--config=configs/tiny.py", "--config.model.depth=2", "--config.model.head_dim=32",
    "--config.model.sequence_len=64", "--config.tokenizer.vocab_size=512", "--config.tokenizer.max_chars=300000",
    "--config.train.device_batch_size=4", "--config.train.total_batch_size=512", "--config.train.num_iterations=24",
    "--config.train.save_every=3", "--config.train.eval_every=12", "--config.train.eval_tokens=2048",
    "--config.train.sample_every=1000", "--config.mesh.data=1",
]


def _pipeline(base_dir, data_dir, stages, **popen):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "run_pipeline.py", *PIPELINE_FLAGS, f"--base_dir={base_dir}",
           f"--config.data.dir={data_dir}", f"--stages={stages}"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _metric_steps(base_dir):
    path = os.path.join(base_dir, "logs", "base.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in (json.loads(line) for line in f if line.endswith("\n")) if "loss" in r]


@pytest.fixture(scope="module")
def tokenized_run(tmp_path_factory):
    """A base_dir whose tokenizer stage is done (shared by the fault tests)."""
    root = tmp_path_factory.mktemp("pipeline")
    proc = _pipeline(root / "template", root / "data", "tokenizer")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return root


def _fresh_run(root, name):
    shutil.copytree(root / "template", root / name)
    return root / name


def test_sigkill_resume_reproduces_uninterrupted_losses(tokenized_run):
    ref_dir = _fresh_run(tokenized_run, "reference")
    proc = _pipeline(ref_dir, tokenized_run / "data", "base")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    reference = {r["step"]: r["loss"] for r in _metric_steps(ref_dir)}
    assert sorted(reference) == list(range(1, 25))

    run_dir = _fresh_run(tokenized_run, "killed")
    rng, kills = random.Random(1234), 0
    for attempt in range(20):
        proc = _pipeline(run_dir, tokenized_run / "data", "base")
        seen = len(_metric_steps(run_dir))
        deadline = time.time() + 300
        while proc.poll() is None and len(_metric_steps(run_dir)) <= seen and time.time() < deadline:
            time.sleep(0.05)  # wait until this process trains (past imports and compile)
        if proc.poll() is not None:
            break
        # then kill at a random moment (mid-step, mid-save, anywhere) within a few steps (~0.1 s each here),
        # so that at least five kills land before the 24 steps are done
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        proc.wait()
        kills += 1
        if kills >= 5 and len(_metric_steps(run_dir)) >= 18:
            proc = _pipeline(run_dir, tokenized_run / "data", "base")  # let the last one finish
            proc.communicate(timeout=600)
            break
    assert proc.returncode == 0, proc.stdout.read() if proc.stdout else ""
    assert kills >= 5
    resumed = _metric_steps(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, 25)), "every step logged exactly once"
    assert {r["step"]: r["loss"] for r in resumed} == reference  # bit-identical losses after every resume


def test_sigterm_saves_then_rerun_resumes(tokenized_run):
    run_dir = _fresh_run(tokenized_run, "sigterm")
    proc = _pipeline(run_dir, tokenized_run / "data", "base")
    while proc.poll() is None and len(_metric_steps(run_dir)) < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "checkpoint saved" in out
    stopped_at = len(_metric_steps(run_dir))
    ckpt_dir = run_dir / "checkpoints" / "base" / "tiny"
    assert str(stopped_at) in os.listdir(ckpt_dir), (stopped_at, os.listdir(ckpt_dir))
    proc = _pipeline(run_dir, tokenized_run / "data", "base")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert f"resumed from step {stopped_at}" in out
    assert [r["step"] for r in _metric_steps(run_dir)] == list(range(1, 25))
    # a third run finds the stage complete and skips it
    out, _ = _pipeline(run_dir, tokenized_run / "data", "base").communicate(timeout=300)
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
