"""Gradio chat: the API through gradio_client (streaming, stop, limits, bad input, 20 concurrent clients,
a client that disconnects, a checkpoint that fails to load) and a real browser (Debian's chromium
driven by Playwright) on a tiny random checkpoint saved by the test."""
import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import ml_collections
import pytest

from bench.chat_latency import free_port, make_tiny_run, reply_text, run_users, summarize
from nanochat_jax import chat_app, report
from nanochat_jax.config import base_config

LABEL = "sft step 5"
TOKEN_DELAY_S = 0.005  # the test model streams ~3K tok/s on CPU; a d20 on one GPU streams ~250-430:
# slowed to that rate, a reply lasts long enough to be stopped mid-way
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    base = tmp_path_factory.mktemp("chat_run")
    make_tiny_run(str(base), sequence_len=1024)
    # a checkpoint that cannot load: step 9 with its params item emptied
    run_dir = base / "checkpoints" / "sft" / "tiny"
    shutil.copytree(run_dir / "5", run_dir / "9")
    shutil.rmtree(run_dir / "9" / "params")
    (run_dir / "9" / "params").mkdir()
    report.write_section(str(base), "base", "## Base training\n\ntrained", {"val_bpb_final": 1.5, "seconds": 10.0})
    report.build(str(base), 3.0)
    cfg = ml_collections.ConfigDict(base_config().chat.to_dict())
    cfg.concurrency, cfg.queue_size = 2, 24
    demo, server = chat_app.build_app(str(base), "sft", 5, cfg)
    model, _ = server.models.get(LABEL)
    fast = model.generate

    def slowed(*args, **kwargs):
        for token in fast(*args, **kwargs):
            time.sleep(TOKEN_DELAY_S)
            yield token

    model.generate = slowed
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[report.report_dir(str(base))])
    url = f"http://127.0.0.1:{port}/"
    run_users(url, 1, LABEL, 1000)  # compiles every attention length a reply reaches, before timings
    yield dict(url=url, server=server, base=base, cfg=cfg, model=model)
    demo.close()


@pytest.fixture
def client(app):
    from gradio_client import Client

    c = Client(app["url"], verbose=False, analytics_enabled=False)
    yield c
    c.close()


def _stream(job):
    """-> (chunks, final output); chunks are the reply texts in arrival order."""
    chunks, last = [], None
    for out in job:
        chunks.append(reply_text(out[1]))
        last = out
    return chunks, last


def _wait(predicate, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_render_reply_shows_calculator_calls_apart(app):
    model = app["model"]
    tok, e = model.tokenizer, model.engine
    reply = [*tok.encode("Let me add "), e.python_start, *tok.encode("2+3"), e.python_end, e.output_start,
             *tok.encode("5"), e.output_end, *tok.encode(" so 5."), e.stop_ids[0]]
    assert chat_app.render_reply(model, reply) == [
        {"role": "assistant", "content": "Let me add "},
        {"role": "assistant", "content": "`2+3` = `5`", "metadata": {"title": chat_app.TOOL_TITLE}},
        {"role": "assistant", "content": " so 5."}]
    # streaming: an expression still being written shows as a pending call
    assert chat_app.render_reply(model, reply[:reply.index(e.python_end)])[-1]["content"] == "`2+3`"


def test_check_request_limits():
    cfg = base_config().chat
    ok = dict(temperature=0.8, top_k=50, max_tokens=512)
    assert chat_app.check_request(cfg, "hi", [], **ok) is None
    assert "type a message" in chat_app.check_request(cfg, " \n", [], **ok)
    assert "100,000 characters; the limit is 8,000" in chat_app.check_request(cfg, "x" * 100_000, [], **ok)
    long_chat = [{"role": "user", "content": "y" * 7000}] * 5
    assert "35,002 characters (limit 32,000)" in chat_app.check_request(cfg, "hi", long_chat, **ok)
    assert "500 messages" in chat_app.check_request(cfg, "hi", [{"role": "user", "content": ""}] * 500, **ok)
    for bad, word in ((dict(temperature=2.5), "temperature"), (dict(top_k=0), "top-k"), (dict(top_k=201), "top-k"),
                      (dict(max_tokens=5000), "max tokens"), (dict(temperature=-0.1), "temperature")):
        assert word in chat_app.check_request(cfg, "hi", [], **{**ok, **bad})


def test_streams_in_chunks_and_goes_on_with_the_conversation(app, client):
    chunks, out = _stream(client.submit("Hello there!", [], LABEL, 0.8, 50, 300, api_name="/chat"))
    texts = [c for c in chunks if c]
    assert len(texts) >= 3, chunks  # several chunks before the end, each extending the last
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])) and len(texts[-1]) > len(texts[0])
    assert out[0] == "" and "Stopped at 300 tokens" in out[2]
    chat = out[1]
    assert [m["role"] for m in chat] == ["user", "assistant"]
    _, out2 = _stream(client.submit("And then?", chat, LABEL, 0.0, 1, 20, api_name="/chat"))
    assert [m["role"] for m in out2[1]] == ["user", "assistant", "user", "assistant"]
    assert reply_text(out2[1]) and out2[1][2]["content"][0]["text"] == "And then?"
    assert client.predict(api_name="/clear")[0] == []


