"""The whole pipeline on a shortened embedded default, offline: every stage, then the same run SIGKILLed at random
moments (in whatever stage is running) and rerun until done, which must end exactly where the uninterrupted run did."""
import json
import os
import random
import time

import numpy as np
import pipeline_runs
import pytest

# every stage in a few steps; the chat evals and RL on few short problems
FLAGS = [
    "--config.train.num_iterations=12", "--config.mid.num_iterations=8", "--config.sft.num_iterations=8",
    "--config.eval.chat_tasks=SpellingBee,Arithmetic,HumanEval", "--config.eval.chat_max_problems=8",
    "--config.eval.max_new_tokens=24", "--config.eval.generate_batch_size=8",
    "--config.rl.train_examples=24", "--config.rl.examples_per_step=4", "--config.rl.num_samples=4",
    "--config.rl.max_prompt_tokens=32", "--config.rl.max_new_tokens=24", "--config.rl.device_batch_size=4",
    "--config.rl.eval_every=3", "--config.rl.eval_examples=8", "--config.rl.eval_samples=2", "--config.rl.save_every=2",
]
ALL = "tokenizer,base,base_eval,mid,sft,chat_eval,rl,rl_eval,report"
TRAINING = ("base", "mid", "sft", "rl")
EVALS = ("chat_eval", "rl_eval")
TIMING = ("seconds", "tok_s", "per_s", "mfu")  # substrings of the keys that measure time


def _numbers(run_dir, stage):
    """A stage's reported numbers without the ones that measure time."""
    with open(run_dir / "report" / f"{stage}.json") as f:
        return {k: v for k, v in json.load(f).items() if not any(t in k for t in TIMING)}


def _final_params(run_dir, stage):
    from nanochat_jax.checkpoint import restore_model
    params, _, meta = restore_model(str(run_dir), stage)
    return meta["step"], params


def _leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    t0 = time.time()
    out = pipeline_runs.run(root / "reference", root / "data", ALL, *FLAGS, timeout=1200)
    return root, out, time.time() - t0


def test_every_stage_runs_offline_and_reports(reference):
    root, out, _ = reference
    run = root / "reference"
    for stage in ALL.split(","):
        assert f"stage {stage}: done" in out, stage
        assert (run / "report" / f"{stage}.json").exists(), stage
    report = (run / "report.md").read_text()
    for heading in ("Base training", "Midtraining", "Supervised fine-tuning", "Chat evals"):
        assert heading in report
    assert "chat:   python -m nanochat_jax.chat_app" in out and "--stage rl" in out
    base = _numbers(run, "base")
    assert base["val_bpb_final"] < base["val_bpb_step0"]
    for stage in EVALS:
        assert set(_numbers(run, stage)) >= {"SpellingBee", "Arithmetic", "HumanEval"}


def test_killed_anywhere_ends_like_the_uninterrupted_run(reference):
    root, _, seconds = reference
    run = root / "killed"
    rng, kills, stages_hit = random.Random(2024), 0, []
    for _ in range(30):
        proc = pipeline_runs.start(run, root / "data", ALL, *FLAGS)
        try:
            proc.wait(timeout=rng.uniform(3.0, max(6.0, seconds / 5)))  # past start-up, anywhere in a stage
        except Exception:
            proc.kill()
            proc.wait()
            kills += 1
            log = (run / "logs" / "pipeline.log").read_text() if (run / "logs" / "pipeline.log").exists() else ""
            started = [line.split("stage ")[1].split(":")[0] for line in log.splitlines() if ": starting" in line]
            stages_hit.append(started[-1] if started else "start-up")
            if kills >= 6:
                break
            continue
        break  # finished before the timer: done
    out = pipeline_runs.run(run, root / "data", ALL, *FLAGS, timeout=1200)  # the last rerun finishes
    assert kills >= 6, stages_hit
    print("killed during:", stages_hit)
    ref = root / "reference"
    for stage in TRAINING:
        want = {r["step"]: r["loss"] for r in pipeline_runs.metric_steps(ref, stage)}
        got = pipeline_runs.metric_steps(run, stage)
        assert [r["step"] for r in got] == sorted(want), stage  # every step logged once
        assert {r["step"]: r["loss"] for r in got} == want, stage  # the same data order and losses
        (step_a, a), (step_b, b) = _final_params(ref, stage), _final_params(run, stage)
        assert step_a == step_b
        for x, y in zip(_leaves(a), _leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)  # bitwise the same final weights
    for stage in ("base", "mid", "sft", "rl", *EVALS):
        assert _numbers(run, stage) == _numbers(ref, stage), stage
    assert "stage report: done" in out  # the report is rebuilt; the stages that finished before are skipped
    assert "stage tokenizer: complete, skipped" in out
