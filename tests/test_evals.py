"""CORE and the chat evals: the bundle over loopback HTTP in DCLM's formats, each task type's prompts and
scores against a hand computation, centring, bounded compiles, the pipeline stages on saved checkpoints."""
import functools
import http.server
import io
import json
import math
import random
import threading
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evals import chat_eval, core, likelihood
from nanochat_jax import model as M
from nanochat_jax import sharding
from nanochat_jax.config import UserError, base_config
from nanochat_jax.tokenizer import Tokenizer

WORDS = ("the cat sat on a mat while quick brown foxes jump over lazy dogs near red barns and "
         "blue rivers flow past green hills under grey skies as birds sing songs of old").split()


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    return Tokenizer.train([" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(300)], 300)


def small_config(vocab_size):
    c = base_config()
    c.run_name = "t"
    c.model.depth, c.model.aspect_ratio, c.model.head_dim, c.model.sequence_len = 1, 64, 32, 128
    c.model.compute_dtype, c.model.attention, c.model.kernels = "float32", "xla", "xla"
    c.model.remat, c.model.loss_chunk = "none", 0
    c.tokenizer.vocab_size = vocab_size
    c.train.num_iterations = 3
    c.eval.batch_tokens, c.eval.max_rows = 1024, 64
    c.eval.max_new_tokens, c.eval.generate_batch_size = 12, 4
    return c


@pytest.fixture(scope="module")
def model(tok):
    """(params, ModelConfig, config): random init with every leaf perturbed (the zero-initialised head
    would tie every score)."""
    config = small_config(tok.vocab_size)
    cfg = M.ModelConfig.from_config(config)
    p = M.init_params(cfg, jax.random.key(0))
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]), cfg, config


@pytest.fixture(scope="module")
def forward(model, tok):
    params, cfg, config = model
    return likelihood.Forward(params, cfg, sharding.make_mesh(config.mesh), 1024, 64, pad_id=tok.bos_id)


# ----------------------------------------------------------------------------------------------
# A bundle in DCLM's formats (core.yaml as llm-foundry writes it, the metadata csv's columns), zipped
# under eval_bundle/ like the real one

CORE_YAML = """icl_tasks:
-
  label: mc_words
  dataset_uri: language_understanding/mc_words.jsonl
  num_fewshot: [2]
  icl_task_type: multiple_choice
-
  label: schema_words
  dataset_uri: language_understanding/schema_words.jsonl
  num_fewshot: [0]
  icl_task_type: schema
-
  label: lm_words
  dataset_uri: world_knowledge/lm_words.jsonl
  num_fewshot: [1]
  icl_task_type: language_modeling
  continuation_delimiter: "\\nAnswer: "
  has_categories: false
"""
META_CSV = ("Eval Task,Task Category,Task Type,#shots,Random baseline,Centered Metric?,Description\n"
            "mc_words,language understanding,multiple choice,2,25,,four choices\n"
            "schema_words,language understanding,schema,0,50,,two options\n"
            "lm_words,world knowledge,language modeling,1,0,,exact continuation\n")


def bundle_items():
    rng = random.Random(7)
    w = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))
    mc = [dict(query=f"Question: {w(6)}?", choices=[w(2), w(3), w(1), w(2)], gold=i % 4) for i in range(12)]
    schema = [dict(context_options=[f"{w(4)} cat", f"{w(5)} dog"], continuation=w(3), gold=i % 2) for i in range(10)]
    lm = [dict(context=f"  {w(7)} ", continuation=w(2)) for i in range(9)]
    return {"language_understanding/mc_words.jsonl": mc, "language_understanding/schema_words.jsonl": schema,
            "world_knowledge/lm_words.jsonl": lm}


