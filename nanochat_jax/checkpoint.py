"""Orbax checkpoints, one CheckpointManager per stage and run: <base_dir>/checkpoints/<stage>/<run_name>/<step>/.

A step directory holds four items: `params` and `opt_state` (array trees, restored straight onto the
mesh), `train` (JSON: step, RNG key, data-iterator state) and `meta` (JSON: the config, the tokenizer
hash, metrics). Orbax writes each step into a temporary directory and renames it when complete, so a
run killed mid-save never sees a half-written checkpoint: `latest_step()` lists only finished ones.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental.compilation_cache import compilation_cache

from nanochat_jax import paths
from nanochat_jax.config import UserError

ITEMS = ("params", "opt_state", "train", "meta")


checkpoint_dir = paths.checkpoint_dir  # callers import it from here


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
        self.directory = directory
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True, create=True)
        self.manager = ocp.CheckpointManager(directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, train: dict, meta: dict) -> None:
        """opt_state None: a params-only checkpoint (import_hf's), which restore_model reads and training
        cannot resume from."""
        items = dict(params=ocp.args.StandardSave(params), train=ocp.args.JsonSave(train), meta=ocp.args.JsonSave(meta))
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self.manager.save(step, force=True, args=ocp.args.Composite(**items))

    def restore(self, step: int, abstract_params, abstract_opt_state):
        """abstract_*: trees of jax.ShapeDtypeStruct carrying the target shardings."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params), opt_state=ocp.args.StandardRestore(abstract_opt_state),
            train=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return out.params, out.opt_state, out.train, out.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def use_compile_cache(base_dir: str, min_compile_secs: float = 1.0) -> str:
    """Keep compiled XLA programs in <base_dir>/xla_cache (JAX's persistent compilation cache): a
    resumed run or a second chat loads the train step / decode loop instead of compiling it again
    (d20: ~18 s for the step, ~16 s for the on-device decode loop on an H100). Entries are keyed by
    the program, compile options, jax version and device, so a changed config simply compiles anew."""
    path = os.path.abspath(os.path.join(base_dir, "xla_cache"))
    if jax.config.jax_compilation_cache_dir != path:
        compilation_cache.reset_cache()  # one process may run several runs' stages (the tests do)
        jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
    return path


def check_tokenizer(meta: dict, tokenizer_hash: str, where: str) -> None:
    """A model must never be paired with another tokenizer (the model card's release broke this way)."""
    if meta.get("tokenizer_hash") != tokenizer_hash:
        raise UserError(f"checkpoint {where} was trained with tokenizer {meta.get('tokenizer_hash', '?')[:12]}, but the "
                        f"tokenizer on disk is {tokenizer_hash[:12]}: restore the matching tokenizer or retrain")


def abstract_like(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _with_defaults(saved: dict) -> ml_collections.ConfigDict:
    """A checkpoint's config laid over today's schema: keys added since it was saved get their defaults,
    so an older checkpoint still loads (its own values win wherever it has them)."""
    from nanochat_jax.config import base_config

    def merge(into, values):
        for key, value in values.items():
            if isinstance(value, dict) and key in into and isinstance(into[key], ml_collections.ConfigDict):
                merge(into[key], value)
            else:
                into[key] = value

    config = base_config()
    with config.unlocked():
        merge(config, saved)
    return config


def restore_model(base_dir: str, stage: str, run_name: str | None = None, step: int | None = None):
    """Params of a finished (or in-progress) stage for inference -> (params, config, meta).

    Params land replicated on the default device set; `run_name` defaults to the only run of the stage.
    """
    from nanochat_jax import model as model_lib  # imported here: inference-only callers pay for it

    stage_dir = paths.checkpoint_dir(base_dir, stage)
    runs = sorted(os.listdir(stage_dir)) if os.path.isdir(stage_dir) else []
    if run_name is None:
        if len(runs) != 1:
            raise UserError(f"no checkpoint of stage '{stage}' under {os.path.abspath(base_dir)}" if not runs else
                            f"several runs of stage '{stage}' ({runs}): say which with run_name")
        run_name = runs[0]
    directory = checkpoint_dir(base_dir, stage, run_name)
    manager = ocp.CheckpointManager(directory, item_names=ITEMS, options=ocp.CheckpointManagerOptions(read_only=True))
    steps = manager.all_steps()
    if not steps or (step is not None and step not in steps):
        raise UserError(f"no checkpoint{'' if step is None else f' at step {step}'} in {directory} (have: {steps})")
    step = max(steps) if step is None else step
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    config = _with_defaults(json.loads(meta["config"]))
    model_cfg = model_lib.ModelConfig.from_config(config)
    abstract = jax.eval_shape(lambda: model_lib.init_params(model_cfg, jax.random.key(0)))
    params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract))).params
    manager.close()
    meta["step"] = step
    return params, config, meta
