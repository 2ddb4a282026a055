"""Our model and tokenizer in transformers' native `nanochat` format, both ways, and the check that a
directory in that format computes what our model computes. Shared by export_hf.py and import_hf.py.

transformers' NanoChatForCausalLM (model type `nanochat`, checked against transformers 5.25) is SPEC §2
with other names: weightless RMSNorm after the embedding, before each sublayer and at the end; half-split
RoPE (q cos + rotate_half(q) sin, rotate_half(x) = (-x2, x1)); weightless QK-norm after RoPE; ReLU²; no
biases; untied lm_head; tanh softcap. Its Linear weights are (out, in), our kernels (in, out), stacked
over layers. Its defaults differ from ours (bos/eos ids, intermediate_size, rms_norm_eps), so every
field is written from our config.

The tokenizer becomes a `tokenizers` byte-level BPE that encodes as tiktoken does on our ranks: token id
= rank, our split regex as a Split pre-tokenizer, a merge (a, b) for every way a token splits into two
tokens, ordered by the token's rank (tiktoken merges the adjacent pair whose concatenation ranks
lowest), and ignore_merges (tiktoken takes a pre-token that is itself a token whole). The nine special
tokens follow the ranks, as in our Tokenizer. Its hash goes into config.json, so weights never travel
with another tokenizer unnoticed (the failure this project's model card ends with).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import model as model_lib
from nanochat_jax.config import UserError
from nanochat_jax.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

log = logging.getLogger(__name__)

HASH_KEY = "nanochat_jax_tokenizer_hash"  # in config.json: the hash of the tokenizer the weights were trained with
RMS_EPS = float(np.finfo(np.float32).eps)  # our rms_norm's eps in fp32 (torch's F.rms_norm default)
WEIGHTS_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
LOGIT_TOLERANCE = 1e-4  # fp32 logits, ours against transformers'
GREEDY_TOKENS = 32

# SPEC §7 as a Jinja chat template: what Tokenizer.render_for_completion renders (with
# add_generation_prompt) and render_conversation renders (without). A leading system message is merged
# into the first user message; with add_generation_prompt a final assistant message is dropped.
CHAT_TEMPLATE = (
    "{%- set first = 1 if messages and messages[0]['role'] == 'system' else 0 -%}"
    "{{- '<|bos|>' -}}"
    "{%- for i in range(first, messages | length) -%}"
    "{%- set m = messages[i] -%}"
    "{%- if (m['role'] == 'user') != ((i - first) % 2 == 0) -%}"
    "{{- raise_exception('user and assistant messages must alternate, starting with user') -}}"
    "{%- elif m['role'] == 'user' -%}"
    "{{- '<|user_start|>' -}}{%- if first and i == 1 -%}{{- messages[0]['content'] + '\n\n' -}}{%- endif -%}"
    "{{- m['content'] + '<|user_end|>' -}}"
    "{%- elif not (add_generation_prompt and loop.last) -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- if m['content'] is string -%}{{- m['content'] -}}{%- else -%}{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


def require_hf():
    """(torch, transformers), or a UserError saying how to install them."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise UserError(f"this needs torch and transformers ({e}): pip install -e '.[hf]'") from None
    return torch, transformers


# ----------------------------------------------------------------------------------------------
# Model: config and weights


def hf_config(cfg: model_lib.ModelConfig, tokenizer: Tokenizer, dtype: str) -> dict:
    """config.json fields of NanoChatConfig for our model, every one set from our config."""
    sp = tokenizer.special_tokens
    return dict(
        architectures=["NanoChatForCausalLM"], model_type="nanochat", vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model, intermediate_size=4 * cfg.d_model, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.sequence_len, hidden_act="relu2", rms_norm_eps=RMS_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": model_lib.ROPE_BASE},
        final_logit_softcapping=model_lib.SOFTCAP, attention_bias=False, attention_dropout=0.0,
        tie_word_embeddings=False, bos_token_id=sp["<|bos|>"], eos_token_id=sp["<|assistant_end|>"],
        pad_token_id=None,  # an Embedding padding_idx would freeze that row when fine-tuning in transformers
        dtype=dtype, **{HASH_KEY: tokenizer.hash})


