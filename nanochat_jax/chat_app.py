"""Chat with a run's checkpoints in the browser (Gradio): streamed replies, stop, sampling controls, a
checkpoint picker, the run's report and the model's provenance.

    python -m nanochat_jax.chat_app [--base_dir DIR] [--stage sft] [--step N] [--host 127.0.0.1] [--port 7860]

Serving: the loaded engines are shared by every session (config.chat.loaded_models checkpoints stay
in memory). Replies go through Gradio's queue: config.chat.concurrency are generated at once, at most
config.chat.queue_size wait, and a reply stops after config.chat.timeout_s. A request outside the
limits of STAGES.md §7 gets a message in the UI, never an error. Stop, or a client that goes away,
closes the reply's generator, which ends generation after the current token.

The chat is also an API: gradio_client.Client(url).submit(message, chat, checkpoint, temperature,
top_k, max_tokens, api_name="/chat") streams (textbox, chat, status) tuples.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import logging
import os
import random
import re
import sys
import threading
import time

from nanochat_jax.chat_cli import ChatSession
from nanochat_jax.checkpoint import checkpoint_dir
from nanochat_jax.config import KNOWN_STAGES, UserError, base_config
from nanochat_jax.engine import load_model
from nanochat_jax.report import report_dir

log = logging.getLogger(__name__)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry calls home unless the user asks

TOOL_TITLE = "🧮 calculator"
STREAM_EVERY_S = 0.05  # at most ~20 UI updates a second per reply, whatever the token rate
_LABEL = re.compile(r"^(\w+) step (\d+)(?: \((.+)\))?$")


# ----------------------------------------------------------------------------------------------
# Checkpoints


def list_checkpoints(base_dir: str) -> list[str]:
    """Labels "<stage> step <N>" (+ " (<run>)" where a stage has several runs) of every saved step."""
    labels = []
    for stage in KNOWN_STAGES:
        stage_dir = os.path.join(base_dir, "checkpoints", stage)
        runs = sorted(os.listdir(stage_dir)) if os.path.isdir(stage_dir) else []
        for run in runs:
            steps = sorted(int(s) for s in os.listdir(os.path.join(stage_dir, run)) if s.isdigit())
            labels += [f"{stage} step {s}" + (f" ({run})" if len(runs) > 1 else "") for s in steps]
    return labels


def default_checkpoint(labels: list[str], stage: str, step: int | None) -> str | None:
    """The requested step of the stage, or its latest; None when it has none."""
    mine = [lab for lab in labels if _LABEL.match(lab)[1] == stage]
    if step is not None:
        mine = [lab for lab in mine if int(_LABEL.match(lab)[2]) == step]
    return max(mine, key=lambda lab: int(_LABEL.match(lab)[2]), default=None)


def launch_command(base_dir: str) -> str | None:
    """The command that chats with the run's most advanced stage (rl, sft, mid, base); None without checkpoints."""
    labels = list_checkpoints(base_dir)
    stage = next((s for s in ("rl", "sft", "mid", "base") if default_checkpoint(labels, s, None)), None)
    return stage and f"python -m nanochat_jax.chat_app --base_dir {base_dir} --stage {stage}"


class Models:
    """Checkpoints loaded on demand and shared by every session; the `keep` last used stay loaded."""

    def __init__(self, base_dir: str, keep: int):
        self.base_dir, self.keep = base_dir, keep
        self.lock, self.load_lock = threading.Lock(), threading.Lock()
        self.loaded = collections.OrderedDict()  # label -> (ChatModel, description markdown)

    def _cached(self, label: str):
        with self.lock:
            if label in self.loaded:
                self.loaded.move_to_end(label)
                return self.loaded[label]
        return None

    def get(self, label: str):
        match = _LABEL.match(label or "")
        if not match:
            raise UserError(f"no such checkpoint {label!r}")
        if found := self._cached(label):
            return found
        with self.load_lock:  # one load at a time, while the loaded models go on serving
            if found := self._cached(label):
                return found
            stage, step, run = match[1], int(match[2]), match[3]
            model, tokenizer, meta = load_model(stage, step, self.base_dir, run)
            model.chat([{"role": "user", "content": "hi"}], max_tokens=2)  # compile before a user waits
            with self.lock:
                self.loaded[label] = (model, describe(model, tokenizer, meta, self.base_dir, stage))
                while len(self.loaded) > self.keep:
                    self.loaded.popitem(last=False)
                return self.loaded[label]


