"""How close transformers' NanoChatForCausalLM stays to our fp32 forward at a real size, and what the
export costs: a random checkpoint of depth d (the zero-initialised projections and head drawn like the
other matrices, so every layer contributes), exported and verified by export_hf.

    python bench/hf_verify.py --depth 20 [--vocab 65536] [--dtype fp32|bf16]

Prints one table row: params, export+verify seconds, max |logit diff|, greedy tokens agreed. The
tokenizer is trained on Debian's Python docs at the requested vocabulary (seconds). Run it on a machine
with ~4x the fp32 params in free RAM (d20: ~10 GB); the verification itself runs on CPU.
"""
import argparse
import pathlib
import sys
import tempfile
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from nanochat_jax import checkpoint as ckpt_lib, export_hf, model as model_lib  # noqa: E402
from nanochat_jax.config import base_config  # noqa: E402
from nanochat_jax.tokenizer import Tokenizer, iter_dir_texts  # noqa: E402

DOCS = pathlib.Path("/usr/share/doc/python3.11/html/_sources")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--aspect_ratio", type=int, default=64)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = pathlib.Path(tmp) / "run"
        tok = Tokenizer.train(iter_dir_texts(DOCS), args.vocab)
        tok.save(base / "tokenizer")
        c = base_config()
        c.base_dir, c.run_name = str(base), "bench"
        c.model.update(depth=args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim)
        c.tokenizer.vocab_size = tok.vocab_size
        cfg = model_lib.ModelConfig.from_config(c)
        params = model_lib.init_params(cfg, jax.random.key(0))
        keys = iter(jax.random.split(jax.random.key(1), 16))
        redraw = lambda w: model_lib._matrix_init(next(keys), w.shape) if not w.any() else w
        params = jax.tree.map(redraw, params)
        ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(str(base), "sft", "bench"), async_save=False)
        ckpt.save(1, params, None, train=dict(step=1), meta=dict(config=c.to_json(), tokenizer_hash=tok.hash,
                                                                   stage="sft", step=1, history={}))
        ckpt.close()
        del params
        t0 = time.time()
        checks = export_hf.export(str(base), "sft", str(pathlib.Path(tmp) / "hf"), dtype=args.dtype)
        dt = time.time() - t0
    n = model_lib.param_counts(cfg)["total"]
    print("| depth | params | dtype | export + verify | max abs logit diff | greedy tokens agreed | device |")
    print("|---|---|---|---|---|---|---|")
    print(f"| d{args.depth} | {n:,} | {args.dtype} | {dt:.0f} s | {checks['max_abs_logit_diff']:.2e} | "
          f"{checks['greedy_tokens_agreed']}/32 | {jax.devices()[0].device_kind} |")


if __name__ == "__main__":
    main()