def model_fields_from_hf(hf: dict) -> dict:
    """Our config.model fields from a config.json, or a UserError naming what we cannot represent."""
    def refuse(what):
        raise UserError(f"cannot import this model: {what}; nanochat_jax's model has no such option")

    if hf.get("model_type") != "nanochat":
        refuse(f"model_type is {hf.get('model_type')!r}, not 'nanochat'")
    D, L, H = hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"]
    hd = hf.get("head_dim") or D // H
    Hkv = hf.get("num_key_value_heads") or H
    rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10000.0)}
    checks = [
        (hf.get("hidden_act", "relu2") == "relu2", f"hidden_act={hf.get('hidden_act')!r} (ours is relu2)"),
        (not hf.get("attention_bias", False), "attention_bias=true (ours has no biases)"),
        (hf.get("final_logit_softcapping") == model_lib.SOFTCAP,
         f"final_logit_softcapping={hf.get('final_logit_softcapping')} (ours is {model_lib.SOFTCAP})"),
        (rope.get("rope_type", "default") == "default", f"rope_type={rope.get('rope_type')!r} (ours is default)"),
        (rope.get("rope_theta") == model_lib.ROPE_BASE, f"rope_theta={rope.get('rope_theta')} (ours is "
                                                        f"{model_lib.ROPE_BASE})"),
        (hf.get("intermediate_size") == 4 * D, f"intermediate_size={hf.get('intermediate_size')} (ours is 4 x "
                                               f"hidden_size = {4 * D})"),
        (D % L == 0, f"hidden_size={D} is not a multiple of num_hidden_layers={L} (our width is depth x aspect ratio)"),
        (H == max(1, math.ceil(D / hd)), f"num_attention_heads={H} with head_dim={hd} (ours is ceil(hidden_size / "
                                         f"head_dim) = {max(1, math.ceil(D / hd))})"),
        (hd % 2 == 0 and H % Hkv == 0, f"head_dim={hd}, num_key_value_heads={Hkv} (need an even head_dim and kv "
                                       f"heads dividing {H} heads)"),
    ]
    for ok, what in checks:
        if not ok:
            refuse(what)
    if hf.get("rms_norm_eps") != RMS_EPS:  # a fixed eps in our rms_norm; its effect is below the logit check's tolerance
        log.warning("rms_norm_eps is %s; ours is %s (the import's logit check measures the difference)",
                    hf.get("rms_norm_eps"), RMS_EPS)
    return dict(depth=L, aspect_ratio=D // L, head_dim=hd, n_kv_head=Hkv, sequence_len=hf["max_position_embeddings"])


def _layer_names(i: int) -> dict:
    """Our (module, param) inside a block -> transformers' name for layer i."""
    pre = f"model.layers.{i}."
    return {("attn", "c_q"): pre + "self_attn.q_proj.weight", ("attn", "c_k"): pre + "self_attn.k_proj.weight",
            ("attn", "c_v"): pre + "self_attn.v_proj.weight", ("attn", "c_proj"): pre + "self_attn.o_proj.weight",
            ("mlp", "c_fc"): pre + "mlp.fc1.weight", ("mlp", "c_proj"): pre + "mlp.fc2.weight"}


def to_hf_tensors(params) -> dict[str, np.ndarray]:
    """Our fp32 params -> {transformers name: (out, in) fp32 array}."""
    p = jax.tree.map(np.asarray, params)
    out = {"model.embed_tokens.weight": p["wte"]["embedding"], "lm_head.weight": p["lm_head"]["kernel"].T}
    for i in range(p["blocks"]["attn"]["c_q"]["kernel"].shape[0]):
        for (module, name), hf_name in _layer_names(i).items():
            out[hf_name] = p["blocks"][module][name]["kernel"][i].T
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def from_hf_tensors(tensors: dict[str, np.ndarray], depth: int, tied: bool) -> dict:
    """{transformers name: array} -> our fp32 params; refuses tensors we have no place for."""
    tensors = dict(tensors)
    if tied:  # one shared matrix: our untied head starts as a copy of it
        tensors.setdefault("lm_head.weight", tensors.get("model.embed_tokens.weight"))
    expected = {"model.embed_tokens.weight", "lm_head.weight"}
    expected |= {n for i in range(depth) for n in _layer_names(i).values()}
    unknown, missing = sorted(set(tensors) - expected), sorted(n for n in expected if tensors.get(n) is None)
    if unknown or missing:
        raise UserError(f"cannot import these weights: " + (f"tensors we have no place for {unknown[:6]}"
                        f"{' ...' if len(unknown) > 6 else ''}" if unknown else f"missing {missing[:6]}"))
    f32 = lambda a: np.asarray(a, np.float32)
    blocks = {"attn": {}, "mlp": {}}
    for (module, name) in _layer_names(0):
        blocks[module][name] = {"kernel": np.stack([f32(tensors[_layer_names(i)[module, name]]).T
                                                    for i in range(depth)])}
    return {"wte": {"embedding": f32(tensors["model.embed_tokens.weight"])}, "blocks": blocks,
            "lm_head": {"kernel": np.ascontiguousarray(f32(tensors["lm_head.weight"]).T)}}


def save_weights(tensors: dict[str, np.ndarray], directory: str, dtype: str) -> str:
    torch, _ = require_hf()
    from safetensors.torch import save_file

    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    path = os.path.join(directory, WEIGHTS_FILE)
    save_file({k: torch.from_numpy(np.array(v)).to(tdtype).contiguous() for k, v in tensors.items()}, path,
              metadata={"format": "pt"})
    return path


def load_weights(directory: str) -> dict[str, np.ndarray]:
    """Every tensor of model.safetensors (or the shards of its index) as fp32 numpy (bf16 widens exactly)."""
    torch, _ = require_hf()
    from safetensors.torch import load_file

    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(directory, WEIGHTS_FILE)):
        files = [WEIGHTS_FILE]
    else:
        raise UserError(f"no {WEIGHTS_FILE} (or {INDEX_FILE}) in {directory}: only safetensors weights are read")
    out = {}
    for name in files:
        out.update({k: v.to(torch.float32).numpy() for k, v in load_file(os.path.join(directory, name)).items()})
    return out