def test_stop_ends_generation_and_the_engine_serves_the_next(app, client):
    server = app["server"]
    before = server.stats.copy()
    job = client.submit("Tell me a long story", [], LABEL, 0.8, 50, 4096, api_name="/chat")
    assert _wait(lambda: len(job.outputs()) >= 2 and reply_text(job.outputs()[-1][1]))
    job.cancel()
    assert _wait(lambda: server.stats["closed_early"] == before["closed_early"] + 1 and server.stats["active"] == 0)
    tokens = server.stats["tokens"]
    time.sleep(0.5)
    assert server.stats["tokens"] == tokens  # nothing generated after the stop
    assert tokens - before["tokens"] < 1000 - 40  # the whole reply would fill the 1024-token context
    _, out = _stream(client.submit("next one", [], LABEL, 0.8, 50, 10, api_name="/chat"))
    assert reply_text(out[1]) and "Stopped at 10 tokens" in out[2]


def test_bad_input_gets_a_message_not_an_error(app, client):
    for message, expected in (("", "Please type a message"), ("   ", "Please type a message"),
                              ("x" * 100_000, "100,000 characters; the limit is 8,000")):
        box, chat, status = client.predict(message, [], LABEL, 0.8, 50, 16, api_name="/chat")
        assert expected in status and chat == [] and box == message  # kept for the user to edit
    full = [{"role": r, "content": [{"type": "text", "text": "hi"}]} for r in ("user", "assistant")] * 250
    assert "500 messages" in client.predict("hi", full, LABEL, 0.8, 50, 16, api_name="/chat")[2]
    with pytest.raises(Exception, match="maximum"):  # outside a slider's range: Gradio's own message
        client.predict("hi", [], LABEL, 5.0, 50, 16, api_name="/chat")
    text = "héllo wörld 👋🏽 你好 — ∑ x² ✓"
    _, chat, status = client.predict(text, [], LABEL, 0.8, 50, 24, api_name="/chat")
    assert chat[0]["content"][0]["text"] == text and reply_text(chat)


def test_checkpoint_that_fails_to_load_leaves_the_app_up(app, client):
    assert chat_app.list_checkpoints(str(app["base"])) == ["sft step 5", "sft step 9"]
    assert chat_app.launch_command(str(app["base"])) == f"python -m nanochat_jax.chat_app --base_dir {app['base']} --stage sft"
    info = client.predict("sft step 9", api_name="/load")
    assert info.startswith("Could not load checkpoint sft step 9")
    _, chat, status = client.predict("hi", [], "sft step 9", 0.8, 50, 8, api_name="/chat")
    assert status.startswith("Could not load checkpoint sft step 9") and chat == []
    assert "| parameters |" in client.predict(LABEL, api_name="/load")
    _, chat, _ = client.predict("hi", [], LABEL, 0.8, 50, 8, api_name="/chat")
    assert reply_text(chat)


