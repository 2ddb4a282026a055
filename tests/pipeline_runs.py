"""run_pipeline.py in real processes for the fault tests: start it, read its metrics, SIGKILL it at random moments."""
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# tiny everything: a 2-layer model of 64-token rows on one CPU device, steps of a fraction of a second
FLAGS = [
    "--config=configs/tiny.py", "--config.model.depth=2", "--config.model.head_dim=32",
    "--config.model.sequence_len=64", "--config.tokenizer.vocab_size=512", "--config.tokenizer.max_chars=300000",
    "--config.train.device_batch_size=4", "--config.train.total_batch_size=512", "--config.train.num_iterations=24",
    "--config.train.save_every=3", "--config.train.eval_every=12", "--config.train.eval_tokens=2048",
    "--config.train.sample_every=1000", "--config.mesh.data=1",
    "--config.mid.mixture=identity,simple_spelling:train:150,spelling_bee:train:100,arithmetic:train:200",
    "--config.mid.val_mixture=arithmetic:test:20", "--config.mid.device_batch_size=4",
    "--config.mid.total_batch_size=256", "--config.mid.num_iterations=12", "--config.mid.save_every=3",
    "--config.mid.eval_every=6", "--config.mid.eval_tokens=512",
    "--config.sft.mixture=identity,arithmetic:train:100,spelling_bee:train:40", "--config.sft.val_mixture=arithmetic:test:8",
    "--config.sft.device_batch_size=4", "--config.sft.total_batch_size=4", "--config.sft.num_iterations=12",
    "--config.sft.save_every=3", "--config.sft.eval_every=6", "--config.sft.val_conversations=8",
]


def start(base_dir, data_dir, stages, *extra, **popen):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "run_pipeline.py", *FLAGS, *extra, f"--base_dir={base_dir}",
           f"--config.data.dir={data_dir}", f"--stages={stages}"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def run(base_dir, data_dir, stages, *extra, timeout=600) -> str:
    proc = start(base_dir, data_dir, stages, *extra)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def metric_steps(base_dir, stage="base"):
    """The training steps logged so far (complete lines only; the step-0 evaluation line left out)."""
    path = os.path.join(base_dir, "logs", f"{stage}.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in (json.loads(line) for line in f if line.endswith("\n")) if "loss" in r]


def kill_until_done(base_dir, data_dir, stage, rng, min_kills=5, window=0.4, *extra):
    """SIGKILL the stage at random moments (mid-step, mid-save, anywhere), rerunning the same command each
    time, until it has been killed min_kills times and then finishes; returns the number of kills."""
    kills = 0
    for _ in range(4 * min_kills):
        proc = start(base_dir, data_dir, stage, *extra)
        seen = len(metric_steps(base_dir, stage))
        deadline = time.time() + 300
        while proc.poll() is None and len(metric_steps(base_dir, stage)) <= seen and time.time() < deadline:
            time.sleep(0.05)  # wait until this process trains (past imports and compile)
        if proc.poll() is not None:
            break
        time.sleep(rng.uniform(0.0, window))
        proc.kill()
        proc.wait()
        kills += 1
        if kills >= min_kills:
            proc = start(base_dir, data_dir, stage, *extra)  # let the last one finish
            proc.communicate(timeout=600)
            break
    assert proc.returncode == 0, proc.stdout.read() if proc.stdout else ""
    return kills