# ----------------------------------------------------------------------------------------------
# Tokenizer


def _byte_chars() -> list[str]:
    """The byte-level alphabet: byte b -> a printable character (printable Latin-1 bytes stand for
    themselves, the others take the characters from U+0100 on, in byte order)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tokenizer_json(tok: Tokenizer) -> str:
    """tokenizer.json (the `tokenizers` format) that encodes and decodes as `tok` does."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors

    chars = _byte_chars()
    as_str = lambda b: "".join(chars[x] for x in b)
    ranks = tok.mergeable_ranks
    vocab = {as_str(t): r for t, r in ranks.items()}
    merges = []  # (rank of the result, rank of the left part, left, right)
    for t, r in ranks.items():
        for cut in range(1, len(t)):
            left, right = t[:cut], t[cut:]
            if left in ranks and right in ranks:
                merges.append((r, ranks[left], as_str(left), as_str(right)))
    merges.sort()
    hf = HFTokenizer(models.BPE(vocab, [(a, b) for _, _, a, b in merges], ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(list(SPECIAL_TOKENS))  # ids len(ranks).., in our order
    bos = tok.bos_id  # tokenizer(text) starts with <|bos|>, as every document did in training
    hf.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                      special_tokens=[("<|bos|>", bos)])
    out = json.loads(hf.to_str())
    if {t["content"]: t["id"] for t in out["added_tokens"]} != tok.special_tokens:
        raise RuntimeError(f"tokenizers numbered the special tokens otherwise: {out['added_tokens']}")
    return json.dumps(out, ensure_ascii=False)


def tokenizer_from_json(text: str, where: str) -> Tokenizer:
    """Our Tokenizer from a tokenizer.json, or a UserError naming what it cannot represent: a byte-level
    BPE with our split regex, tokens 0..n-1 merged in id order, then exactly our nine special tokens."""
    def refuse(what):
        raise UserError(f"cannot import the tokenizer in {where}: {what}")

    try:
        d = json.loads(text)
        model = d["model"]
    except (ValueError, KeyError, TypeError) as e:
        refuse(f"not a tokenizers JSON file ({e})")
    if model.get("type") != "BPE":
        refuse(f"model type {model.get('type')!r} (ours is a byte-level BPE)")
    pre = d.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    split = steps[0] if kinds == ["Split", "ByteLevel"] else None
    if split is None or steps[1].get("use_regex") or steps[1].get("add_prefix_space"):
        refuse(f"pre-tokenizer {kinds} (ours is Split(regex) then ByteLevel without its own regex or prefix space)")
    if split.get("pattern", {}).get("Regex") != SPLIT_PATTERN or split.get("invert"):
        refuse(f"split regex {split.get('pattern')} (ours is {SPLIT_PATTERN!r})")
    if d.get("normalizer"):
        refuse(f"a normalizer ({d['normalizer'].get('type')}); ours has none")
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        refuse("BPE dropout / subword prefix / word suffix")
    byte_of = {c: b for b, c in enumerate(_byte_chars())}
    try:
        ranks = {bytes(byte_of[c] for c in s): i for s, i in model["vocab"].items()}
    except KeyError as e:
        refuse(f"a vocabulary entry with a character outside the byte-level alphabet ({e})")
    if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) != len(model["vocab"]):
        refuse("token ids are not 0..n-1 over distinct byte strings")
    added = sorted((t["id"], t["content"]) for t in d.get("added_tokens", []))
    if added != [(len(ranks) + i, name) for i, name in enumerate(SPECIAL_TOKENS)]:
        refuse(f"added tokens {added} (ours are {list(SPECIAL_TOKENS)} at ids {len(ranks)}..)")
    # tiktoken merges by the rank of the result: the merges must come in token-id order
    try:
        order = [ranks[bytes(byte_of[c] for c in "".join(m.split(" ", 1) if isinstance(m, str) else m))]
                 for m in model.get("merges", [])]
    except KeyError:
        refuse("a merge makes a token that is not in the vocabulary")
    if any(a > b for a, b in zip(order, order[1:])):
        refuse("merges are not in the order of the token ids they make (tiktoken ranks need that)")
    return Tokenizer(ranks)


