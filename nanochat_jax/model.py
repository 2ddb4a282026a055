"""The GPT of SPEC.md §1–3: dimensions, init, the forward pass, the cached forward, FLOPs.

    x = norm(wte[tokens])
    for each layer:  x = x + attn(norm(x));  x = x + mlp(norm(x))
    logits = softcap(norm(x) @ lm_head)

attn is causal self-attention with GQA, its q and k rotated by RoPE then normed (QK-norm); mlp is
relu(h @ w_fc)² @ w_proj; norm is RMSNorm without weights. Params are a pytree of fp32 arrays, the blocks'
weights stacked over a leading layer axis L in (in, out) layout; matmuls run in the compute dtype and
accumulate in fp32; norms, RoPE tables, softcap and the loss run in fp32. The GPU kernels that replace
some of these steps on the fast path live in nanochat_jax/kernels/, behind `ModelConfig.kernels`; shape
suffixes (x_BxTxD) follow the legend in nanochat_jax/__init__.py.

Run `python -m nanochat_jax.model --depth 20 --summary` for parameter counts and FLOPs/token.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from nanochat_jax import kernels
from nanochat_jax.config import ConfigError
from nanochat_jax.kernels import add_norm, cross_entropy, relu2_mlp, rope_qk_norm
from nanochat_jax.sharding import gpu_compute_capability

ROPE_BASE = 10000.0
SOFTCAP = 15.0

# ----------------------------------------------------------------------------------------------
# Config: the model's shape (SPEC §1), how a forward runs, and the engine's state, composed


@dataclasses.dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    depth: int
    d_model: int
    n_head: int
    n_kv_head: int
    head_dim: int
    sequence_len: int

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int = 65536, sequence_len: int = 2048, n_kv_head: int = 0,
                   aspect_ratio: int = 64, head_dim: int = 128) -> "ModelShape":
        """SPEC §1: every dimension from depth. n_kv_head 0 = one kv head per query head."""
        d_model = aspect_ratio * depth
        n_head = max(1, math.ceil(d_model / head_dim))
        return cls(vocab_size, depth, d_model, n_head, n_kv_head or n_head, head_dim, sequence_len)

    def __post_init__(self):
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ConfigError(f"config.model.n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.head_dim % 2:
            raise ConfigError(f"config.model.head_dim must be even (RoPE rotates halves), got {self.head_dim}")


REMAT_POLICIES = {  # what each block saves for the backward pass (remat "none": everything)
    "full": None,  # save nothing, recompute the whole block
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a forward runs: each choice computes the same math, up to rounding. 'auto' (compute_dtype,
    attention) is resolved for the running backend when a ModelConfig is built; kernels='auto' picks each
    kernel by its own availability where it runs (nanochat_jax/kernels/__init__.py)."""
    compute_dtype: str = "float32"  # bfloat16 | float32 | auto (float64: numerical tests, with jax's x64)
    attention: str = "xla"  # cudnn (flash attention, training only) | xla | auto
    kernels: str = "xla"  # the one switch of nanochat_jax/kernels/: auto | pallas | xla
    remat: str = "none"  # none | a key of REMAT_POLICIES
    loss_chunk: int = 0  # >0: the loss over chunks of this many positions x all rows, never the whole logits
    residual_dtype: str = "float32"  # float32 | compute (the reference's bf16 residual stream under autocast)
    scan_layers: bool = True  # False: one traced copy of the block per layer (same params, no while loop)

    def __post_init__(self):
        choices = dict(compute_dtype=("bfloat16", "float32", "float64", "auto"), attention=("cudnn", "xla", "auto"),
                       remat=("none", *REMAT_POLICIES), residual_dtype=("float32", "compute"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config.model.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        kernels.check(self.kernels)
        if self.compute_dtype == "float64" and not jax.config.jax_enable_x64:
            raise ConfigError("config.model.compute_dtype='float64' needs jax's 64-bit mode (JAX_ENABLE_X64=1)")
        if self.attention == "cudnn" and self.compute_dtype not in ("bfloat16", "auto"):
            raise ConfigError("config.model.attention='cudnn' needs compute_dtype='bfloat16' (cuDNN flash attention "
                              "has no fp32 kernel); use attention='xla' or 'auto'")
        if self.loss_chunk < 0:
            raise ConfigError(f"config.model.loss_chunk must be >= 0, got {self.loss_chunk}")

    def resolved(self) -> "RunOptions":
        """'auto': bf16 on GPUs with compute capability >= 8.0 (fp32 on CPU, T4, V100); cuDNN attention on a
        GPU in bf16 (its flash kernel is bf16/fp16 only), XLA elsewhere."""
        if "auto" not in (self.compute_dtype, self.attention):
            return self
        cc = gpu_compute_capability()
        dtype = self.compute_dtype
        if dtype == "auto":
            dtype = "bfloat16" if cc is not None and cc >= 8.0 else "float32"
        attention = self.attention
        if attention == "auto":
            attention = "cudnn" if cc is not None and dtype == "bfloat16" else "xla"
        return dataclasses.replace(self, compute_dtype=dtype, attention=attention)


@dataclasses.dataclass(frozen=True)
class EngineState:
    """What the engine changes between its calls of the cached forward."""
    weight_layout: str = "in_out"  # of the block weights; "out_in" only in inference_params' output
    attend_len: int = 0  # >0: cached attention reads only cache slots [0, attend_len) (all positions < it)

    def __post_init__(self):
        if self.weight_layout not in ("in_out", "out_in"):
            raise ConfigError(f"weight_layout must be in_out or out_in, got {self.weight_layout!r}")
        if self.attend_len < 0:
            raise ConfigError(f"attend_len must be >= 0, got {self.attend_len}")


_PARTS = {"shape": ModelShape, "options": RunOptions, "engine": EngineState}


@dataclasses.dataclass(frozen=True, init=False)
class ModelConfig:
    """ModelShape + RunOptions + EngineState. Built from their fields by name (ModelConfig(depth=.., ...)),
    read the same way (cfg.depth, cfg.kernels, cfg.attend_len), and dataclasses.replace(cfg, attend_len=..)
    replaces the field in its part. 'auto' options are resolved here."""
    shape: ModelShape
    options: RunOptions
    engine: EngineState

    def __init__(self, shape: ModelShape | None = None, options: RunOptions | None = None,
                 engine: EngineState | None = None, **fields):
        given = dict(shape=shape, options=options, engine=engine)
        for name, cls in _PARTS.items():
            mine = {f.name: fields.pop(f.name) for f in dataclasses.fields(cls) if f.name in fields}
            part = cls(**mine) if given[name] is None else dataclasses.replace(given[name], **mine)
            object.__setattr__(self, name, part.resolved() if name == "options" else part)
        if fields:
            raise TypeError(f"ModelConfig: unknown fields {sorted(fields)}")

    def __getattr__(self, name):  # called only for names that are not attributes: the parts' fields
        if name not in _PARTS:
            for part in _PARTS:
                part = object.__getattribute__(self, part)
                if name in part.__dataclass_fields__:
                    return getattr(part, name)
        raise AttributeError(f"ModelConfig has no field {name!r}")

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    @property
    def acc_dtype(self):
        """Accumulation / norm / loss dtype: fp32 (fp64 only when computing in fp64)."""
        return jnp.promote_types(self.dtype, jnp.float32)

    @property
    def residual(self):
        """dtype of the residual stream between blocks (never below fp32 when computing in fp64)."""
        return self.dtype if self.residual_dtype == "compute" else self.acc_dtype

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int = 65536, sequence_len: int = 2048, n_kv_head: int = 0, *,
                   aspect_ratio: int = 64, head_dim: int = 128, compute_dtype: str = "auto", attention: str = "auto",
                   kernels: str = "auto", **options) -> "ModelConfig":
        """SPEC §1's shape from depth, with RunOptions (by name); 'auto' resolves for the running backend."""
        return cls(ModelShape.from_depth(depth, vocab_size, sequence_len, n_kv_head, aspect_ratio, head_dim),
                   RunOptions(compute_dtype=compute_dtype, attention=attention, kernels=kernels), **options)

    @classmethod
    def from_config(cls, config) -> "ModelConfig":
        """From a ConfigDict: config.model.* and config.tokenizer.vocab_size."""
        shape, options = parts_of(config)
        return cls(shape, options)



def parts_of(config) -> tuple[ModelShape, RunOptions]:
    """The model's shape and options as a ConfigDict states them ('auto' unresolved): building them is
    config.validate's check of the model section."""
    m = config.model
    shape = ModelShape.from_depth(m.depth, config.tokenizer.vocab_size, m.sequence_len, m.n_kv_head,
                                  m.aspect_ratio, m.head_dim)
    options = RunOptions(**{f.name: m[f.name] for f in dataclasses.fields(RunOptions)})
    return shape, options


# ----------------------------------------------------------------------------------------------
# Parameter-free pieces of SPEC §2


def rms_norm(x):
    """RMSNorm without weights over the last axis, computed in fp32 (at least), returned in x's dtype;
    eps is torch's F.rms_norm default, finfo(x.dtype).eps. (x * x, not jnp.square: autodiff of the
    latter keeps a full-size 2x for the backward pass; this keeps only x and the (.., 1) rsqrt.)"""
    eps = float(jnp.finfo(x.dtype).eps)
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def norm(x: add_norm.Residual):
    """The norm of the residual stream, computed with the add that made it (kernels/add_norm.py)."""
    return x.norm


def rope_tables(positions_BxT, head_dim: int, dtype):
    """cos, sin of shape (B, T, head_dim/2) for integer positions."""
    inv_freq = 1.0 / (ROPE_BASE ** (jnp.arange(0, head_dim, 2, dtype=dtype) / head_dim))
    freqs = positions_BxT.astype(dtype)[..., None] * inv_freq
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x_BxTxNxE, cos_BxTxP, sin_BxTxP):
    """Half-split rotation: y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos. Written as one element-wise
    expression over x viewed (.., 2, P) with the halves swapped by a reverse, so neither direction has
    a split, concatenate or pad for XLA to materialise."""
    *lead, E = x_BxTxNxE.shape
    x = x_BxTxNxE.reshape(*lead, 2, E // 2)
    cos = jnp.stack([cos_BxTxP, cos_BxTxP], axis=-2)[:, :, None]  # (B, T, 1, 2, P)
    sin = jnp.stack([sin_BxTxP, -sin_BxTxP], axis=-2)[:, :, None]
    return (x * cos + jnp.flip(x, axis=-2) * sin).reshape(x_BxTxNxE.shape)


def softcap(logits):
    return SOFTCAP * jnp.tanh(logits / SOFTCAP)


def matmul(x, w, dtype, out_in: bool = False):
    """x @ w in `dtype`: the GEMM accumulates in fp32 and rounds its output to `dtype`, as torch autocast
    does. Callers that need fp32 (residual adds, logits) widen the result afterwards rather than asking the
    GEMM for fp32, so the backward pass rounds the fp32 cotangent to bf16 before the two transposed GEMMs
    (as fp32 GEMMs they run at a fraction of the bf16 rate). out_in: w is stored (out, in)."""
    return lax.dot_general(x.astype(dtype), w.astype(dtype), (((x.ndim - 1,), (1 if out_in else 0,)), ((), ())),
                           preferred_element_type=dtype)


# ----------------------------------------------------------------------------------------------
# Init (SPEC §3)


def _matrix_init(key, shape, dtype=jnp.float32):
    """N(0, std), std = 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in)) for an (in, out) weight."""
    fan_in, fan_out = shape[-2], shape[-1]
    std = fan_in ** -0.5 * min(1.0, (fan_out / fan_in) ** 0.5)
    return std * jax.random.normal(key, shape, dtype)


class Weight(nn.Module):
    """A bias-free fp32 weight of `shape`, as a module so that it has its own name in the params tree
    (its leaf is Flax's 'kernel')."""
    shape: tuple[int, int]
    init: Callable[..., Any] = _matrix_init

    @nn.compact
    def __call__(self):
        return self.param("kernel", self.init, self.shape, jnp.float32)


def weight(cfg: ModelConfig, name: str, n_in: int, n_out: int, init=_matrix_init):
    """A block's weight, stored (in, out), or (out, in) in inference_params' output."""
    return Weight((n_out, n_in) if cfg.weight_layout == "out_in" else (n_in, n_out), init, name=name)()


# ----------------------------------------------------------------------------------------------
# The forward pass (SPEC §2)


def cached_attention(q_BxTxHxE, k_BxGxSxE, v_BxGxSxE, q_pos_BxT, scale):
    """Queries at positions q_pos attend to the cache slots at positions <= their own. The cache keeps
    (kv head, position, head dim) minor-most, so both products batch over (row, kv head) with the
    contracted axis already in place: XLA reads the cache once, with no transposed copy."""
    B, T, H, E = q_BxTxHxE.shape
    G, S = k_BxGxSxE.shape[1], k_BxGxSxE.shape[2]
    acc = jnp.promote_types(q_BxTxHxE.dtype, jnp.float32)
    q = q_BxTxHxE.reshape(B, T, G, H // G, E)  # GQA: query head h uses kv head h // (H / G)
    logits = jnp.einsum("btkgd,bksd->bkgts", q, k_BxGxSxE, preferred_element_type=acc) * scale
    visible_BxTxS = jnp.arange(S)[None, None, :] <= q_pos_BxT[:, :, None]
    logits = jnp.where(visible_BxTxS[:, None, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BxGxSxE.dtype)
    y = jnp.einsum("bkgts,bksd->btkgd", probs, v_BxGxSxE, preferred_element_type=v_BxGxSxE.dtype)
    return y.reshape(B, T, H, E)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_BxTxD, layer, cos, sin, q_pos_BxT, cache, choice):
        cfg = self.cfg
        B, T, D = h_BxTxD.shape
        H, G, E = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        out_in = cfg.weight_layout == "out_in"
        # q, k and v from one GEMM (h is read once, dh is one GEMM); they stay three weights (Muon, export)
        # until inference_params fuses them once
        if out_in:
            w_qkv = weight(cfg, "c_qkv", D, (H + 2 * G) * E)
        else:
            w_qkv = jnp.concatenate([weight(cfg, "c_q", D, H * E), weight(cfg, "c_k", D, G * E),
                                     weight(cfg, "c_v", D, G * E)], axis=1)
        qkv_BxTxNxE = matmul(h_BxTxD, w_qkv, cfg.dtype, out_in).reshape(B, T, H + 2 * G, E)
        q, k, v = rope_qk_norm.rope_qk_norm(qkv_BxTxNxE, cos, sin, H, G, choice)  # norm(rope(q)), norm(rope(k))
        scale = 1.0 / math.sqrt(E)
        if cache is None:  # jax groups the H query heads over the G kv heads (GQA)
            y = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=cfg.attention)
        else:  # XLA with an explicit mask: cuDNN's causal mask is aligned to the top-left corner, wrong for a
            # chunk that starts at position p > 0, and jax's cuDNN path takes no mask
            rows_BxT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
            # (layer, row, :, :, position) picks a (B, T) grid of (2, G, E) slots: k and v in one write
            cache = cache.at[layer, rows_BxT, :, :, q_pos_BxT].set(jnp.stack([k, v], axis=2))
            S = cfg.attend_len or cache.shape[4]  # the caller promises every position is < attend_len
            y = cached_attention(q, cache[layer, :, 0, :, :S], cache[layer, :, 1, :, :S], q_pos_BxT, scale)
        w_out = weight(cfg, "c_proj", H * E, D, nn.initializers.zeros)
        return matmul(y.reshape(B, T, H * E), w_out, cfg.dtype, out_in), cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_BxTxD, choice):
        cfg, D = self.cfg, self.cfg.d_model
        w_fc = weight(cfg, "c_fc", D, 4 * D)
        w_proj = weight(cfg, "c_proj", 4 * D, D, nn.initializers.zeros)
        return relu2_mlp.mlp(h_BxTxD, w_fc, w_proj, cfg.dtype, choice, cfg.weight_layout == "out_in")


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, layer, cos, sin, q_pos_BxT):
        x, cache = carry  # x: the residual stream with its norm (add_norm.Residual)
        y, cache = Attention(self.cfg, name="attn")(norm(x), layer, cos, sin, q_pos_BxT, cache, x.choice)
        x = x + y
        x = x + MLP(self.cfg, name="mlp")(norm(x), x.choice)
        return (x, cache), None