def describe(model, tokenizer, meta: dict, base_dir: str, stage: str) -> str:
    import jax

    n_params = sum(x.size for x in jax.tree.leaves(model.engine.params))
    config = json.loads(meta["config"]) if isinstance(meta.get("config"), str) else meta.get("config", {})
    path = os.path.join(checkpoint_dir(base_dir, stage, config.get("run_name", "?")), str(meta["step"]))
    saved = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(os.path.getmtime(path))) if os.path.exists(path) else "?"
    rows = [("stage", stage), ("step", meta["step"]), ("run", config.get("run_name", "?")),
            ("parameters", f"{n_params:,}"), ("context", f"{model.engine.cfg.sequence_len} tokens"),
            ("tokenizer hash", f"`{tokenizer.hash}`"), ("checkpoint", f"`{path}`"), ("saved", saved)]
    rows += [(k, v) for k, v in meta.items() if k not in ("config", "step", "stage", "tokenizer_hash")
             and isinstance(v, (str, int, float))]  # what the stage recorded: its parent, metrics
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (f"| checkpoint | |\n|---|---|\n{table}\n\n**config**\n\n```json\n{json.dumps(config, indent=1)}\n```\n")


# ----------------------------------------------------------------------------------------------
# Requests and replies


def message_text(content) -> str:
    """A chat message's text: Gradio 6 hands content over as a list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    return "".join(c.get("text") or "" if isinstance(c, dict) else str(c) for c in content or [])


def check_request(cfg, message: str, chat: list[dict], temperature, top_k, max_tokens) -> str | None:
    """What is wrong with a request, in words for the user; None if it is fine."""
    if not message or not message.strip():
        return "Please type a message."
    if len(message) > cfg.max_message_chars:
        return (f"Your message has {len(message):,} characters; the limit is {cfg.max_message_chars:,}. "
                "Please shorten it.")
    if len(chat) + 1 > cfg.max_messages:
        return f"This conversation has reached {cfg.max_messages} messages: please clear it to go on."
    total = len(message) + sum(len(message_text(m.get("content"))) for m in chat)
    if total > cfg.max_total_chars:
        return f"This conversation has {total:,} characters (limit {cfg.max_total_chars:,}): please clear it."
    for name, value, low, high in (("temperature", temperature, 0, cfg.max_temperature),
                                   ("top-k", top_k, 1, cfg.max_top_k), ("max tokens", max_tokens, 1, cfg.max_max_tokens)):
        if value is None or not low <= value <= high:
            return f"{name} must be between {low} and {high}, got {value}."
    return None


def render_reply(model, reply: list[int]) -> list[dict]:
    """Reply tokens -> chat messages: prose as it is, each calculator call (expression and forced result)
    as a message of its own under the calculator title."""
    e = model.engine
    parts = [["text", []]]  # [kind, token ids]; kinds: text, expr, output
    for t in reply:
        if t in e.stop_ids:
            continue
        if t in (e.python_start, e.output_start):
            parts.append(["expr" if t == e.python_start else "output", []])
        elif (t == e.python_end and parts[-1][0] == "expr") or (t == e.output_end and parts[-1][0] == "output"):
            parts.append(["text", []])
        else:
            parts[-1][1].append(t)
    messages = []
    for kind, ids in parts:
        text = model.tokenizer.decode(ids).rstrip("\ufffd")  # a split UTF-8 character waits for its rest
        text = "".join(c for c in text if c.isprintable() or c in "\n\t")  # a weak model emits any byte
        if kind == "output" and messages and messages[-1].get("metadata"):
            messages[-1]["content"] += f" = `{text}`"
        elif kind != "text":
            messages.append({"role": "assistant", "content": f"`{text}`", "metadata": {"title": TOOL_TITLE}})
        elif text.strip():
            messages.append({"role": "assistant", "content": text})
    return messages


class ChatServer:
    """The app's state shared by all sessions: models, limits, and counters the tests read."""

    def __init__(self, base_dir: str, cfg):
        self.base_dir, self.cfg = base_dir, cfg
        self.models = Models(base_dir, cfg.loaded_models)
        self.lock = threading.Lock()
        self.stats = collections.Counter()  # active, peak (most active at once), tokens, replies, closed_early, timeouts

    def _count(self, **deltas):
        with self.lock:
            self.stats.update(deltas)
            self.stats["peak"] = max(self.stats["peak"], self.stats["active"])

    def load(self, label: str) -> tuple[object | None, str]:
        """-> (ChatModel or None, the Model tab's markdown or why it failed)."""
        try:
            model, info = self.models.get(label)
            return model, info
        except Exception as e:  # a corrupt or missing checkpoint must not take the app down
            log.warning("loading %s failed: %s", label, e)
            return None, f"Could not load checkpoint {label}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"

    def respond(self, message, chat, session, label, temperature, top_k, max_tokens):
        """Stream the reply -> (textbox, chat, session, status) after each chunk."""
        import gradio as gr

        chat = list(chat or [])
        problem = check_request(self.cfg, message, chat, temperature, top_k, max_tokens)
        model, info = (None, None) if problem else self.load(label)
        if problem or model is None:
            gr.Warning(problem or info)
            yield message, chat, session, problem or info
            return
        if session is None or session.model is not model:  # new, or the user picked another checkpoint
            history, seed = (session.history, session.seed) if session else ([], random.randrange(2**31))
            session = ChatSession(model, seed=seed)
            session.history = history
        session.temperature, session.top_k, session.out = float(temperature), int(top_k), io.StringIO()
        chat.append({"role": "user", "content": message})
        reply, status, t0, shown = [], "", time.monotonic(), 0.0
        stream = session.stream(message, int(max_tokens))
        self._count(active=1)
        try:
            for token in stream:
                reply.append(token)
                self._count(tokens=1)
                if time.monotonic() - t0 > self.cfg.timeout_s:
                    status = f"Stopped: a reply may take at most {self.cfg.timeout_s:g} s."
                    self._count(timeouts=1)
                    break
                if time.monotonic() - shown >= STREAM_EVERY_S:
                    shown = time.monotonic()
                    yield "", chat + render_reply(model, reply), session, session.out.getvalue().strip()
            if not status and reply and reply[-1] not in model.engine.stop_ids:
                status = f"Stopped at {len(reply)} tokens (the max tokens setting or the end of the context)."
            notice = session.out.getvalue().strip()
            yield "", chat + (render_reply(model, reply) or [{"role": "assistant", "content": "(empty reply)"}]), \
                session, "  \n".join(s for s in (notice, status) if s)
            self._count(replies=1)
        except GeneratorExit:  # stop button or client gone: Gradio closed this generator
            self._count(closed_early=1)
            raise
        finally:
            stream.close()  # the session's history keeps what was generated
            self._count(active=-1)


