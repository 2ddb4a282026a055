"""The GPT of SPEC.md §1–3 as Flax linen modules, used as pure functions of a params pytree.

Layers are stacked with `nn.scan` (every block kernel has a leading layer axis L, Flax (in, out)
layout), so compile time is flat in depth and the optimizer/sharding code sees one array per
weight kind. Master params are fp32; matmuls run in `cfg.compute_dtype` and accumulate in fp32;
norms, RoPE, softcap and the loss run in fp32.

One block code path serves training (full causal attention, cuDNN flash kernel on GPU) and
inference (`forward_cached`: a chunk of tokens per row at that row's own position, attending to
a KV cache of shape (L, B, 2, Hkv, S, hd)). The cached path masks explicitly and uses XLA attention:
cuDNN's causal mask is aligned to the top-left corner (query i sees keys <= i), which is wrong for
a chunk that starts at position p > 0, and the jax cuDNN path takes no boolean mask. For a one-token
decode step XLA's attention is two small batched matmuls that read the cache once, which is all the
cuDNN kernel could do either. Generation runs on `inference_params` (bf16, (out, in) block kernels,
q/k/v fused), the layout a one-row decode product reads fastest.

Run `python -m nanochat_jax.model --depth 20 --summary` for parameter counts and FLOPs/token.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from nanochat_jax import fused_matmul
from nanochat_jax import kernels as pallas
from nanochat_jax.config import ConfigError
from nanochat_jax.sharding import gpu_compute_capability

ROPE_BASE = 10000.0
SOFTCAP = 15.0

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# ----------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    depth: int
    d_model: int
    n_head: int
    n_kv_head: int
    head_dim: int
    sequence_len: int
    compute_dtype: str = "float32"  # bfloat16 | float32 (float64 for numerical tests, needs jax x64)
    attention: str = "xla"  # cudnn | xla (training path; the cached path is always xla)
    kernels: str = "xla"  # pallas | xla: training's kernels.py steps, and the fused MLP on Hopper (fused_matmul.py)
    remat: str = "none"  # none | full | dots_saveable | dots_with_no_batch_dims_saveable
    loss_chunk: int = 0  # >0: cross-entropy over chunks of this many positions (x all rows)
    residual_dtype: str = "float32"  # float32 | compute (the reference's bf16 residual stream under autocast)
    scan_layers: bool = True  # False: one traced copy of the block per layer (same params, no while loop)
    kernel_layout: str = "in_out"  # of the block kernels; "out_in" only in inference_params' output
    attend_len: int = 0  # >0: cached attention reads only cache slots [0, attend_len) (all positions < it)

    def __post_init__(self):
        if self.compute_dtype not in ("bfloat16", "float32", "float64"):
            raise ConfigError(f"compute_dtype must be bfloat16 or float32, got {self.compute_dtype!r}")
        if self.attention not in ("cudnn", "xla"):
            raise ConfigError(f"attention must be cudnn or xla, got {self.attention!r}")
        if self.attention == "cudnn" and self.compute_dtype != "bfloat16":
            raise ConfigError("attention='cudnn' needs compute_dtype='bfloat16' (cuDNN flash attention "
                              "has no fp32 kernel); use attention='xla' or 'auto'")
        if self.kernels not in ("pallas", "xla"):
            raise ConfigError(f"kernels must be pallas or xla, got {self.kernels!r}")
        if self.kernels == "pallas" and not pallas.available():
            raise ConfigError("kernels='pallas' needs Pallas' Triton backend, which this jax lacks; "
                              "use kernels='xla' or 'auto'")
        if self.remat != "none" and self.remat not in _REMAT_POLICIES:
            raise ConfigError(f"remat must be none or one of {sorted(_REMAT_POLICIES)}, got {self.remat!r}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ConfigError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even (RoPE rotates halves), got {self.head_dim}")
        if self.residual_dtype not in ("float32", "compute"):
            raise ConfigError(f"residual_dtype must be float32 or compute, got {self.residual_dtype!r}")
        if self.kernel_layout not in ("in_out", "out_in"):
            raise ConfigError(f"kernel_layout must be in_out or out_in, got {self.kernel_layout!r}")
        if self.attend_len < 0:
            raise ConfigError(f"attend_len must be >= 0, got {self.attend_len}")
        if self.loss_chunk < 0:
            raise ConfigError(f"loss_chunk must be >= 0, got {self.loss_chunk}")

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    @property
    def residual(self):
        """dtype of the residual stream between blocks (never below fp32 when computing in fp64)."""
        return self.dtype if self.residual_dtype == "compute" else self.acc_dtype

    @property
    def acc_dtype(self):
        """Accumulation / norm / loss dtype: fp32 (fp64 only when computing in fp64)."""
        return jnp.promote_types(self.dtype, jnp.float32)

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int = 65536, sequence_len: int = 2048,
                   n_kv_head: int = 0, *, aspect_ratio: int = 64, head_dim: int = 128,
                   compute_dtype: str = "auto", attention: str = "auto", kernels: str = "auto",
                   **overrides) -> "ModelConfig":
        """SPEC §1: every dimension from depth. 'auto' dtype/attention/kernels resolve for the running backend."""
        d_model = aspect_ratio * depth
        n_head = max(1, math.ceil(d_model / head_dim))
        compute_dtype, attention, kernels = _resolve_auto(compute_dtype, attention, kernels)
        return cls(vocab_size=vocab_size, depth=depth, d_model=d_model, n_head=n_head,
                   n_kv_head=n_kv_head or n_head, head_dim=head_dim, sequence_len=sequence_len,
                   compute_dtype=compute_dtype, attention=attention, kernels=kernels, **overrides)

    @classmethod
    def from_config(cls, config) -> "ModelConfig":
        """From a validated ConfigDict: config.model.* and config.tokenizer.vocab_size."""
        m = config.model
        return cls.from_depth(m.depth, vocab_size=config.tokenizer.vocab_size, sequence_len=m.sequence_len,
                              n_kv_head=m.n_kv_head, aspect_ratio=m.aspect_ratio, head_dim=m.head_dim,
                              compute_dtype=m.compute_dtype, attention=m.attention, kernels=m.kernels,
                              remat=m.remat, loss_chunk=m.loss_chunk, residual_dtype=m.residual_dtype,
                              scan_layers=m.scan_layers)


def _resolve_auto(compute_dtype: str, attention: str, kernels: str) -> tuple[str, str, str]:
    """'auto': bf16 on GPUs with compute capability >= 8.0 (fp32 on CPU, T4, V100); cuDNN attention
    wherever we run on a GPU in bf16 (its flash kernel is bf16/fp16 only), XLA elsewhere; the Pallas
    kernels on any NVIDIA GPU (Triton), XLA elsewhere (Pallas would interpret them)."""
    if "auto" in (compute_dtype, attention, kernels):
        cc = gpu_compute_capability()
        if compute_dtype == "auto":
            compute_dtype = "bfloat16" if cc is not None and cc >= 8.0 else "float32"
        if attention == "auto":
            attention = "cudnn" if cc is not None and compute_dtype == "bfloat16" else "xla"
        if kernels == "auto":
            kernels = "pallas" if cc is not None and pallas.available() else "xla"
    return compute_dtype, attention, kernels


# ----------------------------------------------------------------------------------------------
# Parameter-free pieces of SPEC §2


def rms_norm(x):
    """RMSNorm without weights over the last axis, computed in fp32 (at least), returned in x's dtype;
    eps is torch's F.rms_norm default, finfo(x.dtype).eps. (x * x, not jnp.square: autodiff of the
    latter keeps a full-size 2x for the backward pass; this keeps only x and the (.., 1) rsqrt.)"""
    eps = float(jnp.finfo(x.dtype).eps)
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def rope_tables(positions_BxT, head_dim: int, dtype):
    """cos, sin of shape (B, T, head_dim/2) for integer positions."""
    inv_freq = 1.0 / (ROPE_BASE ** (jnp.arange(0, head_dim, 2, dtype=dtype) / head_dim))
    freqs = positions_BxT.astype(dtype)[..., None] * inv_freq
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x_BxTxNxH, cos_BxTxh, sin_BxTxh):
    """Half-split rotation: y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos. Written as one element-wise
    expression over x viewed (.., 2, h) with the halves swapped by a reverse, so neither direction has
    a split, concatenate or pad for XLA to materialise."""
    *lead, H = x_BxTxNxH.shape
    x = x_BxTxNxH.reshape(*lead, 2, H // 2)
    cos = jnp.stack([cos_BxTxh, cos_BxTxh], axis=-2)[:, :, None]  # (B, T, 1, 2, h)
    sin = jnp.stack([sin_BxTxh, -sin_BxTxh], axis=-2)[:, :, None]
    return (x * cos + jnp.flip(x, axis=-2) * sin).reshape(x_BxTxNxH.shape)


def softcap(logits):
    return SOFTCAP * jnp.tanh(logits / SOFTCAP)


# The two element-wise steps between matmuls keep only their compute-dtype inputs for the backward
# pass. RoPE runs in the compute dtype, as the reference's (bf16 cos/sin tables under autocast); the
# norm's statistics are fp32.
@functools.partial(jax.checkpoint, prevent_cse=False)
def rope_qk_norm(x_BxTxNxH, cos, sin):
    return rms_norm(apply_rope(x_BxTxNxH, cos.astype(x_BxTxNxH.dtype), sin.astype(x_BxTxNxH.dtype)))


@functools.partial(jax.checkpoint, prevent_cse=False)
def relu_squared(u):
    return jnp.square(jax.nn.relu(u.astype(jnp.promote_types(u.dtype, jnp.float32)))).astype(u.dtype)


# ----------------------------------------------------------------------------------------------
# Init (SPEC §3)


def _matrix_init(key, shape, dtype=jnp.float32):
    """N(0, std), std = 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in)) for an (in, out) kernel."""
    fan_in, fan_out = shape[-2], shape[-1]
    std = fan_in ** -0.5 * min(1.0, (fan_out / fan_in) ** 0.5)
    return std * jax.random.normal(key, shape, dtype)


# ----------------------------------------------------------------------------------------------
# Modules


def matmul(x, kernel, dtype, out_in: bool = False):
    """x @ kernel in `dtype`: the GEMM accumulates in fp32 (XLA's bf16 GEMMs on GPU use an fp32 compute
    type) and rounds its output to `dtype`, as torch autocast does. Callers that need fp32 (residual
    adds, logits) widen the result afterwards rather than asking the GEMM for fp32: that matters for
    the backward pass, where the fp32 cotangent is then rounded to bf16 before the two transposed
    GEMMs, which otherwise run as fp32/TF32 GEMMs at a fraction of the bf16 rate (measured: 230 ms of
    an 820 ms d20 step). out_in: the kernel is stored (out, in) (see inference_params)."""
    return lax.dot_general(x.astype(dtype), kernel.astype(dtype), (((x.ndim - 1,), (1 if out_in else 0,)), ((), ())),
                           preferred_element_type=dtype)


class Kernel(nn.Module):
    """A bias-free fp32 weight of `shape`, as a module so that it has its own name in the params tree."""
    shape: tuple[int, int]
    init: Callable[..., Any] = _matrix_init

    @nn.compact
    def __call__(self):
        return self.param("kernel", self.init, self.shape, jnp.float32)


def block_kernel(cfg: ModelConfig, name: str, n_in: int, n_out: int, init=_matrix_init):
    """A block's weight, stored (in, out), or (out, in) in inference_params' output."""
    return Kernel((n_out, n_in) if cfg.kernel_layout == "out_in" else (n_in, n_out), init, name=name)()


def cached_attention(q_BxTxHxd, k_BxKxSxd, v_BxKxSxd, q_pos_BxT, scale):
    """Queries at positions q_pos attend to the cache slots at positions <= their own. The cache keeps
    (kv head, position, head dim) minor-most, so both products batch over (row, kv head) with the
    contracted axis already in place: XLA reads the cache once, with no transposed copy (with a
    (position, kv head) layout it copied both halves of the cache at every layer of a decode step)."""
    B, T, H, hd = q_BxTxHxd.shape
    Hkv, S = k_BxKxSxd.shape[1], k_BxKxSxd.shape[2]
    acc = jnp.promote_types(q_BxTxHxd.dtype, jnp.float32)
    q = q_BxTxHxd.reshape(B, T, Hkv, H // Hkv, hd)  # GQA: query head h uses kv head h // (H / Hkv)
    logits = jnp.einsum("btkgd,bksd->bkgts", q, k_BxKxSxd, preferred_element_type=acc) * scale
    visible_BxTxS = jnp.arange(S)[None, None, :] <= q_pos_BxT[:, :, None]
    logits = jnp.where(visible_BxTxS[:, None, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BxKxSxd.dtype)
    y = jnp.einsum("bkgts,bksd->btkgd", probs, v_BxKxSxd, preferred_element_type=v_BxKxSxd.dtype)
    return y.reshape(B, T, H, hd)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_BxTxD, layer, cos, sin, q_pos_BxT, cache):
        cfg = self.cfg
        B, T, _ = h_BxTxD.shape
        H, Hkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # One GEMM for q, k and v (h is read once, dh is one GEMM), one RoPE + QK-norm pass over q and k
        # together; the three kernels stay separate params (Muon, export).
        D, out_in = h_BxTxD.shape[-1], cfg.kernel_layout == "out_in"
        if out_in:  # inference_params fused them once (concatenating per call copied 9.8 MB a d20 layer)
            w_qkv = block_kernel(cfg, "c_qkv", D, (H + 2 * Hkv) * hd)
        else:
            w_qkv = jnp.concatenate([block_kernel(cfg, "c_q", D, H * hd), block_kernel(cfg, "c_k", D, Hkv * hd),
                                     block_kernel(cfg, "c_v", D, Hkv * hd)], axis=1)
        qkv = matmul(h_BxTxD, w_qkv, cfg.dtype, out_in).reshape(B, T, H + 2 * Hkv, hd)
        if cache is None and cfg.kernels == "pallas" and pallas.rope_supported(T, hd):  # one pass each way
            q, k, v = pallas.rope_qk_norm_split(qkv, cos[0], sin[0], H, Hkv)
        else:  # (the same function; the kernel's blocks need power-of-two lengths)
            qk = rope_qk_norm(qkv[:, :, :H + Hkv], cos, sin)  # QK-norm after RoPE (SPEC §2)
            q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + Hkv:]
        scale = 1.0 / math.sqrt(hd)
        # GQA: jax's attention groups H query heads over Hkv kv heads (== repeating kv heads).
        if cache is None:
            y = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                             implementation=cfg.attention)
        else:
            rows_BxT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
            # (layer, row, :, :, position) picks a (B, T) grid of (2, Hkv, hd) slots: k and v in one write
            cache = cache.at[layer, rows_BxT, :, :, q_pos_BxT].set(jnp.stack([k, v], axis=2))
            S = cfg.attend_len or cache.shape[4]  # the caller promises every position is < attend_len
            y = cached_attention(q, cache[layer, :, 0, :, :S], cache[layer, :, 1, :, :S], q_pos_BxT, scale)
        w_out = block_kernel(cfg, "c_proj", H * hd, cfg.d_model, nn.initializers.zeros)
        return matmul(y.reshape(B, T, H * hd), w_out, cfg.dtype, out_in), cache


def _dot(x, y, contract):  # a GEMM with x's dtype as output, as `matmul`
    return lax.dot_general(x, y, (contract, ((), ())), preferred_element_type=x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def relu2_mlp(h_MxD, w_fc_DxF, w_proj_FxD, up: Callable, down_grad: Callable):
    """relu(h @ w_fc)² @ w_proj, where up(h, w_fc) = relu(h @ w_fc)² and down_grad(g, w_proj^T, a) =
    (g @ w_proj^T) 2 sqrt(a) are fused_matmul's kernels. The forward keeps a = relu(u)², not u: the
    backward needs only a (d relu(u)² / du = 2 relu(u) = 2 sqrt(a))."""
    return _dot(up(h_MxD, w_fc_DxF), w_proj_FxD, ((1,), (0,)))


def _relu2_mlp_fwd(h, w_fc, w_proj, up, down_grad):
    a = up(h, w_fc)
    return _dot(a, w_proj, ((1,), (0,))), (h, w_fc, w_proj, a)


def _relu2_mlp_bwd(up, down_grad, residuals, g_MxD):
    h, w_fc, w_proj, a = residuals
    du = down_grad(g_MxD, w_proj.T, a)
    return _dot(du, w_fc, ((1,), (1,))), _dot(h, du, ((0,), (0,))), _dot(a, g_MxD, ((0,), (0,)))


relu2_mlp.defvjp(_relu2_mlp_fwd, _relu2_mlp_bwd)


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_BxTxD, use_kernel: bool = False):
        cfg, D, out_in = self.cfg, h_BxTxD.shape[-1], self.cfg.kernel_layout == "out_in"
        w_fc = block_kernel(cfg, "c_fc", D, 4 * cfg.d_model)
        w_proj = block_kernel(cfg, "c_proj", 4 * cfg.d_model, cfg.d_model, nn.initializers.zeros)
        rows = math.prod(h_BxTxD.shape[:-1])
        if use_kernel and not out_in and fused_matmul.supported(rows, D, 4 * D, cfg.dtype):
            dt = cfg.dtype
            y = relu2_mlp(h_BxTxD.reshape(rows, D).astype(dt), w_fc.astype(dt), w_proj.astype(dt),
                          fused_matmul.relu2_matmul, fused_matmul.relu2_grad_matmul)
            return y.reshape(h_BxTxD.shape)
        return matmul(relu_squared(matmul(h_BxTxD, w_fc, cfg.dtype, out_in)), w_proj, cfg.dtype, out_in)


def add_rms_norm(x, y, use_kernel: bool):
    """The residual add and the next norm: (s, rms_norm(s)), s = x + y in x's dtype."""
    if use_kernel and pallas.norm_supported(math.prod(x.shape[:-1]), x.shape[-1]):
        return pallas.add_rms_norm(x, y)
    s = x + y.astype(x.dtype)
    return s, rms_norm(s)


