"""Report: assembled from a run directory where some stages ran, some did not and one left bad input."""
import json
import os

import matplotlib.image
import ml_collections
import pytest

from nanochat_jax import report


def _write_log(base, stage, records, extra_lines=()):
    os.makedirs(base / "logs", exist_ok=True)
    with open(base / "logs" / f"{stage}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.writelines(extra_lines)


@pytest.fixture
def run_dir(tmp_path):
    """tokenizer, base, base_eval, sft and chat_eval ran; mid, rl and rl_eval did not."""
    base = tmp_path / "run"
    report.write_section(str(base), "tokenizer", "## Tokenizer\n\nvocab 600", {"vocab_size": 600, "seconds": 12.0})
    report.write_section(str(base), "base", "## Base training\n\n![loss](base_loss.png)",
                         {"val_bpb_final": 1.2345, "steps": 20, "seconds": 3600.0})
    report.write_section(str(base), "base_eval", "## CORE\n\nCORE 0.1", {"CORE": 0.1017, "seconds": 60.0})
    report.write_section(str(base), "sft", "## SFT", {"val_loss": 1.9, "seconds": 300.0})
    report.write_section(str(base), "chat_eval", "## Chat evals",
                         {"ARC-Easy": 0.31, "ARC-Challenge": 0.25, "MMLU": 0.27, "GSM8K": 0.02,
                          "HumanEval": 0.0, "ChatCORE": 0.05, "seconds": 36.0})
    _write_log(base, "base", [dict(step=s, loss=5 - s / 10, loss_ema=5 - s / 11, **({"val_bpb": 2 - s / 40} if s % 5 == 0
                                                                                 else {})) for s in range(1, 21)],
               extra_lines=['{"step": 21, "loss": 3.\n'])  # a line cut short by a killed run
    _write_log(base, "sft", [dict(step=s, loss=2 - s / 100, val_loss=2.1 - s / 100) for s in range(1, 11)])
    return base


def _table_row(md, name):
    return next(line for line in md.splitlines() if line.startswith(f"| {name} |"))


def test_report_with_missing_stages(run_dir):
    config = ml_collections.ConfigDict({"base_dir": str(run_dir), "report": {"gpu_hour_price": 2.5}})
    assert report.stage_done(config, "report") is False
    result = report.run_stage(config, "report")
    md_path, pngs = result["outputs"][0], result["outputs"][1:]
    assert md_path == str(run_dir / "report.md") and result["report"] == ""
    assert result["metrics"] == {"gpu_hour_price": 2.5}
    md = open(md_path).read()
    # header: commit, hardware, versions, wall time summed over the stage jsons (12+3600+60+300+36 s)
    assert "- commit: `" in md and "- hardware:" in md and "jax " in md
    assert "- wall time: 1h06m48s over 5 timed stage(s)" in md
    assert "- cost:" in md  # $ x GPUs on a GPU machine, "n/a (no GPU ...)" on this one
    # summary: ours beside the card; stages that did not run say so
    assert _table_row(md, "CORE") == "| CORE | 0.1017 | - | - | - | 0.2219 (BASE) |"
    assert _table_row(md, "val bpb") == "| val bpb | 1.2345 | not run | - | - | 0.81 (BASE) |"
    assert _table_row(md, "GSM8K") == "| GSM8K | - | - | 0.0200 | not run | 0.0455 (SFT), 0.0758 (RL) |"
    assert _table_row(md, "ARC-Easy") == "| ARC-Easy | - | - | 0.3100 | not run | 0.3876 (SFT) |"
    # sections in pipeline order, missing ones "not run", images re-rooted at report/
    for stage in ("mid", "rl", "rl_eval"):
        assert f"## {stage}\n\nnot run" in md
    assert md.index("## Tokenizer") < md.index("## Base training") < md.index("## CORE") < md.index("## SFT")
    assert "![loss](report/base_loss.png)" in md
    assert "logs/base.jsonl: 1 malformed line(s) skipped" in md
    # the pipeline then records the report stage's metrics: report.md is rebuilt with the same price
    assert "$2.5/GPU-hour" in md
    report.write_section(str(run_dir), "report", "", {**result["metrics"], "seconds": 1.0})
    rebuilt = (run_dir / "report.md").read_text()
    assert "$2.5/GPU-hour" in rebuilt and "## report" not in rebuilt and "over 6 timed stage(s)" in rebuilt
    # plots: curves and evals; no RL reward curve without an RL log
    names = sorted(os.path.basename(p) for p in pngs)
    assert names == ["report_curves.png", "report_evals.png"]
    for p in pngs:
        assert f"](report/{os.path.basename(p)})" in md
        h, w, _ = matplotlib.image.imread(p).shape
        assert h > 200 and w > 500


def test_rl_reward_plot_and_unreadable_metrics(run_dir):
    _write_log(run_dir, "rl", [dict(step=s, loss=0.1, mean_reward=s / 30) for s in range(1, 31)])
    (run_dir / "report" / "rl_eval.json").write_text("{not json")
    outputs = report.build(str(run_dir), gpu_hour_price=None)
    assert os.path.basename(outputs[-1]) == "report_rl_reward.png"
    md = open(outputs[0]).read()
    assert "rl_eval.json: unreadable" in md and "- cost:" not in md
    assert _table_row(md, "GSM8K").split(" | ")[4] == "not run"


def test_empty_run_dir_and_cli(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main(["--base_dir", str(empty)]) == 0
    md = (empty / "report.md").read_text()
    assert all(f"## {s}\n\nnot run" in md for s in ("tokenizer", "base", "sft", "rl"))
    assert _table_row(md, "CORE").startswith("| CORE | not run |")
    assert report.main(["--base_dir", str(tmp_path / "nope")]) == 2
    assert "no run directory" in capsys.readouterr().err