def report_markdown(base_dir: str) -> str:
    """report.md with its images served by Gradio (their folder is in allowed_paths)."""
    path = os.path.join(base_dir, "report.md")
    if not os.path.exists(path):
        return f"No report yet: `python -m nanochat_jax.report --base_dir {base_dir}` writes {os.path.abspath(path)}."
    with open(path, errors="replace") as f:
        text = f.read()
    root = os.path.abspath(base_dir)
    return re.sub(r"!\[([^\]]*)\]\((?![a-z]+:|/)([^)]+)\)", lambda m: f"![{m[1]}](/gradio_api/file={root}/{m[2]})", text)


# ----------------------------------------------------------------------------------------------
# The app


def build_app(base_dir: str, stage: str = "sft", step: int | None = None, cfg=None):
    """-> (gr.Blocks with its queue set, ChatServer). Raises UserError when the run has no checkpoint."""
    import gradio as gr

    cfg = cfg or base_config().chat
    server = ChatServer(base_dir, cfg)
    labels = list_checkpoints(base_dir)
    if not labels:
        raise UserError(f"no checkpoints under {os.path.abspath(base_dir)}/checkpoints: train a stage first")
    default = default_checkpoint(labels, stage, step) or labels[-1]
    _, info = server.load(default)
    with gr.Blocks(title="nanochat_jax") as demo:
        session = gr.State(None)
        with gr.Tab("Chat"):
            with gr.Row():
                with gr.Column(scale=4):
                    chatbot = gr.Chatbot(label="nanochat_jax", height=460, elem_id="chatbot")
                    message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                                         elem_id="message", autofocus=True)
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="send")
                        stop = gr.Button("Stop", variant="stop", elem_id="stop")
                        clear = gr.Button("Clear conversation", elem_id="clear")
                    status = gr.Markdown(elem_id="status")
                with gr.Column(scale=1):
                    checkpoint = gr.Dropdown(labels, value=default, label="checkpoint", elem_id="checkpoint")
                    temperature = gr.Slider(0, cfg.max_temperature, value=cfg.temperature, step=0.05, label="temperature")
                    top_k = gr.Slider(1, cfg.max_top_k, value=cfg.top_k, step=1, label="top-k")
                    max_tokens = gr.Slider(1, cfg.max_max_tokens, value=cfg.max_tokens, step=1, label="max tokens")
        with gr.Tab("Report"):
            gr.Markdown(report_markdown(base_dir))
        with gr.Tab("Model"):
            model_info = gr.Markdown(info)
        reply = gr.on([message.submit, send.click], server.respond,
                      inputs=[message, chatbot, session, checkpoint, temperature, top_k, max_tokens],
                      outputs=[message, chatbot, session, status], api_name="chat",
                      concurrency_limit=cfg.concurrency, concurrency_id="engine")
        stop.click(None, cancels=[reply], api_name="stop")
        clear.click(lambda: ([], None, ""), outputs=[chatbot, session, status], cancels=[reply], api_name="clear")
        checkpoint.change(lambda label: server.load(label)[1], checkpoint, model_info, api_name="load")
        demo.load(lambda: gr.Dropdown(choices=list_checkpoints(base_dir)), outputs=checkpoint)  # new ones appear
    demo.queue(max_size=cfg.queue_size, default_concurrency_limit=cfg.concurrency)
    return demo, server


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Chat with a nanochat_jax run in the browser.")
    p.add_argument("--base_dir", default=os.environ.get("NANOCHAT_BASE_DIR", "runs/tiny"))
    p.add_argument("--stage", default="sft", help="the checkpoint picked at start (its latest step unless --step)")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's read-only-restore chatter
    try:
        demo, _ = build_app(args.base_dir, args.stage, args.step)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    demo.launch(server_name=args.host, server_port=args.port, allowed_paths=[report_dir(args.base_dir)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
