"""Latency of the Gradio chat for N simultaneous users (gradio_client over loopback).

    python bench/chat_latency.py --base_dir runs/d20 --stage sft   # a real run's checkpoint
    python bench/chat_latency.py                                    # a tiny random model (CPU smoke run)

The app runs as `python -m nanochat_jax.chat_app` in a subprocess (its own process, as in use); N
threads here each open their own gradio_client session at once and send one message. Per user:
time to the first streamed chunk holding reply text (TTFT) and to the end of the reply. Printed:
median / p90 / max of both, reply tokens, and the app's settings (config.chat: concurrency, queue).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np


def make_tiny_run(base_dir: str, sequence_len: int = 1024, stage: str = "sft", step: int = 5, depth: int = 1,
                  compute_dtype: str = "float32") -> str:
    """A run directory with a tiny tokenizer (300 tokens) and one random checkpoint of `depth` layers
    (d_model 64 x depth; head_dim 64 at depth 1, else 128 as d20) that never emits a stop token (random words until max_tokens or
    the context ends) -> the checkpoint's label."""
    import jax
    import jax.numpy as jnp

    from nanochat_jax import model as model_lib
    from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir
    from nanochat_jax.config import base_config
    from nanochat_jax.tokenizer import SPECIAL_TOKENS, Tokenizer

    texts = [f"hello world, the cat number {i} sat on {i * 7} mats; quick brown fox. héllo ünïcode {i}" for i in range(300)]
    tok = Tokenizer.train(texts, 300)
    tok.save(os.path.join(base_dir, "tokenizer"))
    config = base_config()
    config.run_name = "tiny"
    config.model.depth, config.model.head_dim, config.model.sequence_len = depth, 64 if depth == 1 else 128, sequence_len
    config.model.compute_dtype, config.tokenizer.vocab_size = compute_dtype, tok.vocab_size
    cfg = model_lib.ModelConfig.from_config(config)
    params = model_lib.init_params(cfg, jax.random.key(0))  # blocks add nothing at init (zero projections)
    # hidden state = rms_norm(embedding): a large first coordinate for every token lets the head push the
    # stop tokens far down; the rest of the head is random, so replies are random text
    wte = np.array(jax.random.normal(jax.random.key(1), params["wte"]["embedding"].shape))
    wte[:, 0] = 3.0
    head = 0.3 * np.array(jax.random.normal(jax.random.key(2), params["lm_head"]["kernel"].shape))
    specials = {tok.encode_special(name) for name in SPECIAL_TOKENS}
    for i in range(tok.vocab_size):  # no stop or tool tokens, no markdown, no partial UTF-8 characters
        text = "" if i in specials else tok.decode([i])
        if not text or not all(c.isalnum() or c in " .,;:'!?-" for c in text):  # plain words: readable
            head[:, i] = 0.0
            head[0, i] = -20.0
    params["wte"]["embedding"], params["lm_head"]["kernel"] = jnp.asarray(wte), jnp.asarray(head)
    ckpt = Checkpointer(checkpoint_dir(base_dir, stage, config.run_name), async_save=False)
    ckpt.save(step, params, {"count": jnp.zeros((), jnp.int32)}, {"step": step},
              {"config": config.to_json(), "tokenizer_hash": tok.hash, "stage": stage})
    ckpt.close()
    return f"{stage} step {step}"


def reply_text(chat: list) -> str:
    """The last assistant turn's text out of a Chatbot value (messages after the last user message)."""
    from nanochat_jax.chat_app import message_text

    last_user = max(i for i, m in enumerate(chat) if m["role"] == "user")
    return "".join(message_text(m["content"]) for m in chat[last_user + 1:])


def one_user(url: str, message: str, label: str, max_tokens: int, out: dict, start: threading.Event) -> None:
    """One session: wait for the start signal, send, record the stream's timing into `out`."""
    from gradio_client import Client

    client = Client(url, verbose=False, analytics_enabled=False)
    start.wait()
    t0 = time.perf_counter()
    job = client.submit(message, [], label, 0.8, 50, max_tokens, api_name="/chat")
    chunks, ttft, final = 0, None, None
    for output in job:
        chunks += 1
        final = output
        if ttft is None and reply_text(output[1]):
            ttft = time.perf_counter() - t0
    out.update(ttft=ttft, total=time.perf_counter() - t0, chunks=chunks, text=reply_text(final[1]) if final else "",
               status=final[2] if final else None)
    client.close()


def run_users(url: str, n: int, label: str, max_tokens: int, message: str = "Hello! héllo 👋 how are you?") -> list[dict]:
    results, start = [dict() for _ in range(n)], threading.Event()
    threads = [threading.Thread(target=one_user, args=(url, message, label, max_tokens, r, start)) for r in results]
    for t in threads:
        t.start()
    time.sleep(2.0)  # every client connected (each fetches the app's config) before the simultaneous send
    start.set()
    for t in threads:
        t.join()
    return results


def summarize(results: list[dict]) -> str:
    rows = ["| | median s | p90 s | max s |", "|---|---|---|---|"]
    for key in ("ttft", "total"):
        vals = sorted(r[key] for r in results if r.get(key) is not None)
        if vals:
            rows.append(f"| {key} | {statistics.median(vals):.3f} | {np.percentile(vals, 90):.3f} | {vals[-1]:.3f} |")
    return "\n".join(rows)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base_dir", default=None, help="a run with checkpoints (default: a tiny random one)")
    p.add_argument("--stage", default="sft")
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument("--random_depth", type=int, default=1, help="without --base_dir: layers of the random model "
                   "(20: d20's blocks, with a 300-token vocabulary)")
    args = p.parse_args()
    base_dir = args.base_dir or tempfile.mkdtemp(prefix="chat_latency_")
    if args.base_dir is None:
        make_tiny_run(base_dir, sequence_len=2048 if args.random_depth > 1 else 1024, depth=args.random_depth,
                      compute_dtype="auto" if args.random_depth > 1 else "float32")
    from nanochat_jax.chat_app import default_checkpoint, list_checkpoints
    from nanochat_jax.config import base_config

    label = default_checkpoint(list_checkpoints(base_dir), args.stage, None)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "nanochat_jax.chat_app", "--base_dir", base_dir, "--stage",
                               args.stage, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/"
    try:
        import httpx
        for _ in range(600):  # loading + compiling the model can take a minute on a GPU
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise SystemExit(f"the app did not come up: {server.stderr.read().decode()[-2000:]}")
        run_users(url, 2, label, args.max_tokens)  # warm: compiles the attention lengths these replies reach
        results = run_users(url, args.users, label, args.max_tokens)
    finally:
        server.terminate()
        server.wait(30)
    cfg = base_config().chat
    lengths = [len(r["text"]) for r in results]
    print(f"{args.users} users, one message each, max_tokens {args.max_tokens}, checkpoint {label!r}, "
          f"concurrency {cfg.concurrency}, queue {cfg.queue_size}; reply characters median {statistics.median(lengths)}")
    print(f"chunks per reply: median {statistics.median(r['chunks'] for r in results)}; "
          f"failed: {sum(1 for r in results if not r['text'])}")
    print(summarize(results))


if __name__ == "__main__":
    main()