class GPT(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.wte = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=nn.initializers.normal(1.0))
        self.block = Block
        if cfg.remat != "none":
            self.block = nn.remat(Block, prevent_cse=False, policy=REMAT_POLICIES[cfg.remat])
        self.blocks = nn.scan(self.block, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.depth)(cfg)
        self.lm_head = Weight((cfg.d_model, cfg.vocab_size), nn.initializers.zeros)

    def hidden(self, tokens_BxT, positions_B=None, cache=None):
        """norm(x) after the last layer (B, T, D) in the residual dtype, and the updated cache (None when
        training). The cached forward runs no kernel: they are written for training's whole rows."""
        cfg = self.cfg
        B, T = tokens_BxT.shape
        if positions_B is None:
            q_pos_BxT = None
            cos, sin = rope_tables(jnp.arange(T)[None, :], cfg.head_dim, cfg.acc_dtype)
        else:
            q_pos_BxT = positions_B.astype(jnp.int32)[:, None] + jnp.arange(T, dtype=jnp.int32)
            cos, sin = rope_tables(q_pos_BxT, cfg.head_dim, cfg.acc_dtype)
        x = add_norm.Residual.of(rms_norm(self.wte(tokens_BxT).astype(cfg.residual)),
                                 cfg.kernels if cache is None else "xla")
        if cfg.scan_layers or self.is_initializing():
            (x, cache), _ = self.blocks((x, cache), jnp.arange(cfg.depth), cos, sin, q_pos_BxT)
        else:  # the same stacked params, one block per layer in the program: no while loop around the
            # layers (a decode step then updates its KV cache in place instead of copying it per layer).
            # Unstacked once, so the gradient is one concatenate (indexing p[i] per layer differentiates
            # to a sum of L zero-padded copies, which XLA fuses into every consumer of the stacked gradient).
            leaves, treedef = jax.tree.flatten(self.variables["params"]["blocks"])
            per_layer = [lax.unstack(p) for p in leaves]
            block = self.block(cfg, parent=None)  # a free-standing module, applied to each layer's params
            for i in range(cfg.depth):
                layer = treedef.unflatten([p[i] for p in per_layer])
                (x, cache), _ = block.apply({"params": layer}, (x, cache), i, cos, sin, q_pos_BxT)
        return norm(x), cache

    def head(self, x_BxTxD):
        """Softcapped logits in fp32."""
        return softcap(matmul(x_BxTxD, self.lm_head(), self.cfg.dtype).astype(self.cfg.acc_dtype))

    def __call__(self, tokens_BxT, positions_B=None, cache=None):
        x, cache = self.hidden(tokens_BxT, positions_B, cache)
        return self.head(x), cache


