"""run_pipeline.py --dry_run: the plan of a real config on fake CPU devices, and the mistakes it stops on."""
import os
import re
import subprocess
import sys

import pytest

from nanochat_jax import dry_run
from nanochat_jax.config import ConfigError, UserError, base_config
from nanochat_jax.tasks import load_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry_run(tmp_path, *flags):
    cmd = [sys.executable, "run_pipeline.py", "--dry_run", f"--base_dir={tmp_path / 'run'}", *flags,
           f"--config.data.dir={tmp_path / 'data'}"]  # after --config, which must come first
    # as a user runs it: without the test session's 8 fake devices (the dry run must set them up itself)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def _one_line_error(p, message):
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and p.stderr.startswith("error: "), p.stderr
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize("devices, accum", [(8, 1), (1, 8)])
def test_d20_plan(tmp_path, devices, accum):
    # 100 shards on one device: the Chinchilla horizon needs more, which the plan warns about
    extra = ["--config.data.num_shards=100"] if devices == 1 else []
    p = _dry_run(tmp_path, "--config=configs/d20.py", "--stages=tokenizer,base", f"--dry_run_devices={devices}", *extra)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "560,988,160 parameters" in out
    assert "21,400 steps x 256 rows of 2,048 = 11.220 B tokens" in out
    assert f"device batch 32, gradient accumulation {accum} on {devices} devices" in out
    shards = 100 if devices == 1 else 240
    corpus = tmp_path / "data" / "fineweb"
    assert f"FineWeb-EDU shards ({corpus}): present 0/{shards}, download {shards / 10:.1f} GB" in out
    mem = re.search(r"memory per device ~([\d.]+) GiB of 72: params 2.09, optimiser 2.71, grads ([\d.]+)", out)
    assert mem and float(mem[2]) == (4.18 if accum > 1 else 2.09), out  # a second buffer for the running sum
    assert 40 < float(mem[1]) < 60, out  # one H100 measured 46.5 GiB (1 micro-batch), 51.5 (8)
    hours = float(re.search(r"time ([\d.]+) h at MFU 55.9% \(measured d20", out)[1])
    assert 2.0 < hours * devices / 8 < 3.0, out  # 11.2 B tokens x 3.49 GFLOP/token at 55.9% of 989 TFLOP/s
    assert ("WARNING: base reads 11.2 B tokens but 99 train shards hold" in out) == (devices == 1), out


@pytest.mark.parametrize("flags, message", [
    (["--config=configs/d20.py", "--stages=tokenizer,base", "--config.train.device_batch_size=24"],
     "config.train.total_batch_size=524288 must be a multiple of device_batch_size x devices x sequence_len"),
    (["--config=configs/d20.py", "--stages=tokenizer,base", "--config.model.aspect_ratio=65"],
     "d_model = aspect_ratio x depth = 65 x 20 = 1300 is not a multiple of head_dim=128"),
    (["--config=configs/d20.py", "--stages=sft"], "stage sft needs the mid stage's output at"),
    (["--config=configs/d20.py", "--stages=tokenizer", "--dry_run_gpu=A1"], "--dry_run_gpu=A1: known GPUs are"),
])
def test_mistakes_stop_with_one_line(tmp_path, flags, message):
    _one_line_error(_dry_run(tmp_path, *flags), message)


def test_over_memory_stops_with_one_line(tmp_path):
    # d26's mid section once kept the schema's device batch 32 (configs/d26.py lowered only train's): ~80 GiB
    (tmp_path / "run" / "checkpoints" / "base" / "d26" / "100").mkdir(parents=True)  # as if base had run
    p = _dry_run(tmp_path, "--config=configs/d26.py", "--stages=mid", "--config.mid.device_batch_size=32")
    _one_line_error(p, "stage mid: ~")
    assert re.search(r"GiB per device \(params 4.0, optimiser 4.8, grads 4.0, activations [\d.]+\) exceeds the H100's "
                     r"72 GiB \(90% of 80 GiB\): lower config.mid.device_batch_size=32", p.stderr), p.stderr
    assert _dry_run(tmp_path, "--config=configs/d26.py", "--stages=mid").returncode == 0  # as the config sets it: 16


