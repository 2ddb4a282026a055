"""mid and sft as the pipeline runs them: from the parent checkpoint, resumable after SIGKILL with the same
data order, a chat model at the end that load_model, the Python API and the CLI chat use."""
import json
import os
import random
import shutil
import subprocess
import sys

import pipeline_runs
import pytest


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A base_dir with the tokenizer and a short base training done (shared by the tests here)."""
    root = tmp_path_factory.mktemp("chat")
    pipeline_runs.run(root / "template", root / "data", "tokenizer,base", "--config.train.num_iterations=6")
    return root


def _copy(root, name):
    shutil.copytree(root / "template", root / name)
    return root / name


@pytest.mark.parametrize("stage", ["mid", "sft"])
def test_chat_stage_resumes_after_sigkill_with_the_same_rows(base_run, stage):
    data = base_run / "data"
    parents = {"mid": "", "sft": "mid"}[stage]
    ref = _copy(base_run, f"{stage}_reference")
    if parents:
        pipeline_runs.run(ref, data, parents, "--config.train.num_iterations=6")
    killed = base_run / f"{stage}_killed"
    shutil.copytree(ref, killed)  # the same parent checkpoints
    out = pipeline_runs.run(ref, data, stage, "--config.train.num_iterations=6")
    assert f"{stage} checkpoint:" in out
    reference = {r["step"]: r["loss"] for r in pipeline_runs.metric_steps(ref, stage)}
    assert sorted(reference) == list(range(1, 13))
    kills = pipeline_runs.kill_until_done(killed, data, stage, random.Random(7), 3, 0.1,
                                          "--config.train.num_iterations=6")
    assert kills >= 3
    resumed = pipeline_runs.metric_steps(killed, stage)
    assert [r["step"] for r in resumed] == list(range(1, 13)), "every step logged exactly once"
    assert {r["step"]: r["loss"] for r in resumed} == reference  # bit-identical: same rows in the same order
    section = (killed / "report" / f"{stage}.md").read_text()
    assert {"mid": "val_bpb", "sft": "val_loss"}[stage] in section and "conversations" in section
    metrics = json.loads((killed / "report" / f"{stage}.json").read_text())
    assert metrics["steps"] == 12 and metrics["bad_conversations_skipped"] == 0
    if stage == "sft":  # the chat model at the end: Python API and CLI
        from nanochat_jax import load_model
        model, tok, meta = load_model("sft", base_dir=str(killed))
        assert meta["step"] == 12 and meta["stage"] == "sft"
        reply = model.chat([{"role": "user", "content": "What is 2 + 3?"}], max_tokens=8, temperature=0.0)
        assert isinstance(reply, str)
        cli = subprocess.run([sys.executable, "-m", "nanochat_jax.chat_cli", "--stage", "sft", "-p", "2 + 3 = ?"],
                             cwd=pipeline_runs.REPO, capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, NANOCHAT_BASE_DIR=str(killed), JAX_PLATFORMS="cpu"))
        assert cli.returncode == 0, cli.stderr