class Block(nn.Module):
    """One transformer layer; scanned over the layer axis. carry = (residual stream, its norm, cache | None):
    each residual add is fused with the norm that reads it, this layer's second one with the next layer's
    first (the last layer's is the final norm)."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, layer, cos, sin, q_pos_BxT):
        x, h, cache = carry
        kernel = cache is None and self.cfg.kernels == "pallas"
        y, cache = Attention(self.cfg, name="attn")(h, layer, cos, sin, q_pos_BxT, cache)
        x, h = add_rms_norm(x, y, kernel)
        x, h = add_rms_norm(x, MLP(self.cfg, name="mlp")(h, kernel), kernel)
        return (x, h, cache), None


class GPT(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.wte = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=nn.initializers.normal(1.0))
        self.block = Block
        if cfg.remat != "none":
            self.block = nn.remat(Block, prevent_cse=False, policy=_REMAT_POLICIES[cfg.remat])
        self.blocks = nn.scan(self.block, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.depth)(cfg)
        self.lm_head = Kernel((cfg.d_model, cfg.vocab_size), nn.initializers.zeros)

    def hidden(self, tokens_BxT, positions_B=None, cache=None):
        """Final normed residual (B, T, D) in the residual dtype, and the updated cache (None when training)."""
        cfg = self.cfg
        B, T = tokens_BxT.shape
        if positions_B is None:
            q_pos_BxT = None
            cos, sin = rope_tables(jnp.arange(T)[None, :], cfg.head_dim, cfg.acc_dtype)
        else:
            q_pos_BxT = positions_B.astype(jnp.int32)[:, None] + jnp.arange(T, dtype=jnp.int32)
            cos, sin = rope_tables(q_pos_BxT, cfg.head_dim, cfg.acc_dtype)
        x = rms_norm(self.wte(tokens_BxT).astype(cfg.residual))
        h = rms_norm(x)
        if cfg.scan_layers or self.is_initializing():
            (x, h, cache), _ = self.blocks((x, h, cache), jnp.arange(cfg.depth), cos, sin, q_pos_BxT)
        else:  # the same stacked params, one block per layer in the program: no while loop around the
            # layers (a decode step then updates its KV cache in place instead of copying it per layer)
            # Unstacked once: the gradient of that is one concatenate. (Indexing p[i] per layer has
            # for gradient a sum of L zero-padded copies, which XLA fused into every consumer of the
            # stacked gradient: O(L) work per element, 25 ms of a d26 step in the norm and Muon.)
            leaves, treedef = jax.tree.flatten(self.variables["params"]["blocks"])
            per_layer = [lax.unstack(p) for p in leaves]
            block = self.block(cfg, parent=None)  # a free-standing module, applied to each layer's params
            for i in range(cfg.depth):
                layer = treedef.unflatten([p[i] for p in per_layer])
                (x, h, cache), _ = block.apply({"params": layer}, (x, h, cache), i, cos, sin, q_pos_BxT)
        return h, cache

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
    # The init trace runs a forward on one token; XLA attention there avoids cuDNN shape limits
    # (the attention kernel has no params, so this changes nothing).
    model = GPT(dataclasses.replace(cfg, attention="xla", compute_dtype="float32", remat="none", scan_layers=True,
                                    kernel_layout="in_out"))
    return jax.jit(model.init)(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def logits_fn(params, cfg: ModelConfig, tokens_BxT):
    """(B, T, V) fp32 softcapped logits of a full causal forward."""
    return GPT(cfg).apply({"params": params}, tokens_BxT)[0]


def _token_losses(logits_BxTxV, targets_BxT):
    """Cross-entropy per token in the logits' dtype; 0 where target == -1."""
    lse = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    picked = jnp.take_along_axis(logits_BxTxV, jnp.maximum(targets_BxT, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(targets_BxT != -1, lse - picked, 0.0)


def _chunks(a, chunk, fill):
    """(B, T, ...) -> (n, B, chunk, ...) over positions, padded with `fill` (rows stay whole, so a
    batch sharded over rows stays sharded)."""
    B, T = a.shape[:2]
    n = -(-T // chunk)
    pad = [(0, 0), (0, n * chunk - T)] + [(0, 0)] * (a.ndim - 2)
    return jnp.pad(a, pad, constant_values=fill).reshape(B, n, chunk, *a.shape[2:]).swapaxes(0, 1)


def _softcap_terms(raw):
    """(e^(softcap(raw) - SOFTCAP), softcap'(raw)). softcap(raw) = SOFTCAP (1 - 2r) and softcap'(raw) = 4 r (1 - r)
    with r = 1 / (1 + e^(2 raw / SOFTCAP)): one exponential and one division, where tanh and its derivative
    cost several; e^.. = inf gives r = 0. The softcapped logits are <= SOFTCAP: a safe shift, so no max."""
    r = 1 / (1 + jnp.exp(raw * (2 / SOFTCAP)))
    return jnp.exp(-2 * SOFTCAP * r), 4 * r * (1 - r)


def _softcap_sum_and_scores(raw, acc, dtype, grads):
    """S = the sum of e^(softcap(raw) - SOFTCAP) over the last axis (logsumexp = SOFTCAP + log S), and (with
    grads) the scores e^(softcap(raw) - SOFTCAP) x softcap'(raw) in `dtype` (None without grads): one pass
    over the logits, as kernels.softcap_sum_and_scores."""
    e, slope = _softcap_terms(raw.astype(acc))
    return jnp.sum(e, axis=-1), (e * slope).astype(dtype) if grads else None


def _with_target_term(scores, raw_t, t0, S):
    """The scores with each row's target entry t0 replaced by softcap'(raw_t) (e_t - S): then wt / S times
    the result is d(wt x cross-entropy)/d(raw) = wt (softmax - onehot) softcap'. (A row whose target is -1
    has weight 0; its entry at column 0 is overwritten, harmlessly.)"""
    e_t, slope_t = _softcap_terms(raw_t)
    value = (slope_t * (e_t - S)).astype(scores.dtype)
    return scores.at[(*jnp.indices(t0.shape, sparse=True), t0)].set(value, unique_indices=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_ce(x_BxTxD, kernel_DxV, targets_BxT, weights_BxT, chunk, dtype, use_pallas=False):
    """(sum of weights x cross-entropy of softcap(x @ kernel), per-token losses) over chunks of `chunk`
    positions x all rows, so the (B, T, V) logits never exist; only the first output is differentiable.
    Weights must be 0 where targets == -1 (and the padded tail of the last chunk gets weight 0).

    Differentiated, the forward pass also computes the gradients (the loss is a weighted sum, so its
    cotangent is one scalar that the backward pass only multiplies in): each chunk's logits come from
    one GEMM and are read once, and the LM-head GEMM is not recomputed in the backward pass (a d20 step
    saved ~15 ms on an H100). That one pass writes the scores e^(softcap - SOFTCAP) softcap' while it sums
    the exponentials, before the logsumexp is known; each row's 1 / S and weight then scale the two GEMMs'
    (rows, D) sides (dx's output, x for dw), and the target's term is one entry a row. XLA's own
    differentiation of softcap + logsumexp made ~8 fp32 passes over the logits. use_pallas: the pass as a
    Pallas kernel."""
    (total, losses), _ = _fused_ce_fwd(x_BxTxD, kernel_DxV, targets_BxT, weights_BxT, chunk, dtype, use_pallas,
                                       grads=False)
    return total, losses


def _fused_ce_fwd(x_BxTxD, kernel_DxV, targets_BxT, weights_BxT, chunk, dtype, use_pallas=False, grads=True):
    B, T, D = x_BxTxD.shape
    w = kernel_DxV.astype(dtype)
    V = w.shape[1]
    acc = jnp.promote_types(dtype, jnp.float32)

    def one(dw, xtw):
        x, t, wt = xtw
        raw = matmul(x, w, dtype)  # the GEMM's compute-dtype output is all that is stored
        t0 = jnp.maximum(t, 0)
        raw_t = jnp.take_along_axis(raw, t0[..., None], axis=-1)[..., 0].astype(acc)
        if use_pallas and pallas.ce_supported(t.size, V):
            S, scores = pallas.softcap_sum_and_scores(raw.reshape(-1, V), SOFTCAP, grads)
            S, scores = S.reshape(t.shape), scores if scores is None else scores.reshape(raw.shape)
        else:
            S, scores = _softcap_sum_and_scores(raw, acc, dtype, grads)
        losses = jnp.where(t != -1, SOFTCAP + jnp.log(S) - softcap(raw_t), 0.0)
        if not grads:
            return dw, (losses, None)
        d = _with_target_term(scores, raw_t, t0, S)  # d(loss)/d(raw) = scale x d
        scale = (wt / S)[..., None]
        dx = (lax.dot_general(d, w, (((2,), (1,)), ((), ())), preferred_element_type=x.dtype) * scale).astype(x.dtype)
        dw = dw + lax.dot_general((x * scale).astype(dtype), d, (((0, 1), (0, 1)), ((), ())),
                                  preferred_element_type=dw.dtype)
        return dw, (losses, dx)

    dw0 = jnp.zeros(kernel_DxV.shape, kernel_DxV.dtype) if grads else None
    dw, (losses, dx) = lax.scan(one, dw0, (_chunks(x_BxTxD, chunk, 0), _chunks(targets_BxT, chunk, -1),
                                          _chunks(weights_BxT.astype(acc), chunk, 0)))
    losses = losses.swapaxes(0, 1).reshape(B, -1)[:, :T]
    total = jnp.sum(losses * weights_BxT)
    if not grads:
        return (total, losses), None
    return (total, losses), (dx.swapaxes(0, 1).reshape(B, -1, D)[:, :T], dw)


def _fused_ce_bwd(chunk, dtype, use_pallas, res, cotangents):
    g, _ = cotangents  # per-token losses are not differentiable (loss_fn stops their gradient)
    dx, dw = res
    return (g * dx).astype(dx.dtype), g * dw, None, None


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


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
    if cfg.loss_chunk > 0:
        loss, losses = _fused_ce(x, params["lm_head"]["kernel"], targets_BxT, weights_BxT,
                                 min(cfg.loss_chunk, x.shape[1]), cfg.dtype, cfg.kernels == "pallas")
        return loss, lax.stop_gradient(losses)
    losses = _token_losses(model.apply({"params": params}, x, method=GPT.head), targets_BxT)
    return jnp.sum(losses * weights_BxT), losses


def init_cache(cfg: ModelConfig, batch: int, max_len: int):
    """Empty KV cache (L, B, 2, Hkv, max_len, head_dim) in the compute dtype, [:, :, 0] keys, [:, :, 1]
    values: one array, so a step writes a layer's keys and values with one scatter."""
    return jnp.zeros((cfg.depth, batch, 2, cfg.n_kv_head, max_len, cfg.head_dim), cfg.dtype)


def inference_params(params, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
    """Params and config for generation: floats cast to the compute dtype once, block kernels stored
    (out, in), and q, k, v fused into one c_qkv kernel (rows q, then k, then v). A one-row decode product
    then reads each weight row contiguously: XLA's reduction over the minor axis streamed d20's block
    weights 1.4–2.6x faster than over the (in, out) layout's major axis on an H100 (bench/gemv.py).
    The LM head keeps (in, out), measured as fast."""
    if cfg.kernel_layout == "out_in":
        return params, cfg
    cast = lambda p: p.astype(cfg.dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p
    blocks = jax.tree.map(lambda w: jnp.swapaxes(cast(w), -1, -2), params["blocks"])
    attn = blocks["attn"]
    attn = {"c_qkv": {"kernel": jnp.concatenate([attn[n]["kernel"] for n in ("c_q", "c_k", "c_v")], axis=1)},
            "c_proj": attn["c_proj"]}
    params = {name: jax.tree.map(cast, tree) for name, tree in params.items() if name != "blocks"}
    params["blocks"] = {**blocks, "attn": attn}
    return params, dataclasses.replace(cfg, kernel_layout="out_in")


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
