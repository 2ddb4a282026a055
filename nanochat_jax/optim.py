"""The optimiser of SPEC §4, built from a config section so base, mid, SFT and RL reuse it.

Muon for every matrix inside the blocks, AdamW for the embedding and the LM head, all under one
global grad-norm clip and one LR multiplier (warmup, constant, linear warmdown).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from nanochat_jax.muon import muon

# Top-level params key -> optimiser group (SPEC §4).
_GROUPS = {"blocks": "muon", "wte": "embedding", "lm_head": "unembedding"}


def param_labels(params):
    """Same-structure pytree of 'muon' | 'embedding' | 'unembedding'; an unknown path is an error."""

    def label(path, leaf):
        name = jax.tree_util.keystr(path)
        top = getattr(path[0], "key", None) if path else None
        if top not in _GROUPS:
            raise ValueError(f"param_labels: no optimiser group for parameter {name} "
                             f"(top-level keys must be one of {sorted(_GROUPS)})")
        if _GROUPS[top] == "muon" and leaf.ndim != 3:
            raise ValueError(f"param_labels: {name} has shape {leaf.shape}; Muon needs stacked "
                             "matrices (L, in, out)")
        return _GROUPS[top]

    return jax.tree_util.tree_map_with_path(label, params)


def lr_multiplier(step, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    """LR multiplier at `step` (int or traced), as the reference's get_lr_multiplier.

    (step + 1) / warmup over the first round(warmup_ratio * N) steps, then 1.0 up to step
    N - warmdown, then linear down to `final_lr_frac`, which it reaches at step N (the reference's
    last loop step; the last update, step N - 1, gets final + (1 - final) / warmdown).
    """
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    step = jnp.asarray(step, jnp.float32)
    warm = (step + 1) / max(warmup, 1)
    progress = (num_iterations - step) / max(warmdown, 1)  # 1 at the warmdown start, 0 at step N
    down = progress + (1 - progress) * final_lr_frac
    return jnp.where(step < warmup, warm, jnp.where(step <= num_iterations - warmdown, 1.0, down))


def muon_momentum(step, train_cfg):
    """Muon momentum at `step`: linear from muon_momentum_start to _end over the warm-up steps."""
    steps = train_cfg.muon_momentum_warmup_steps
    frac = jnp.minimum(jnp.asarray(step, jnp.float32) / steps, 1.0) if steps else 1.0
    return (1 - frac) * train_cfg.muon_momentum_start + frac * train_cfg.muon_momentum_end


def build_optimizer(train_cfg, model_cfg, num_iterations) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) then Muon / AdamW per `param_labels`, every LR times the
    multiplier of the step. `train_cfg` is a config.train-shaped section."""
    t = ml_collections.FrozenConfigDict(train_cfg)  # the schedules read it at trace time: snapshot it

    def schedule(base_lr):
        return lambda step: base_lr * t.init_lr_frac * lr_multiplier(
            step, num_iterations, t.warmup_ratio, t.warmdown_ratio, t.final_lr_frac)

    # AdamW LRs were tuned at d_model 768; scale them as 1/sqrt(width) (SPEC §4).
    width_scale = (model_cfg.d_model / 768) ** -0.5

    def adamw(base_lr):
        return optax.adamw(schedule(base_lr * width_scale), b1=t.adam_b1, b2=t.adam_b2,
                           eps=t.adam_eps, weight_decay=t.weight_decay)

    groups = optax.multi_transform(
        {
            "muon": muon(schedule(t.matrix_lr), lambda step: muon_momentum(step, t), ns_dtype=model_cfg.dtype,
                         kernels=model_cfg.kernels),
            "embedding": adamw(t.embedding_lr),
            "unembedding": adamw(t.unembedding_lr),
        },
        param_labels,
    )
    clip = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
    return optax.chain(*clip, groups)