def test_client_that_disconnects_mid_stream(app, client):
    """A client process killed while its reply streams: the reply's generator is closed, the engine serves the next."""
    server = app["server"]
    before = server.stats.copy()
    script = textwrap.dedent(f"""
        from gradio_client import Client
        job = Client({app['url']!r}, verbose=False, analytics_enabled=False).submit(
            "a long one", [], {LABEL!r}, 0.8, 50, 4096, api_name="/chat")
        for out in job:
            if out[1] and len(out[1]) > 1:
                print("streaming", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "streaming"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _wait(lambda: server.stats["closed_early"] == before["closed_early"] + 1 and server.stats["active"] == 0)
    assert server.stats["tokens"] - before["tokens"] < 1000 - 40
    _, out = _stream(client.submit("after", [], LABEL, 0.8, 50, 10, api_name="/chat"))
    assert reply_text(out[1])


def test_per_request_time_limit(app, client):
    server = app["server"]
    timeouts = server.stats["timeouts"]
    app["cfg"].timeout_s = 0.5
    try:
        _, out = _stream(client.submit("slow", [], LABEL, 0.8, 50, 4096, api_name="/chat"))
    finally:
        app["cfg"].timeout_s = 120.0
    assert "at most 0.5 s" in out[2] and reply_text(out[1]) and server.stats["timeouts"] == timeouts + 1


def test_twenty_concurrent_clients(app):
    server = app["server"]
    server.stats["peak"] = 0
    results = run_users(app["url"], 20, LABEL, 32)
    assert all(r["text"] and "Stopped at 32 tokens" in r["status"] for r in results), results
    assert server.stats["peak"] == app["cfg"].concurrency  # bounded: the rest waited in the queue
    print(f"\n20 clients, 32 tokens each (model slowed to {1 / TOKEN_DELAY_S:.0f} tok/s, concurrency "
          f"{app['cfg'].concurrency}):\n{summarize(results)}")


def test_queue_is_bounded(app):
    from gradio_client import Client

    cfg = app["cfg"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        clients = list(pool.map(lambda _: Client(app["url"], verbose=False, analytics_enabled=False),
                                range(cfg.concurrency + cfg.queue_size + 4)))
    jobs = [c.submit("queue", [], LABEL, 0.8, 50, 300, api_name="/chat") for c in clients]
    try:  # concurrency + queue_size are taken; the last ones are turned away at once
        assert _wait(lambda: sum(j.done() for j in jobs) >= 4, timeout=30)
        rejected = [str(j.exception()) for j in jobs if j.done() and j.exception() is not None]
        assert len(rejected) >= 4 and all("queue is full" in r.lower() for r in rejected), rejected
    finally:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda job: job.cancel(), jobs))
            list(pool.map(lambda c: c.close(), clients))  # each waits up to 1 s for its heartbeat thread
    # every cancelled reply stops generating. (A reply cancelled in the instant Gradio starts it can stay
    # open, suspended, where Gradio keeps a reference to it: `active` may not return to 0 here.)
    server = app["server"]
    assert _wait(lambda: server.stats["tokens"] == (time.sleep(0.5) or server.stats["tokens"]), timeout=30)
    before = server.stats["replies"]
    results = run_users(app["url"], 1, LABEL, 8)
    assert results[0]["text"] and server.stats["replies"] == before + 1


def test_report_markdown_serves_the_plots(app):
    md = chat_app.report_markdown(str(app["base"]))
    assert f"(/gradio_api/file={app['base']}/report/report_curves.png)" in md and "| CORE |" in md


def test_cli_without_checkpoints(tmp_path, capsys):
    assert chat_app.launch_command(str(tmp_path)) is None
    assert chat_app.main(["--base_dir", str(tmp_path), "--port", "0"]) == 2
    assert "no checkpoints under" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (./setup.sh installs it)")
def test_browser_end_to_end(app, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    server = app["server"]
    shot = tmp_path / "chat_app.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])  # root in CI: no sandbox
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(app["url"])
        bot = page.locator("#chatbot .message.bot").last
        # a reply of the default 512 tokens (~3 s): type, send, wait for the streamed reply and its end
        page.locator("#message textarea").fill("Hello from the browser 👋")
        page.locator("#message textarea").press("Enter")
        expect(page.locator("#chatbot .message.user").last).to_contain_text("Hello from the browser 👋")
        expect(page.locator("#status")).to_contain_text("Stopped at 512 tokens", timeout=30_000)
        assert len(bot.inner_text().strip()) > 20
        # a long reply (1024-token context, ~5 s): stop it while it streams
        closed = server.stats["closed_early"]
        page.locator("#message textarea").fill("Now a very long story, please.")
        page.locator("#send").click()
        expect(page.locator("#chatbot .message.user").last).to_contain_text("very long story")
        page.wait_for_function("() => { const b = document.querySelectorAll('#chatbot .message.bot');"
                               " return b.length >= 2 && b[b.length - 1].innerText.length > 30; }")
        page.locator("#stop").click()
        assert _wait(lambda: server.stats["closed_early"] == closed + 1 and server.stats["active"] == 0)
        shown = bot.inner_text()
        time.sleep(0.5)
        assert bot.inner_text() == shown and len(shown) > 30  # what came stays; nothing comes after the stop
        expect(page.get_by_text("Error", exact=True)).to_have_count(0)
        expect(page.locator("#chatbot .message.bot")).to_have_count(2)
        page.screenshot(path=str(shot), full_page=True)
        # the report tab shows the run's report with its plots
        page.get_by_role("tab", name="Report").click()
        img = page.locator("img[src*='report_curves.png']")
        expect(img).to_be_visible()
        assert page.evaluate("(e) => e.naturalWidth", img.element_handle()) > 100
        page.get_by_role("tab", name="Model").click()
        expect(page.get_by_text("tokenizer hash")).to_be_visible()
        browser.close()
    print(f"\nscreenshot: {shot}")