def bundle_zip(truncate: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("eval_bundle/core.yaml", CORE_YAML)
        z.writestr("eval_bundle/eval_meta_data.csv", META_CSV)
        for path, rows in bundle_items().items():
            z.writestr(f"eval_bundle/eval_data/{path}", "".join(json.dumps(r) + "\n" for r in rows))
    data = buf.getvalue()
    return data[:len(data) // 2] if truncate else data


@pytest.fixture(scope="module")
def server():
    """Loopback HTTP: /eval_bundle.zip (good), /broken.zip (cut in half); counts the requests per path."""
    files, hits = {"/eval_bundle.zip": bundle_zip(), "/broken.zip": bundle_zip(truncate=True)}, {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits[self.path] = hits.get(self.path, 0) + 1
            body = files.get(self.path)
            if body is None:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()


@pytest.fixture(scope="module")
def bundle(server, tmp_path_factory):
    url, _ = server
    return core.ensure_bundle(f"{url}/eval_bundle.zip", str(tmp_path_factory.mktemp("data")))


def test_bundle_downloads_once_verified_and_reads_its_own_files(server, tmp_path, monkeypatch):
    url, hits = server
    before = hits.get("/eval_bundle.zip", 0)
    out = core.ensure_bundle(f"{url}/eval_bundle.zip", str(tmp_path))
    assert out == tmp_path / "eval_bundle" and (out / "eval_data" / "world_knowledge" / "lm_words.jsonl").exists()
    assert core.ensure_bundle(f"{url}/eval_bundle.zip", str(tmp_path)) == out
    assert hits["/eval_bundle.zip"] - before == 1  # the second call found it in the cache
    tasks = core.load_tasks(out)
    assert [(t["label"], t["type"], t["num_fewshot"], t["delimiter"], t["random_baseline"], len(t["items"]))
            for t in tasks] == [("mc_words", "multiple_choice", 2, " ", 25.0, 12),
                                ("schema_words", "schema", 0, " ", 50.0, 10),
                                ("lm_words", "language_modeling", 1, "\nAnswer: ", 0.0, 9)]
    import nanochat_jax.download as download
    monkeypatch.setattr(download.time, "sleep", lambda s: None)  # no real backoff waits
    with pytest.raises(UserError, match="could not be downloaded.*not a readable zip"):
        core.ensure_bundle(f"{url}/broken.zip", str(tmp_path / "other"))
    assert not list((tmp_path / "other").glob("eval_bundle*"))  # nothing corrupt kept under a final name
    with pytest.raises(ValueError, match="no core.yaml"):
        bad = tmp_path / "nocore.zip"
        with zipfile.ZipFile(bad, "w") as z:
            z.writestr("eval_meta_data.csv", META_CSV)
        core.verify_bundle(bad)


def test_prompts_fewshot_and_scored_spans(bundle, tok):
    mc, schema, lm = core.load_tasks(bundle)
    items, per_item = core.task_sequences(mc, tok)
    shuffled = list(mc["items"])
    random.Random(1337).shuffle(shuffled)
    assert items == shuffled
    i = 5
    shots = [shuffled[j] for j in random.Random(1234 + i).sample([j for j in range(12) if j != i], 2)]
    head = "".join(f"{s['query']} {s['choices'][s['gold']]}\n\n" for s in shots)
    seqs, starts, ends = per_item[i]
    for seq, s, e, choice in zip(seqs, starts, ends, items[i]["choices"]):
        assert seq[0] == tok.bos_id and tok.decode(seq[1:]) == f"{head}{items[i]['query']} {choice}"
        assert e == len(seq) and s < e and f" {choice}".endswith(tok.decode(seq[s:]))
    assert len({tuple(seq[:starts[0]]) for seq in seqs}) == 1  # the scored tokens start where the choices part

    items, per_item = core.task_sequences(schema, tok)
    seqs, starts, ends = per_item[0]
    for seq, s, option in zip(seqs, starts, items[0]["context_options"]):
        assert tok.decode(seq[1:]) == f"{option} {items[0]['continuation']}"
        assert tok.decode(seq[s:]) == f" {items[0]['continuation']}"  # the options end in different words
    assert len({tuple(seq[s:]) for seq, s in zip(seqs, starts)}) == 1  # the same (common) suffix

    items, per_item = core.task_sequences(lm, tok)
    (seq,), (s,), (e,) = per_item[3]
    shot = items[random.Random(1234 + 3).sample([j for j in range(9) if j != 3], 1)[0]]
    assert tok.decode(seq[1:]) == (f"{shot['context'].strip()}\nAnswer: {shot['continuation']}\n\n"
                                   f"{items[3]['context'].strip()}\nAnswer: {items[3]['continuation']}")
    assert tok.decode(seq[s:e]).strip() == items[3]["continuation"]
    assert len(core.task_sequences(lm, tok, max_per_task=4)[0]) == 4


def test_scores_equal_a_hand_computation_for_each_task_type(bundle, tok, model, forward):
    """Mean cross-entropy of the scored span and greedy match, from full-forward logits one sequence at
    a time; the argmin / all-match decisions give each task's accuracy, and centring uses the csv."""
    params, cfg, _ = model
    full = padded_logits(params, cfg)
    for task in core.load_tasks(bundle):
        items, per_item = core.task_sequences(task, tok)
        correct = 0
        for item, (seqs, starts, ends) in zip(items, per_item):
            means, matches = [], []
            for seq, s, e in zip(seqs, starts, ends):
                logits = full(seq)
                lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                    - logits.max(-1, keepdims=True)
                means.append(-np.mean([lp[t - 1, seq[t]] for t in range(s, e)]))
                matches.append(all(int(np.argmax(logits[t - 1])) == seq[t] for t in range(s, e)))
            got_mean, got_match = forward.score(seqs, starts, ends)
            np.testing.assert_allclose(got_mean, means, rtol=2e-4)
            assert list(got_match) == matches
            correct += matches[0] if task["type"] == "language_modeling" else int(np.argmin(means)) == item["gold"]
        r = core.score_task(task, forward, tok)
        rb = task["random_baseline"] / 100
        assert r["accuracy"] == correct / len(items) and r["examples"] == len(items)
        assert math.isclose(r["centered"], (correct / len(items) - rb) / (1 - rb))


def padded_logits(params, cfg, T=256):
    """seq -> (len(seq), V) logits of one full causal forward, right-padded to T (one compile)."""
    fn = jax.jit(lambda t: M.logits_fn(params, cfg, t)[0])

    def logits(seq):
        padded = np.zeros((1, T), np.int32)
        padded[0, :len(seq)] = seq
        return np.asarray(fn(padded))[:len(seq)]
    return logits


class FixedForward:
    """Scores chosen by the test: choice 0 always has the lowest loss; LM matches alternate."""

    def score(self, seqs, starts, ends):
        n = len(seqs)
        return np.array([0.0 if len(s) % 2 else 1.0 for s in seqs]), np.arange(n) % 2 == 0


def test_centring_and_core_mean():
    tasks = [dict(label="mc", type="multiple_choice", num_fewshot=0, delimiter=" ", random_baseline=25.0,
                  items=[dict(query="q", choices=["a", "b", "c", "d"], gold=g) for g in (0, 0, 1, 2)]),
             dict(label="lm", type="language_modeling", num_fewshot=0, delimiter=" ", random_baseline=0.0,
                  items=[dict(context="c", continuation="x")] * 4)]

    class OddTok:  # every sequence one token long: length odd, loss 0, so choice 0 wins everywhere
        bos_id = 0

        def encode(self, texts, prepend_bos=False):
            return [[0] for _ in texts]

    ev = core.evaluate(tasks, FixedForward(), OddTok())
    mc, lm = ev["results"]["mc"], ev["results"]["lm"]
    # 4 shuffled items, gold 0 twice: accuracy 0.5, centred (0.5 - 0.25) / 0.75 = 1/3; LM: items 0 and 2 match
    assert mc["accuracy"] == 0.5 and math.isclose(mc["centered"], 1 / 3)
    assert lm["accuracy"] == 0.5 and lm["centered"] == 0.5
    assert math.isclose(ev["core"], (1 / 3 + 0.5) / 2)
    assert "| mc | multiple_choice | 0 | 4 | 0.5000 | +0.3333 |" in core.markdown(ev, "test")


def test_score_compiles_once_per_bucket_not_per_example(forward):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 250, n).tolist() for n in rng.integers(10, 250, 300)]
    starts = [len(s) - int(rng.integers(1, 6)) for s in seqs]
    ends = [len(s) for s in seqs]
    before = likelihood.TRACES["score"]
    forward.score(seqs, starts, ends)
    shapes = {(likelihood.bucket(len(s), likelihood.MIN_LEN)) for s in seqs}
    assert likelihood.TRACES["score"] - before <= len(shapes) == 3  # 64, 128, 256; span 32 for all
    before, live = likelihood.TRACES["score"], len(jax.live_arrays())
    forward.score(seqs[::-1], starts[::-1], ends[::-1])  # another eval of the same shapes: no compile
    assert likelihood.TRACES["score"] == before
    assert len(jax.live_arrays()) == live  # and nothing left behind on the device: memory stays flat
    assert forward.rows_for(64) == 16 and forward.rows_for(256) == 8  # 1024 tokens a batch, rows a multiple of 8


# ----------------------------------------------------------------------------------------------
# Pipeline stages on saved checkpoints


def save_checkpoint(base_dir, stage, config, params, tok, step):
    from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir

    tok.save(f"{base_dir}/tokenizer")
    ckpt = Checkpointer(checkpoint_dir(str(base_dir), stage, config.run_name), async_save=False)
    ckpt.save(step, params, {"count": jnp.zeros((), jnp.int32)}, {"step": step},
              {"config": config.to_json(), "tokenizer_hash": tok.hash})
    ckpt.close()


def test_base_eval_stage(tmp_path, server, model, tok):
    url, _ = server
    params, _, config = model
    config = config.copy_and_resolve_references()
    config.base_dir, config.data.dir = str(tmp_path / "run"), str(tmp_path / "data")
    config.eval.core_bundle_url = f"{url}/eval_bundle.zip"
    with pytest.raises(UserError, match="no finished checkpoint at step 3"):
        core.run_stage(config)
    save_checkpoint(config.base_dir, "base", config, params, tok, 2)  # an unfinished run: not evaluated
    with pytest.raises(UserError, match="no finished checkpoint at step 3"):
        core.run_stage(config)
    save_checkpoint(config.base_dir, "base", config, params, tok, 3)
    assert not core.stage_done(config)
    out = core.run_stage(config)
    m = out["metrics"]
    assert set(m) >= {"CORE", "core/mc_words", "core/schema_words", "core/lm_words"}
    assert math.isclose(m["CORE"], np.mean([m["core/mc_words"], m["core/schema_words"], m["core/lm_words"]]))
    assert "## CORE (base, step 3)" in out["report"] and "card: 0.2219" in out["report"]
    assert core.stage_done(config)
    config.eval.core_max_per_task = 5  # other settings: not done
    assert not core.stage_done(config)
    config.eval.core_bundle_url = ""  # the offline config: an honest skip, no score
    out = core.run_stage(config)
    assert out["metrics"] == {} and "Skipped: no eval bundle" in out["report"] and core.stage_done(config)


# ----------------------------------------------------------------------------------------------
# Chat evals with small tasks that follow tasks/base.py's interface


class LetterTask:
    name, eval_type = "letters", "categorical"

    def __init__(self, n):
        self.rows = [dict(messages=[dict(role="user", content=f"pick {' '.join(WORDS[i:i + 3 + i % 3])}"),
                                    dict(role="assistant", content="ABCD"[i % 4])],
                          letters=["A", "B", "C", "D"][:2 + i % 3], answer="ABCD"[i % (2 + i % 3)])
                     for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return json.loads(json.dumps(self.rows[i]))


class EchoTask:
    """Generative: right when the reply contains the word the problem names."""
    name, eval_type = "echo", "generative"

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return dict(messages=[dict(role="user", content=f"say {WORDS[i]}")], word=WORDS[i])

    def score(self, conversation, completion):
        return conversation["word"] in completion


def test_chat_evals_categorical_generative_and_chatcore(model, tok, forward):
    from nanochat_jax.engine import Engine

    params, cfg, _ = model
    engine = Engine(params, cfg, tok)
    task = LetterTask(11)
    full = padded_logits(params, cfg)
    want = 0
    for i in range(len(task)):
        conv = task[i]
        prompt = tok.render_for_completion(conv)
        logits = full(prompt)[-1]
        ids = [tok.encode(letter)[0] for letter in conv["letters"]]
        want += conv["letters"][int(np.argmax(logits[ids]))] == conv["answer"]
    assert chat_eval.run_categorical(task, forward, tok) == (want, 11)

    echo = EchoTask()
    rows, _ = engine.generate_batch([tok.render_for_completion(echo[i]) for i in range(6)], max_tokens=12,
                                    temperature=0.0, use_tools=True)
    want_gen = sum(echo[i]["word"] in tok.decode(r) for i, r in enumerate(rows))
    got = chat_eval.run_generative(echo, engine, tok, 12, batch_size=4)  # two chunks of 4 (the last padded)
    assert got[:2] == (want_gen, 6) and got[2] == sum(map(len, rows))

    tasks = {"ARC-Easy": task, "ARC-Challenge": task, "MMLU": task, "GSM8K": echo, "HumanEval": echo}

    def load(name):
        if name not in tasks:
            raise OSError("needs a download")
        return tasks[name]

    ev = chat_eval.evaluate(list(tasks) + ["SpellingBee"], load, forward, engine, tok, 12, 4)
    acc, gen = want / 11, want_gen / 6
    assert ev["results"]["ARC-Easy"]["accuracy"] == acc and ev["results"]["GSM8K"]["accuracy"] == gen
    assert math.isclose(ev["ChatCORE"], (3 * (acc - 0.25) / 0.75 + 2 * gen) / 5)
    assert "ChatCORE_6" not in ev and ev["results"]["SpellingBee"]["status"].startswith("not run")
    md = chat_eval.markdown(ev, "Chat evals")
    assert "| ARC-Easy | categorical | 11 |" in md and "0.3876" in md and "ChatCORE_6 (6 tasks): not computed" in md


def test_chat_eval_stage_reads_the_sft_checkpoint_and_marks_missing_tasks(tmp_path, model, tok, monkeypatch):
    params, _, config = model
    config = config.copy_and_resolve_references()
    config.base_dir = str(tmp_path / "run")
    config.eval.chat_tasks = "ARC-Easy,GSM8K"
    with pytest.raises(UserError, match="sft has not finished|no checkpoint of stage 'sft'"):
        chat_eval.run_stage(config, "chat_eval")
    save_checkpoint(config.base_dir, "sft", config, params, tok, 4)
    tasks = {"ARC-Easy": LetterTask(5)}

    def load(name, max_problems, data_dir):
        if name not in tasks:
            raise OSError(f"{name} needs a download")
        return tasks[name]

    monkeypatch.setattr(chat_eval, "load_eval_task", load)
    assert not chat_eval.stage_done(config, "chat_eval")
    import sys
    import types
    sft = types.ModuleType("nanochat_jax.chat_train")  # the sft stage's module, as the pipeline has it
    sft.stage_done = lambda config, stage: finished
    monkeypatch.setitem(sys.modules, "nanochat_jax.chat_train", sft)
    finished = False
    with pytest.raises(UserError, match="sft has not finished"):
        chat_eval.run_stage(config, "chat_eval")
    finished = True
    out = chat_eval.run_stage(config, "chat_eval")
    assert set(out["metrics"]) == {"ARC-Easy"} and "Chat evals (sft, step 4)" in out["report"]
    assert "not run (GSM8K needs a download)" in out["report"] and "Not run (not in config.eval.chat_tasks" in out["report"]
    assert chat_eval.stage_done(config, "chat_eval") and not chat_eval.stage_done(config, "rl_eval")
    with pytest.raises(UserError, match="unknown chat eval task"):
        chat_eval.parse_tasks("ARC-Easy,Nope")


# ----------------------------------------------------------------------------------------------
# The wheel: evals ships in it, and works from outside the checkout


def test_wheel_installs_in_a_fresh_venv_and_runs_outside_the_checkout(tmp_path, model, tok):
    """maturin builds the wheel (incremental in tokenizer_rs/target: seconds once setup.sh has built the
    crate); a fresh venv gets it with pip --no-deps and sees the other dependencies through a path
    entry to this interpreter's site-packages (no network, and not this checkout: the path is added
    without running its .pth files, so an editable install there stays out)."""
    import os
    import site
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = lambda *cmd, **kw: subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    built = run(sys.executable, "-m", "maturin", "build", "--release", "-o", str(tmp_path / "dist"), cwd=repo)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("nanochat_jax-*.whl"))
    assert {"evals/core.py", "evals/chat_eval.py", "evals/tok_eval.py"} <= set(zipfile.ZipFile(wheel).namelist())
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", "--without-pip", str(venv)).returncode == 0
    py = str(venv / "bin" / "python")
    venv_site = run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    with open(os.path.join(venv_site, "shared_deps.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    installed = run(sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", str(wheel))
    assert installed.returncode == 0, installed.stderr

    outside = tmp_path / "elsewhere"
    (outside / "text").mkdir(parents=True)
    rng = random.Random(1)
    for i in range(20):
        (outside / "text" / f"{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(200)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NANOCHAT_BASE_DIR")}
    env["JAX_PLATFORMS"] = "cpu"
    where = run(py, "-c", "import nanochat_jax, evals.tok_eval, evals.core; print(nanochat_jax.__file__, "
                "evals.core.__file__)", cwd=outside, env=env)
    assert where.returncode == 0, where.stderr
    assert all(path.startswith(venv_site) for path in where.stdout.split()), where.stdout
    trained = run(py, "-m", "nanochat_jax.tokenizer", "train", "--input", "text", "--vocab-size", "300", "--out",
                  "run/tokenizer", cwd=outside, env=env)
    assert trained.returncode == 0 and "trained 300 tokens" in trained.stdout, trained.stderr

    # a tiny CORE eval from the installed package: a base checkpoint paired with that tokenizer
    params, _, config = model
    wheel_tok = Tokenizer.load(outside / "run" / "tokenizer")
    assert wheel_tok.vocab_size == tok.vocab_size
    save_checkpoint(outside / "run", "base", config, params, wheel_tok, 3)
    with zipfile.ZipFile(io.BytesIO(bundle_zip())) as z:
        z.extractall(outside)
    evaluated = run(py, "-m", "evals.core", "--stage", "base", "--base_dir", "run", "--bundle", "eval_bundle",
                    "--max-per-task", "6", cwd=outside, env=env)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "## CORE (base, step 3)" in evaluated.stdout and "| lm_words | language_modeling | 1 | 6 |" in evaluated.stdout
    assert json.loads((outside / "run" / "evals" / "core_base.json").read_text())["step"] == 3


def test_eval_bench_runs_on_cpu(capsys):
    """bench/evals.py --tiny, on one task of each type and few generations: it runs and prints its tables."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "evals.py")
    spec = importlib.util.spec_from_file_location("bench_evals", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert len(bench.CORE_SHAPES) == 22
    bench.main(["--tiny", "--tasks", "copa,winograd,bigbench_operators", "--skip", ""])
    out = capsys.readouterr().out
    assert "CORE pass 1" in out and "bigbench_operators" in out and "schema" in out
    assert "GSM8K-shaped generation, 12 prompts, batch 8" in out and "rows ran to 16 tokens" in out
    assert "hellaswag, all 48 rows in four quarters" in out and "quarter 4: 12 examples" in out