# ----------------------------------------------------------------------------------------------
# Verification: the directory, loaded by transformers, against our model


VERIFY_TEXTS = ["The capital of France is", "def add(a, b):\n    return a + b\n\n# 12345 + 678",
                "Ünïcödé, 中文 and emoji 😀 — tabs\tand  spaces.\n\n"]
VERIFY_CHATS = [
    {"messages": [{"role": "user", "content": "Why is the sky blue?"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 12*7?"}]},
    {"messages": [{"role": "user", "content": "How many r in strawberry?"},
                  {"role": "assistant", "content": [{"type": "text", "text": "Let me count. "},
                                                    {"type": "python", "text": "'strawberry'.count('r')"},
                                                    {"type": "python_output", "text": "3"},
                                                    {"type": "text", "text": "There are 3."}]},
                  {"role": "user", "content": "And in raspberry?"}]},
]


class VerificationError(UserError):
    """The directory does not compute what our model computes; the message carries the numbers."""


def _our_greedy(params, cfg, prompts: list[list[int]], n: int) -> list[list[int]]:
    """n greedy tokens after each prompt through our KV-cache path (model.forward_cached on
    inference_params), no stop tokens. The prompt goes through the cache a token at a time too, so one
    program serves every prompt and step."""
    params, cfg = model_lib.inference_params(params, cfg)
    step = jax.jit(lambda p, tok, cache, pos: model_lib.forward_cached(p, cfg, tok[None, None], cache, pos[None]))
    max_len = max(map(len, prompts)) + n
    outs = []
    for prompt in prompts:
        cache, out = model_lib.init_cache(cfg, 1, max_len), []
        for pos, t in enumerate(prompt + [None] * (n - 1)):
            logits, cache = step(params, jnp.int32(out[-1] if t is None else t), cache, jnp.int32(pos))
            if pos >= len(prompt) - 1:
                out.append(int(jnp.argmax(logits[0, -1])))
        outs.append(out)
    return outs


def verify(directory: str, params, cfg: model_lib.ModelConfig, tok: Tokenizer) -> dict:
    """Load `directory` with transformers (torch, CPU, fp32) and compare it with our model and tokenizer:
    tokenizer round trips and chat renders, fp32 logits on several prompts (max abs difference <=
    LOGIT_TOLERANCE), GREEDY_TOKENS greedy tokens. Returns the numbers; raises VerificationError."""
    torch, transformers = require_hf()
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=False,
                                                                 dtype=torch.float32).eval()
    problems = []
    with open(os.path.join(directory, "config.json")) as f:
        recorded = json.load(f).get(HASH_KEY)
    with open(os.path.join(directory, TOKENIZER_FILE)) as f:
        rebuilt = tokenizer_from_json(f.read(), directory).hash
    if recorded not in (None, tok.hash) or rebuilt != tok.hash:  # None: a model from elsewhere, no hash to check
        problems.append(f"tokenizer hash: ours {tok.hash[:12]}, config.json {str(recorded)[:12]}, tokenizer.json "
                        f"{rebuilt[:12]}")
    # tokenizer: plain text (with and without <|bos|>), decoding, chat renders
    for text in VERIFY_TEXTS:
        ours = tok.encode(text)
        if hf_tok(text, add_special_tokens=False)["input_ids"] != ours or hf_tok(text)["input_ids"] != [tok.bos_id] + ours:
            problems.append(f"tokenizer encodes {text[:30]!r} differently")
        if hf_tok.decode(ours) != text:
            problems.append(f"tokenizer decodes {text[:30]!r} differently: {hf_tok.decode(ours)[:40]!r}")
    prompts = [tok.render_for_completion(c) for c in VERIFY_CHATS]
    for conv, ours in zip(VERIFY_CHATS, prompts):
        theirs = list(hf_tok.apply_chat_template(conv["messages"], add_generation_prompt=True, tokenize=True,
                                                 return_dict=False))
        if theirs != ours:
            problems.append(f"chat template renders {len(theirs)} tokens where ours renders {len(ours)}: "
                            f"{hf_tok.decode(theirs)[:80]!r}")
    # logits, fp32 on both sides (XLA at full fp32 precision: no TF32 on GPUs)
    cfg = dataclasses.replace(cfg, compute_dtype="float32", attention="xla", kernels="xla", remat="none",
                              residual_dtype="float32", loss_chunk=0)
    prompts += [[tok.bos_id] + tok.encode(t) for t in VERIFY_TEXTS]
    with jax.default_matmul_precision("highest"), torch.no_grad():
        T = max(map(len, prompts))  # right-padded into one batch: causal attention keeps the padding out
        batch = np.zeros((len(prompts), T), np.int32)
        for row, ids in zip(batch, prompts):
            row[:len(ids)] = ids
        ours_all = np.asarray(jax.jit(lambda p, toks: model_lib.logits_fn(p, cfg, toks))(params, batch))
        max_diff = 0.0
        for ids, ours in zip(prompts, ours_all):
            theirs = hf_model(torch.tensor([ids])).logits[0].numpy()
            max_diff = max(max_diff, float(np.max(np.abs(ours[:len(ids)] - theirs))))
        if max_diff > LOGIT_TOLERANCE:
            problems.append(f"logits differ by up to {max_diff:.3g} (tolerance {LOGIT_TOLERANCE:g})")
        # greedy decoding: transformers' generate against our cached path, stop tokens off on both sides
        agree, greedy_prompts = [], [prompts[0], prompts[len(VERIFY_CHATS)]]
        for ids, ours in zip(greedy_prompts, _our_greedy(params, cfg, greedy_prompts, GREEDY_TOKENS)):
            theirs = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                       do_sample=False, max_new_tokens=GREEDY_TOKENS, eos_token_id=None,
                                       pad_token_id=tok.bos_id)[0, len(ids):].tolist()
            same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            agree.append(same)
            if same < GREEDY_TOKENS:
                problems.append(f"greedy tokens agree for {same} of {GREEDY_TOKENS} (ours {ours[:same + 2]}, "
                                f"transformers {theirs[:same + 2]})")
    result = dict(max_abs_logit_diff=max_diff, logit_prompts=len(prompts), greedy_tokens_agreed=min(agree),
                  tokenizer_texts=len(VERIFY_TEXTS), chat_renders=len(VERIFY_CHATS), transformers=transformers.__version__)
    if problems:
        raise VerificationError(f"{directory} does not match our model: " + "; ".join(problems))
    return result
