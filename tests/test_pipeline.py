"""run_pipeline.py as a user runs it: overrides apply, user mistakes are one line and exit 2, logs print once."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *flags):
    cmd = [sys.executable, "run_pipeline.py", f"--base_dir={tmp_path / 'run'}", *flags]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flags, message", [
    # without --config, ml_collections applies overrides to the default config as the flag is defined
    (["--config.train.devce_batch_size=3"], "unknown config key config.train.devce_batch_size"),
    (["--config=configs/tiny.py", "--config.nope.x=1"], "unknown config key config.nope.x"),
    (["--config.train.device_batch_size=abc"], "--config.train.device_batch_size=abc"),
    (["--config.train.device_batch_size=0"], "config.train.device_batch_size must be > 0"),
    (["--config.model.compute_dtype=fp8"], "config.model.compute_dtype must be one of"),
    (["--config.tokenizer.vocab_size=100000000000"], "config.tokenizer.vocab_size must be in [265, "),
    (["--config=configs/nope.py"], "no such file"),
    (["--stages=tokenizer,nope"], "unknown stage(s) ['nope']"),
    (["--config.train.matrix_lr=0.1", "--config=configs/tiny.py"], "before a value for --config"),
    (["stray"], "unexpected arguments ['stray']"),
    (["--config=configs/tiny.py", "--stages=tokenizer", "--config.tokenizer.max_chars=200000",
      "--config.tokenizer.vocab_size=60000"], "give more text or a vocab_size of at most"),
])
def test_user_mistakes_are_one_line(tmp_path, flags, message):
    p = _run(tmp_path, *flags)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and p.stderr.startswith("error: "), p.stderr
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_overrides_apply_and_each_log_line_prints_once(tmp_path):
    p = _run(tmp_path, "--config=configs/tiny.py", "--config.train.device_batch_size=3",
             "--config.model.depth=2", "--config.stages=")  # no stage: just the config and the summary
    assert p.returncode == 0, p.stderr
    log = (tmp_path / "run" / "logs" / "pipeline.log").read_text()
    assert "device_batch_size: 3" in log and re.search(r"^  depth: 2$", log, re.M)
    out = p.stdout + p.stderr
    assert len(re.findall(r"config:\n", out)) == 1, out  # not once more by absl's own handler
    assert "pipeline summary" in p.stdout


def test_training_xla_defaults_keep_what_the_user_set(monkeypatch):
    from nanochat_jax import xla_env
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_all_reduce_combine_threshold_bytes=5 --xla_dump_to=/tmp/d")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    xla_env.set_training_defaults()
    flags = os.environ["XLA_FLAGS"].split()
    assert flags == ["--xla_gpu_all_reduce_combine_threshold_bytes=5", "--xla_dump_to=/tmp/d",
                     f"--xla_gpu_all_gather_combine_threshold_bytes={256 << 20}"]
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
    xla_env.set_training_defaults()  # a second call adds nothing twice
    assert os.environ["XLA_FLAGS"].split() == flags and os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"