def _tiny(tmp_path):
    c = base_config()
    c.update(dict(base_dir=str(tmp_path / "run"), stages="tokenizer,base,mid,sft"))
    c.model.update(dict(depth=2, aspect_ratio=32, head_dim=32, sequence_len=128))
    c.tokenizer.vocab_size = 512
    c.data.dir = str(tmp_path / "data")
    c.train.update(dict(device_batch_size=2, total_batch_size=2 * 8 * 128, num_iterations=10))
    c.mid.update(dict(device_batch_size=2, total_batch_size=2 * 8 * 128, mixture="identity,simple_spelling:train:500",
                      val_mixture=""))
    c.sft.update(dict(device_batch_size=1, total_batch_size=8, mixture="identity,spelling_bee:train:300,gsm8k",
                      val_mixture="smoltalk:test"))
    return c


def test_plan_counts_files_and_conversations(tmp_path):
    c = _tiny(tmp_path)
    shards = tmp_path / "data" / "fineweb"
    shards.mkdir(parents=True)
    for i in range(100):  # 100 of the 240 shards on disk
        (shards / f"shard_{i:05d}.parquet").touch()
    rows = {r["stage"]: r for r in dry_run.plan(c, devices=8)}
    assert list(rows) == ["tokenizer", "base", "mid", "sft"]
    assert rows["tokenizer"]["files"][0]["present"] == "100/240"
    assert rows["tokenizer"]["files"][0]["download"] == 140 * dry_run.SHARD_BYTES
    assert rows["base"]["steps"] == 10 and rows["base"]["grad_accum"] == 1
    # sft: the shipped identity file's conversations + 300 + GSM8K train's 7,473 (STAGES.md: not on disk here)
    identity = len(load_task("identity"))
    assert rows["sft"]["steps"] == (identity + 300 + 7_473) // 8
    files = {f["what"]: f for f in rows["sft"]["files"]}
    gsm8k = files["gsm8k:train (openai/gsm8k)"]
    assert gsm8k["present"] == "no" and gsm8k["download"] is None  # fetched on first use, size unknown offline
    assert files["spelling_bee: word list"]["present"] == "yes"
    assert rows["sft"]["grad_accum"] == 1 and rows["mid"]["rows_per_step"] == 16


def test_missing_word_list_is_a_user_error(tmp_path, monkeypatch):
    from nanochat_jax.tasks import synthetic
    monkeypatch.setattr(synthetic, "WORD_LIST", str(tmp_path / "no_words"))
    real_find_spec = dry_run.importlib.util.find_spec
    monkeypatch.setattr(dry_run.importlib.util, "find_spec",
                        lambda name, *a: None if name == "english_words" else real_find_spec(name, *a))
    with pytest.raises(UserError, match="stage mid: simple_spelling needs a word list"):
        dry_run.plan(_tiny(tmp_path), devices=8)


def test_rl_rows_must_split_over_the_devices(tmp_path):
    c = _tiny(tmp_path)
    c.stages = "rl"
    c.model.sequence_len = 512  # RL's rows: 256 prompt + 256 sampled tokens (STAGES.md defaults)
    c.rl.device_batch_size = 48  # 16 questions x 16 samples = 256 rows; 48 x 8 devices does not divide them
    (tmp_path / "run" / "checkpoints" / "sft" / c.run_name / "7").mkdir(parents=True)  # the SFT output exists
    with pytest.raises(ConfigError, match=r"stage rl: 256 rows a step must be a multiple of config.rl.device_batch"):
        dry_run.plan(c, devices=8)
    c.rl.device_batch_size = 32
    (row,) = dry_run.plan(c, devices=8)
    assert row["steps"] == 7_473 // 16 and row["grad_accum"] == 1 and row["row_len"] == 512