# ----------------------------------------------------------------------------------------------
# Functional API (the contract other modules code against)


def init_params(cfg: ModelConfig, rng) -> dict:
    """fp32 params: {'wte': {'embedding'}, 'blocks': {'attn': {c_q,c_k,c_v,c_proj}, 'mlp': {c_fc,c_proj}}
    (each {'kernel': (L, in, out)}), 'lm_head': {'kernel': (D, V)}}."""
    # The init trace runs a forward on one token: XLA attention there avoids cuDNN's shape limits (none of
    # these options has params, so they change nothing).
    model = GPT(dataclasses.replace(cfg, attention="xla", compute_dtype="float32", kernels="xla", remat="none",
                                    scan_layers=True, weight_layout="in_out"))
    return jax.jit(model.init)(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def logits_fn(params, cfg: ModelConfig, tokens_BxT):
    """(B, T, V) fp32 softcapped logits of a full causal forward."""
    return GPT(cfg).apply({"params": params}, tokens_BxT)[0]


def loss_fn(params, cfg: ModelConfig, inputs_BxT, targets_BxT, weights_BxT=None):
    """(loss, per-token losses (B, T) with 0 at ignored targets (-1)). The loss is the mean cross-entropy over
    targets != -1, or with `weights_BxT` the sum of weights x cross-entropy (the training step passes its
    weights already divided by the step's supervised-token count; RL's weights are advantages). Only the
    loss is differentiable when loss_chunk > 0."""
    model = GPT(cfg)
    x, _ = model.apply({"params": params}, inputs_BxT, method=GPT.hidden)
    if weights_BxT is None:
        weights_BxT = 1.0 / jnp.maximum(jnp.sum(targets_BxT != -1), 1)
    weights_BxT = jnp.where(targets_BxT != -1, weights_BxT, 0.0)
    if cfg.loss_chunk > 0:  # the same sum, never holding the (B, T, V) logits
        loss, losses = cross_entropy.chunked(x, params["lm_head"]["kernel"], targets_BxT, weights_BxT,
                                             min(cfg.loss_chunk, x.shape[1]), cfg.dtype, cfg.kernels)
        return loss, lax.stop_gradient(losses)
    losses = cross_entropy.token_losses(model.apply({"params": params}, x, method=GPT.head), targets_BxT)
    return jnp.sum(losses * weights_BxT), losses


def init_cache(cfg: ModelConfig, batch: int, max_len: int):
    """Empty KV cache (L, B, 2, G, S = max_len, E) in the compute dtype, [:, :, 0] keys, [:, :, 1]
    values: one array, so a step writes a layer's keys and values with one scatter."""
    return jnp.zeros((cfg.depth, batch, 2, cfg.n_kv_head, max_len, cfg.head_dim), cfg.dtype)


def inference_params(params, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
    """Params and config for generation: floats cast to the compute dtype once, block weights stored
    (out, in), and q, k, v fused into one c_qkv weight (rows q, then k, then v): a one-row decode product
    then reads each weight row contiguously, which XLA streams faster than the (in, out) layout's columns
    (bench/gemv.py). The LM head keeps (in, out), measured as fast."""
    if cfg.weight_layout == "out_in":
        return params, cfg
    cast = lambda p: p.astype(cfg.dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p
    blocks = jax.tree.map(lambda w: jnp.swapaxes(cast(w), -1, -2), params["blocks"])
    attn = blocks["attn"]
    attn = {"c_qkv": {"kernel": jnp.concatenate([attn[n]["kernel"] for n in ("c_q", "c_k", "c_v")], axis=1)},
            "c_proj": attn["c_proj"]}
    params = {name: jax.tree.map(cast, tree) for name, tree in params.items() if name != "blocks"}
    params["blocks"] = {**blocks, "attn": attn}
    return params, dataclasses.replace(cfg, weight_layout="out_in")


def forward_cached(params, cfg: ModelConfig, tokens_BxT, cache, positions_B):
    """Row b's tokens sit at positions[b]..positions[b]+T-1 (must stay < max_len); they are written
    into the cache and attend to cache entries at positions <= their own. Returns (logits fp32, cache)."""
    return GPT(cfg).apply({"params": params}, tokens_BxT, positions_B, cache)


def param_counts(cfg: ModelConfig) -> dict:
    """Parameter counts per group and in total, from shapes only (jax.eval_shape, no allocation)."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    size = lambda tree: sum(math.prod(a.shape) for a in jax.tree.leaves(tree))
    counts = {"wte": size(shapes["wte"]), "attn": size(shapes["blocks"]["attn"]),
              "mlp": size(shapes["blocks"]["mlp"]), "lm_head": size(shapes["lm_head"])}
    counts["total"] = sum(counts.values())
    return counts


def estimate_flops(cfg: ModelConfig) -> float:
    """Training FLOPs per token (SPEC §4): 6 * (n_params - n_wte) + 12 * L * H * head_dim * T."""
    counts = param_counts(cfg)
    attn = 12 * cfg.depth * cfg.n_head * cfg.head_dim * cfg.sequence_len
    return float(6 * (counts["total"] - counts["wte"]) + attn)


def main(argv=None):
    p = argparse.ArgumentParser(description="Print the size of the depth-d GPT (no allocation).")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--vocab-size", type=int, default=65536)
    p.add_argument("--sequence-len", type=int, default=2048)
    p.add_argument("--n-kv-head", type=int, default=0)
    p.add_argument("--summary", action="store_true", help="print params per group, FLOPs/token, bytes")
    args = p.parse_args(argv)
    try:
        cfg = ModelConfig.from_depth(args.depth, args.vocab_size, args.sequence_len, args.n_kv_head,
                                     compute_dtype="float32", attention="xla")
    except ConfigError as e:
        p.error(str(e))
    counts = param_counts(cfg)
    print(f"d{cfg.depth}: {cfg.depth} layers, d_model {cfg.d_model}, {cfg.n_head} heads "
          f"({cfg.n_kv_head} kv) x {cfg.head_dim}, vocab {cfg.vocab_size}, seq {cfg.sequence_len}")
    if args.summary:
        for group, n in counts.items():
            print(f"  {group:<8} {n:>15,} params")
        print(f"  FLOPs/token (training) {estimate_flops(cfg):.3e}")
        print(f"  bytes of params        {4 * counts['total']:,} (fp32)")


if __name__ == "__main__":
    main()
