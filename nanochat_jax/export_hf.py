"""Export a checkpoint to a transformers directory (model type `nanochat`) that verifies itself.

    python -m nanochat_jax.export_hf --stage sft [--step N] --out DIR [--dtype bf16|fp32] [--base_dir D] [--no-verify]

DIR gets config.json, model.safetensors, tokenizer.json (+ tokenizer_config.json with the SPEC §7 chat
template), generation_config.json and a README model card with the run's metrics. Weights and
tokenizer come from one checkpoint: the tokenizer on disk must carry the hash the checkpoint recorded,
and that hash goes into config.json. Before it reports success the export loads DIR with transformers
(torch, CPU, trust_remote_code=False) and compares it with our model (hf_format.verify); a mismatch
fails with the numbers and leaves the directory at DIR.failed for inspection.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys

import jax
import jax.numpy as jnp

from nanochat_jax import hf_format, model as model_lib
from nanochat_jax.checkpoint import check_tokenizer, restore_model
from nanochat_jax.config import KNOWN_STAGES, UserError
from nanochat_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def _generation_config(tok: Tokenizer) -> dict:
    """Our chat defaults (ChatModel.chat): temperature 0.6, top-k 50; stop at <|assistant_end|> or <|bos|>."""
    end = tok.special_tokens["<|assistant_end|>"]
    return dict(bos_token_id=tok.bos_id, eos_token_id=[end, tok.bos_id], pad_token_id=end, do_sample=True,
                temperature=0.6, top_k=50)


def _model_card(base_dir: str, stage: str, meta: dict, cfg: model_lib.ModelConfig, dtype: str,
                checks: dict | None) -> str:
    """README.md: what the model is, how to load it, the run's metrics (<base_dir>/report/*.json), the checks."""
    rows = []
    for name in KNOWN_STAGES:  # pipeline order
        path = os.path.join(base_dir, "report", f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                rows += [f"| {name} | {k} | {v:.4g} |" if isinstance(v, float) else f"| {name} | {k} | {v} |"
                         for k, v in json.load(f).items()]
    metrics_md = "\n".join(["| stage | metric | value |", "|---|---|---|", *rows]) if rows else \
        "No report metrics were found in the run directory."
    n_params = model_lib.param_counts(cfg)["total"]
    checks_md = ("Not verified (exported with --no-verify)." if checks is None else
                 f"Loaded with transformers {checks['transformers']} (torch, CPU, fp32) before release: logits on "
                 f"{checks['logit_prompts']} prompts within {checks['max_abs_logit_diff']:.2g} (max abs) of nanochat_jax's, "
                 f"{checks['greedy_tokens_agreed']} greedy tokens identical, the tokenizer encoding "
                 f"{checks['tokenizer_texts']} texts and rendering {checks['chat_renders']} chats as ours does.")
    return f"""---
library_name: transformers
license: mit
pipeline_tag: text-generation
tags: [nanochat, nanochat_jax]
---
# nanochat_jax d{cfg.depth} ({stage}, step {meta['step']})

A nanochat model trained with nanochat_jax (a JAX reimplementation of Karpathy's
nanochat), exported to transformers' native `nanochat` format: {n_params:,} parameters, {cfg.depth} layers of
width {cfg.d_model}, {cfg.n_head} heads ({cfg.n_kv_head} kv) of {cfg.head_dim}, context {cfg.sequence_len},
vocabulary {cfg.vocab_size:,}; weights in {dtype}. Tokenizer hash `{meta['tokenizer_hash']}` (also in config.json).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(DIR)
model = AutoModelForCausalLM.from_pretrained(DIR)
ids = tok.apply_chat_template([{{"role": "user", "content": "Why is the sky blue?"}}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=128)
print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
```
Chat format: `<|bos|><|user_start|>...<|user_end|><|assistant_start|>...<|assistant_end|>`; the model may call
a calculator with `<|python_start|>expr<|python_end|>` (nanochat_jax's engine then inserts
`<|output_start|>result<|output_end|>`; plain `generate` does not). Special-token strings inside message
text are tokenized as special tokens by transformers, as plain text by nanochat_jax.

## Verification
{checks_md}

## Metrics of the run
{metrics_md}
"""


def export(base_dir: str, stage: str, out: str, step: int | None = None, run_name: str | None = None,
           dtype: str = "fp32", verify: bool = True) -> dict:
    """Write the directory and (unless verify=False) check it -> the verification numbers (None if skipped)."""
    torch, transformers = hf_format.require_hf()
    if dtype not in ("fp32", "bf16"):
        raise UserError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    if os.path.exists(out) and os.listdir(out):
        raise UserError(f"--out {out} exists and is not empty: remove it or choose another directory")
    params, config, meta = restore_model(base_dir, stage, run_name=run_name, step=step)
    tok = Tokenizer.load(os.path.join(base_dir, "tokenizer"))
    check_tokenizer(meta, tok.hash, f"{stage} step {meta['step']}")
    cfg = model_lib.ModelConfig.from_config(config)
    if cfg.vocab_size != tok.vocab_size:
        raise UserError(f"the checkpoint's vocab_size {cfg.vocab_size} differs from the tokenizer's {tok.vocab_size}")

    tmp = f"{out.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    hf_cfg = hf_format.hf_config(cfg, tok, {"fp32": "float32", "bf16": "bfloat16"}[dtype])
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)
    hf_format.save_weights(hf_format.to_hf_tensors(params), tmp, dtype)
    with open(os.path.join(tmp, hf_format.TOKENIZER_FILE), "w") as f:
        f.write(hf_format.tokenizer_json(tok))
    transformers.PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(tmp, hf_format.TOKENIZER_FILE), bos_token="<|bos|>", eos_token="<|assistant_end|>",
        chat_template=hf_format.CHAT_TEMPLATE, model_max_length=cfg.sequence_len).save_pretrained(tmp)
    transformers.GenerationConfig(**_generation_config(tok)).save_pretrained(tmp)

    checks = None
    if verify:
        if dtype == "bf16":  # compare against our model on the weights as stored
            params = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
        try:
            checks = hf_format.verify(tmp, params, cfg, tok)
        except hf_format.VerificationError as e:
            failed = out.rstrip("/") + ".failed"
            shutil.rmtree(failed, ignore_errors=True)
            os.replace(tmp, failed)
            raise hf_format.VerificationError(f"{e} (the directory is kept at {failed})") from None
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(_model_card(base_dir, stage, meta, cfg, dtype, checks))
    if os.path.exists(out):
        os.rmdir(out)  # empty (checked above)
    os.replace(tmp, out)
    return checks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanochat_jax.export_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", default="sft", help="checkpoint stage: base, mid, sft, rl")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--base_dir", default=None, help="run directory (default: $NANOCHAT_BASE_DIR or runs/tiny)")
    p.add_argument("--run_name", default=None, help="run under the stage (default: the only one)")
    p.add_argument("--out", required=True, help="directory to write (must not exist or be empty)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="dtype of the stored weights")
    p.add_argument("--no-verify", action="store_true", help="skip loading the result with transformers")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)
    base_dir = args.base_dir or os.environ.get("NANOCHAT_BASE_DIR", "runs/tiny")
    try:
        checks = export(base_dir, args.stage, args.out, args.step, args.run_name, args.dtype, not args.no_verify)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if checks is None:
        print(f"exported to {args.out} (NOT verified: --no-verify)")
    else:
        print(f"exported to {args.out}; verified with transformers {checks['transformers']}: max |logit diff| "
              f"{checks['max_abs_logit_diff']:.3g} over {checks['logit_prompts']} prompts, "
              f"{checks['greedy_tokens_agreed']}/{hf_format.GREEDY_TOKENS} greedy tokens equal, tokenizer and chat "
              "template identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
