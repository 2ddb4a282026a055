"""Run the nanochat_jax pipeline: tokenizer -> base -> base_eval -> mid -> sft -> chat_eval -> rl -> rl_eval -> report.

    python run_pipeline.py --config=configs/tiny.py                 # the embedded default, CPU, offline
    python run_pipeline.py --config=configs/d20.py --stages=base    # one stage
    python run_pipeline.py --config=configs/d20.py --config.train.device_batch_size=16
    python run_pipeline.py --config=configs/d20.py --dry_run       # the plan on 8 GPUs, checked on a CPU

Each stage is idempotent: a stage whose output is complete is skipped (--force redoes it); a stage
that was killed half-way resumes or redoes its work. Logs go to the console and <base_dir>/logs/.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import time

from nanochat_jax import xla_env

xla_env.set_training_defaults()  # before jax starts: memory fraction, collective sizes (a user's values win)

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from nanochat_jax import report
from nanochat_jax.config import STAGES, UserError, base_config, validate

_CONFIG = None  # defined by _parse_flags after _preflight: config_flags applies sys.argv's --config.* overrides
# to the default config as soon as the flag is defined, where a mistyped key would be a traceback
_STAGES = flags.DEFINE_string("stages", None, "Comma-separated stages to run (default: config.stages).")
_BASE_DIR = flags.DEFINE_string("base_dir", None, "Where the run writes everything (default: config.base_dir).")
_FORCE = flags.DEFINE_bool("force", False, "Redo the selected stages even if their output is complete.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Build every stage abstractly on fake CPU devices and print the plan "
                             "(steps, memory, files, time, cost); run nothing (nanochat_jax/dry_run.py).")
_DRY_RUN_DEVICES = flags.DEFINE_integer("dry_run_devices", 8, "GPUs the dry run plans for.")
_DRY_RUN_GPU = flags.DEFINE_string("dry_run_gpu", "H100", "GPU model the dry run plans for (H100 | H200).")

log = logging.getLogger("nanochat_jax")


def _setup_logging(base_dir: str) -> str:
    os.makedirs(os.path.join(base_dir, "logs"), exist_ok=True)
    path = os.path.join(base_dir, "logs", "pipeline.log")
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.removeHandler(absl_logging.get_absl_handler())  # app.run's stderr copy of every line: ours print once
    for chatty in ("absl", "jax._src.xla_bridge"):  # Orbax's per-save internals, JAX's "no TPU" notice
        logging.getLogger(chatty).setLevel(logging.WARNING)
    for handler in (logging.FileHandler(path), logging.StreamHandler(sys.stdout)):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    return path


def _select_stages(config) -> list[str]:
    stages = [s.strip() for s in (_STAGES.value or config.stages).split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UserError(f"--stages: unknown stage(s) {unknown}; known: {list(STAGES)}")
    return [s for s in STAGES if s in stages]  # always in pipeline order


def run(config, stages: list[str], force: bool = False) -> list[dict]:
    """Run the stages in order; returns one summary row per stage."""
    rows = []
    for name in stages:
        module = importlib.import_module(STAGES[name])
        # complete = its output is there and so is its report entry (a kill between the two reruns the stage,
        # which then finds its final checkpoint and only writes the report)
        recorded = os.path.exists(os.path.join(report.report_dir(config.base_dir), f"{name}.json"))
        if not force and recorded and module.stage_done(config, name):
            log.info("stage %s: complete, skipped (--force to redo)", name)
            rows.append(dict(stage=name, status="skipped (complete)", seconds=0.0, outputs=[]))
            continue
        log.info("stage %s: starting", name)
        t0 = time.time()
        result = module.run_stage(config, name)
        seconds = time.time() - t0
        metrics = {k: v for k, v in result.get("metrics", {}).items() if isinstance(v, (int, float))}
        report.write_section(config.base_dir, name, result.get("report", ""), dict(metrics, seconds=seconds))
        log.info("stage %s: done in %.1f s", name, seconds)
        rows.append(dict(stage=name, status="ran", seconds=seconds, outputs=result.get("outputs", []),
                         metrics=result.get("metrics", {})))
    return rows


def _print_summary(rows: list[dict], base_dir: str, log_path: str) -> None:
    print("\n=== nanochat_jax pipeline summary ===")
    for row in rows:
        print(f"{row['stage']:<10} {row['status']:<20} {row['seconds']:8.1f} s")
        for key, value in row.get("metrics", {}).items():
            print(f"{'':<10} {key}: {value:.4g}" if isinstance(value, float) else f"{'':<10} {key}: {value}")
        for out in row["outputs"]:
            print(f"{'':<10} -> {out}")
    print(f"report: {os.path.join(base_dir, 'report.md')}\nlog:    {log_path}")
    from nanochat_jax import chat_app  # imports gradio: only once the run is over
    command = chat_app.launch_command(base_dir)
    if command:
        print(f"chat:   {command}")


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]} (flags look like --config=configs/tiny.py)")
    config = _CONFIG.value
    if _BASE_DIR.value:
        config.base_dir = _BASE_DIR.value
    config.base_dir = os.path.expanduser(config.base_dir)
    validate(config)
    stages = _select_stages(config)
    if _DRY_RUN.value:  # jax is not imported yet: the dry run sets up its fake devices first
        from nanochat_jax import dry_run
        dry_run.main(config, stages, _DRY_RUN_DEVICES.value, _DRY_RUN_GPU.value)
        return
    log_path = _setup_logging(config.base_dir)
    log.info("config:\n%s", config)
    rows = run(config, stages, force=_FORCE.value)
    _print_summary(rows, config.base_dir, log_path)


def _preflight(argv: list[str]) -> None:
    """Catch the user's flag mistakes before absl/ml_collections turn them into tracebacks."""
    schema = base_config()  # every config file shares this schema
    for arg in argv[1:]:
        name, _, value = arg.partition("=")
        if name == "--config" and not os.path.isfile(value):
            raise UserError(f"--config={value}: no such file (choose one of configs/*.py)")
        if name.startswith("--config."):
            node, key = schema, name[len("--config."):]
            for part in key.split("."):
                if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                    raise UserError(f"unknown config key config.{key} (the keys are in nanochat_jax/config.py)")
                node = node[part]


def _parse_flags(argv):
    global _CONFIG
    try:
        _preflight(argv)
        _CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Path to a config file (configs/*.py).")
        return flags.FLAGS(argv)
    except (UserError, flags.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _main_without_traceback(argv):
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(_main_without_traceback, flags_parser=_parse_flags)
