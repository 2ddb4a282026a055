"""Import a model in transformers' `nanochat` format into a run directory of ours.

    python -m nanochat_jax.import_hf --src DIR --out BASE_DIR [--stage sft] [--run_name hf] [--no-verify]

BASE_DIR then holds `tokenizer/` (our format, from tokenizer.json's ranks) and a params-only Orbax
checkpoint at checkpoints/<stage>/<run_name>/0 that checkpoint.restore_model and engine.load_model read:
chat with it (chat_cli, the Gradio app), evaluate it, fine-tune from it. What our model or tokenizer
cannot represent (another activation, RoPE variant, split regex, special tokens, ...) is refused with
a message naming it. A tokenizer.json that does not hash to what config.json recorded, or a vocabulary
of another size than the weights', is refused. Before writing, the import loads DIR with transformers
and checks that our model computes the same logits (hf_format.verify), unless --no-verify.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import jax
import numpy as np

from nanochat_jax import hf_format, model as model_lib
from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir
from nanochat_jax.config import UserError, base_config, validate
from nanochat_jax.tokenizer import META_FILE, Tokenizer

log = logging.getLogger(__name__)


def read_hf(src: str) -> tuple[dict, Tokenizer, dict]:
    """(config.json, our Tokenizer, our config.model fields) of a transformers directory, or a UserError."""
    try:
        with open(os.path.join(src, "config.json")) as f:
            hf = json.load(f)
        with open(os.path.join(src, hf_format.TOKENIZER_FILE)) as f:
            tok_text = f.read()
    except (OSError, ValueError) as e:
        raise UserError(f"{src} is not a readable transformers model directory ({e})") from None
    fields = hf_format.model_fields_from_hf(hf)
    tok = hf_format.tokenizer_from_json(tok_text, src)
    recorded = hf.get(hf_format.HASH_KEY)
    if recorded is not None and recorded != tok.hash:
        raise UserError(f"{src}: tokenizer.json hashes to {tok.hash[:12]} but config.json records {recorded[:12]}: "
                        "the tokenizer does not belong to these weights (edited or swapped)")
    if recorded is None:
        log.warning("%s records no tokenizer hash: the tokenizer's pairing with the weights rests on the checks", src)
    if hf.get("vocab_size") != tok.vocab_size:
        raise UserError(f"{src}: config.json has vocab_size {hf.get('vocab_size')} but tokenizer.json has "
                        f"{tok.vocab_size} tokens: they do not belong together")
    return hf, tok, fields


def import_hf(src: str, out: str, stage: str = "sft", run_name: str = "hf", verify: bool = True) -> dict:
    """Write <out>/tokenizer and <out>/checkpoints/<stage>/<run_name>/0 -> the verification numbers (None if skipped)."""
    if stage not in ("base", "mid", "sft", "rl"):
        raise UserError(f"--stage must be one of base, mid, sft, rl (the stages with checkpoints), got {stage!r}")
    hf_format.require_hf()
    hf, tok, fields = read_hf(src)
    config = base_config()
    config.base_dir, config.run_name = out, run_name
    config.model.update(fields)
    config.tokenizer.vocab_size = tok.vocab_size
    validate(config)
    cfg = model_lib.ModelConfig.from_config(config)
    params = hf_format.from_hf_tensors(hf_format.load_weights(src), cfg.depth, bool(hf.get("tie_word_embeddings")))
    expected = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
    bad = [f"{jax.tree_util.keystr(path)} {a.shape} (ours {b.shape})" for (path, a), b in
           zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(expected)) if a.shape != b.shape]
    if bad:
        raise UserError(f"{src}: weights of unexpected shape: {bad[:4]}")

    tok_dir = os.path.join(out, "tokenizer")
    if os.path.exists(os.path.join(tok_dir, META_FILE)):
        existing = Tokenizer.load(tok_dir).hash
        if existing != tok.hash:
            raise UserError(f"{tok_dir} holds another tokenizer ({existing[:12]}, this model's is {tok.hash[:12]}): "
                            "import into a new --out directory")
    ckpt_dir = checkpoint_dir(out, stage, run_name)
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise UserError(f"{ckpt_dir} already holds checkpoints: choose another --run_name or --out")
    checks = hf_format.verify(src, params, cfg, tok) if verify else None

    tok.save(tok_dir)
    ckpt = Checkpointer(ckpt_dir, keep=1, async_save=False)
    meta = dict(config=config.to_json(), tokenizer_hash=tok.hash, stage=stage, step=0, history={},
                imported_from=os.path.abspath(src), verification=checks)
    ckpt.save(0, jax.tree.map(np.asarray, params), None, train=dict(step=0, seed=config.seed), meta=meta)
    ckpt.close()
    return checks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanochat_jax.import_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="a transformers directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--out", required=True, help="run directory to write (our base_dir)")
    p.add_argument("--stage", default="sft", help="stage to file the checkpoint under (base, mid, sft, rl)")
    p.add_argument("--run_name", default="hf", help="run name under the stage")
    p.add_argument("--no-verify", action="store_true", help="skip comparing with transformers before writing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        checks = import_hf(args.src, args.out, args.stage, args.run_name, not args.no_verify)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    how = "NOT verified (--no-verify)" if checks is None else (
        f"verified: max |logit diff| {checks['max_abs_logit_diff']:.3g}, {checks['greedy_tokens_agreed']}/"
        f"{hf_format.GREEDY_TOKENS} greedy tokens equal")
    print(f"imported {args.src} -> {args.out} (stage {args.stage}, run {args.run_name}); {how}. Chat: "
          f"python -m nanochat_jax.chat_cli --stage {args.stage} --base_dir {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
