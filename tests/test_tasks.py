"""nanochat_jax.tasks: hub datasets in their upstream parquet schemas served over loopback, the rendered
prompts, the scorers, the synthetic tasks, identity, mixtures, the registry's errors and the download CLI."""
import io
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat_jax.config import UserError
from nanochat_jax.tasks import Mixture, check_mixture, hub, load_mixture, load_task, synthetic
from nanochat_jax.tasks.gsm8k import GSM8K, final_answer
from nanochat_jax.tasks.identity import Identity
from nanochat_jax.tokenizer import Tokenizer
from nanochat_jax.tools import calculate
from test_data import _ShardServer  # the loopback parquet server with Range support

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
MMLU_ROW = pa.struct([("question", pa.string()), ("subject", pa.string()), ("choices", pa.list_(pa.string())),
                      ("answer", pa.int64())])
ARC_CHOICES = pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])


def _parquet(columns: dict, schema: pa.Schema) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns, schema=schema), buf)
    return buf.getvalue()


def _conv(i):
    return [{"content": f"question {i}", "role": "user"}, {"content": f"answer {i}", "role": "assistant"}]


# Rows in each dataset's upstream layout; None marks a row that must be skipped as bad.
SMOL_TRAIN = [[{"content": "Be kind.", "role": "system"}] + _conv(0)] + [_conv(i) for i in range(1, 9)] + [
    [{"content": "x", "role": "assistant"}], None]
MMLU_AUX = [{"question": f"aux {i}?", "subject": "", "choices": ["w", "x", "y", "z"], "answer": i % 4}
            for i in range(6)]
MMLU_AUX_BAD = [{"question": "bad?", "subject": "", "choices": ["a", "b"], "answer": 7}, None]
GSM_ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def _hub_files():
    smol = [{"messages": m, "source": "fixture"} for m in SMOL_TRAIN]
    smol_schema = pa.schema([("messages", MESSAGES), ("source", pa.string())])
    files = {f"data/train-{k:05d}-of-00004.parquet": _parquet(
        {c: [r[c] for r in smol[k * 3:(k + 1) * 3]] for c in ("messages", "source")}, smol_schema) for k in range(4)}
    files["data/test-00000-of-00001.parquet"] = _parquet(
        {"messages": [_conv(100)], "source": ["fixture"]}, smol_schema)
    out = {f"datasets/HuggingFaceTB/smol-smoltalk/resolve/main/{k}": v for k, v in files.items()}
    mmlu = "datasets/cais/mmlu/resolve/main/"
    out[mmlu + "auxiliary_train/train-00000-of-00001.parquet"] = _parquet(
        {"train": MMLU_AUX + MMLU_AUX_BAD}, pa.schema([("train", MMLU_ROW)]))
    out[mmlu + "all/test-00000-of-00001.parquet"] = _parquet(
        {"question": ["What is H2O?"], "subject": ["chemistry"], "choices": [["salt", "water", "air", "gold"]],
         "answer": [1]}, pa.schema(list(MMLU_ROW)))
    arc_schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("choices", ARC_CHOICES),
                            ("answerKey", pa.string())])
    arc = {"id": ["q1", "q2", "q3"], "question": ["Which is a mammal?", "Pick two.", "Broken?"],
           "choices": [{"text": ["shark", "whale", "trout"], "label": ["A", "B", "C"]},
                       {"text": ["one", "two", "three", "four"], "label": ["1", "2", "3", "4"]},
                       {"text": ["p", "q"], "label": ["A", "B"]}],
           "answerKey": ["B", "2", "E"]}
    for level in ("Easy", "Challenge"):
        for split in ("train", "validation", "test"):
            out[f"datasets/allenai/ai2_arc/resolve/main/ARC-{level}/{split}-00000-of-00001.parquet"] = \
                _parquet(arc, arc_schema)
    gsm_schema = pa.schema([("question", pa.string()), ("answer", pa.string())])
    for split in ("train", "test"):
        out[f"datasets/openai/gsm8k/resolve/main/main/{split}-00000-of-00001.parquet"] = _parquet(
            {"question": ["Natalia sold clips to 48 friends...", "No final line", None],
             "answer": [GSM_ANSWER, "It is 5.", "#### 1"]}, gsm_schema)
    return out


@pytest.fixture(scope="module")
def hub_server():
    server = _ShardServer(_hub_files())
    yield server
    server.close()


@pytest.fixture
def hub_dir(hub_server, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_HF_URL", hub_server.url)
    hub_server.requests.clear()
    return tmp_path / "tasks"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["Natalia sold clips in April and May. 48/2 = 24. " * 20, GSM_ANSWER * 5], 300)


def _shuffled(rows):
    return [rows[i] for i in np.random.default_rng(42).permutation(len(rows))]


def test_smoltalk_shuffled_as_given_bad_rows_counted(hub_dir, caplog):
    before = hub.BAD_ROWS["smoltalk:train"]
    with caplog.at_level(logging.WARNING):
        train = load_task("smoltalk", "train", data_dir=hub_dir)
    assert hub.BAD_ROWS["smoltalk:train"] - before == 2 and "skipped bad row (smoltalk:train" in caplog.text
    good = [m for m in _shuffled(SMOL_TRAIN) if m is not None and m[0]["role"] != "assistant"]
    assert [c["messages"] for c in train] == good  # all four files, in the HF shuffle order, system kept
    assert [c["messages"] for c in load_task("smoltalk", "train", limit=3, data_dir=hub_dir)] == good[:3]
    assert train.eval_type is None and load_task("smoltalk", "test", data_dir=hub_dir)[0]["messages"] == _conv(100)


def test_mmlu_prompts_exact(hub_dir):
    before = hub.BAD_ROWS["mmlu:auxiliary_train"]
    aux = load_task("mmlu", "auxiliary_train", data_dir=hub_dir)
    assert hub.BAD_ROWS["mmlu:auxiliary_train"] - before == 2
    shuffled = [r for r in _shuffled(MMLU_AUX + MMLU_AUX_BAD) if r and r["answer"] < 4]
    assert [c["messages"][0]["content"].split("\n")[0] for c in aux] == [
        f"Multiple Choice question: {r['question']}" for r in shuffled]
    test = load_task("mmlu", "test", data_dir=hub_dir)
    assert test.eval_type == "categorical" and test[0] == {
        "messages": [{"role": "user", "content": "Multiple Choice question: What is H2O?\n- salt=A\n- water=B\n"
                                                 "- air=C\n- gold=D\n\n"
                                                 "Respond only with the letter of the correct answer."},
                     {"role": "assistant", "content": "B"}],
        "letters": ["A", "B", "C", "D"], "answer": "B", "subject": "chemistry"}


def test_arc_letters_from_labels(hub_dir):
    arc = load_task("arc_challenge", "test", data_dir=hub_dir)
    assert len(arc) == 2  # the row whose answerKey is not among its labels is skipped
    by_question = {c["messages"][0]["content"].split("\n")[0]: c for c in arc}
    numeric = by_question["Multiple Choice question: Pick two."]
    assert numeric["letters"] == ["1", "2", "3", "4"] and numeric["answer"] == "2"
    assert numeric["messages"][0]["content"] == ("Multiple Choice question: Pick two.\n- one=1\n- two=2\n- three=3\n"
                                                 "- four=4\n\nRespond only with the letter of the correct answer.")
    assert numeric["messages"][1] == {"role": "assistant", "content": "2"}


def test_gsm8k_tool_parts_render_and_score(hub_dir, tok):
    gsm = load_task("gsm8k", "train", data_dir=hub_dir)
    assert len(gsm) == 1 and gsm.eval_type == "generative"  # no '####' line / no question: skipped
    conv = gsm[0]
    assert conv["messages"][1]["content"] == [
        {"type": "text", "text": "Natalia sold 48/2 = "}, {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"}, {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"}, {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"}]
    ids, mask = tok.render_conversation(conv)
    supervised = tok.decode([i for i, m in zip(ids, mask) if m])
    assert supervised == ("Natalia sold 48/2 = <|python_start|>48/2<|python_end|>24 clips in May.\nNatalia sold "
                          "48+24 = <|python_start|>48+24<|python_end|>72 clips altogether in April and May.\n"
                          "#### 72<|assistant_end|>")
    assert "<|output_start|>24<|output_end|>" in tok.decode([i for i, m in zip(ids, mask) if not m])
    assert gsm.score(conv, "She sold 72 clips.\n#### 72") and not gsm.score(conv, "#### 71")


def test_final_answer_and_scoring_edge_cases():
    assert final_answer("so #### 1,234 in all") == "1234"
    assert final_answer("#### -5") == "-5" and final_answer("#### 3.50") == "3.50"
    assert final_answer("#### 18 dollars\nthanks") == "18"
    assert final_answer("#### 5\n#### 6") == "5"  # the first one counts
    assert final_answer("it is 5") is None and final_answer("####5") is None and final_answer("#### x") is None
    conv = {"messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": [{"type": "text", "text": "#### 1,000"}]}]}
    score = GSM8K.score
    assert score(None, conv, "#### 1000") and score(None, conv, "#### 1,000 apples")
    assert not score(None, conv, "1000") and not score(None, conv, "#### 1000.0")
    assert not score(None, conv, "#### -1000")
    assert not score(None, conv, "#### 999\n#### 1000")


def test_offline_and_bad_file_errors_are_one_line(tmp_path, monkeypatch, hub_server):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("NANOCHAT_HF_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(UserError) as err:
        load_task("gsm8k", "test", data_dir=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("gsm8k test:") and "python -m nanochat_jax.tasks download gsm8k" in msg
    assert not list(tmp_path.rglob("*.parquet"))
    # A file without the columns the task reads is rejected by the downloader's verification.
    monkeypatch.setenv("NANOCHAT_HF_URL", hub_server.url)
    name = "datasets/openai/gsm8k/resolve/main/main/test-00000-of-00001.parquet"
    monkeypatch.setitem(hub_server.files, name, _parquet({"question": ["q"]}, pa.schema([("question", pa.string())])))
    with pytest.raises(UserError, match="no 'answer' column"):
        load_task("gsm8k", "test", data_dir=tmp_path)
    assert not list(tmp_path.rglob("*.parquet*"))


def test_download_cli(hub_dir, hub_server, capsys):
    assert hub.main(["download", "gsm8k", "arc_easy", "--data-dir", str(hub_dir)]) == 0
    got = sorted(str(p.relative_to(hub_dir)) for p in hub_dir.rglob("*.parquet"))
    splits = ("train", "validation", "test")
    assert got == sorted([f"allenai/ai2_arc/ARC-Easy/{s}-00000-of-00001.parquet" for s in splits]
                         + [f"openai/gsm8k/main/{s}-00000-of-00001.parquet" for s in ("train", "test")])
    hub_server.requests.clear()
    assert hub.main(["download", "gsm8k", "--data-dir", str(hub_dir)]) == 0 and hub_server.requests == []
    assert hub.main(["download", "nope"]) == 2 and "unknown task(s) nope" in capsys.readouterr().err
    assert hub.main(["download", "mmlu", "--data-dir", str(hub_dir)]) == 1  # dev/validation are not served
    assert "HTTP 404" in capsys.readouterr().err
    # The module entry point, in a fresh process.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "nanochat_jax.tasks", "download", "arc_challenge", "--data-dir",
                        str(hub_dir)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(list((hub_dir / "allenai/ai2_arc/ARC-Challenge").glob("*.parquet"))) == 3
    broken = hub_dir / "openai/gsm8k/main/test-00000-of-00001.parquet"
    broken.write_bytes(broken.read_bytes()[:100])  # changed on disk after its verified download
    with pytest.raises(UserError, match=f"gsm8k test: cannot read {broken} .*delete it"):
        load_task("gsm8k", "test", data_dir=hub_dir)
    # Importing and using every task module (bar humaneval, another helper's) does not import jax.
    code = ("import sys, nanochat_jax.tasks as t; [t.task_class(n) for n in t.TASKS if n != 'humaneval']; "
            "t.load_task('spelling_bee', limit=2)[0]; assert 'jax' not in sys.modules, 'jax imported'")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_registry_errors():
    from nanochat_jax.config import base_config
    for stage in ("mid", "sft"):  # the configured mixtures are well formed (checked without reading data)
        check_mixture(base_config()[stage].mixture)
        check_mixture(base_config()[stage].val_mixture)
    for call, match in [(lambda: load_task("nope"), "unknown task 'nope'; tasks are smoltalk, mmlu, .*arithmetic"),
                        (lambda: load_task("gsm8k", "validation"), "no split 'validation'; its splits are train, test"),
                        (lambda: load_task("mmlu"), "no split 'train'; its splits are auxiliary_train, dev"),
                        (lambda: load_task("arithmetic", limit=0), "positive integer"),
                        (lambda: load_mixture("arithmetic:train:0"), "N must be a positive integer"),
                        (lambda: load_mixture("arithmetic:train:x"), "N must be a positive integer"),
                        (lambda: load_mixture("arithmetic:train:5:9"), "name\\[:split\\[:N\\]\\]"),
                        (lambda: load_mixture("identity,,arithmetic"), "name\\[:split\\[:N\\]\\]"),
                        (lambda: load_mixture("identity:test"), "task identity has no split 'test'"),
                        (lambda: check_mixture("identity,gsm8k:dev:5"), "task gsm8k has no split 'dev'")]:
        with pytest.raises(UserError, match=match):
            call()


def test_mixture_deterministic_with_proportions():
    tasks = load_mixture(" arithmetic:train:30, arithmetic:train:30,simple_spelling:test:40 ,identity:train:10")
    assert [len(t) for t in tasks] == [30, 30, 40, 10] and tasks[0] is tasks[1]
    mix = Mixture(tasks)
    assert len(mix) == 110
    assert np.bincount([t for t, _ in mix.pairs]).tolist() == [30, 30, 40, 10]
    assert sorted(mix.pairs) == [(t, i) for t, n in enumerate([30, 30, 40, 10]) for i in range(n)]
    again = Mixture(load_mixture("arithmetic:train:30,arithmetic:train:30,simple_spelling:test:40,identity:train:10"))
    assert list(mix) == list(again)
    assert [t for t, _ in mix.pairs[:30]] != [0] * 30  # shuffled, not task after task


def test_spelling_bee_and_simple_spelling():
    words = synthetic.words()
    assert len(words) > 10_000 and all(w.isascii() and w.isalpha() and w.islower() for w in words)
    train, test = load_task("spelling_bee", "train", 300), load_task("spelling_bee", "test", 300)
    train_json, test_json = [json.dumps(c) for c in train], [json.dumps(c) for c in test]
    assert not set(train_json) & set(test_json)  # disjoint seeds (the reference had test[i] == train[i + 1])
    assert train_json == [json.dumps(c) for c in load_task("spelling_bee", "train", 300)]
    in_word = 0
    for conv in train:
        user, parts = conv["messages"][0]["content"], conv["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
        word, letter = parts[1]["text"].split("'")[1], parts[1]["text"].split("'")[3]
        assert word in user and f"{word}:{','.join(word)}" in parts[0]["text"]
        assert calculate(parts[1]["text"]) == parts[2]["text"] == str(word.count(letter))
        count = word.count(letter)
        assert final_answer(parts[3]["text"]) == str(count) and parts[3]["text"].endswith(f"#### {count}")
        assert train.score(conv, f"#### {count}") and not train.score(conv, f"#### {count + 1}")
        in_word += letter in word
    assert 0.8 < in_word / len(train) < 1  # a letter of the word 90% of the time
    assert len(synthetic.TEMPLATES) >= 45 and len({c["messages"][0]["content"][:8] for c in train}) > 40
    simple = load_task("simple_spelling", "train", 5)
    w = simple[0]["messages"][1]["content"].split(":")[0]
    assert simple[0]["messages"] == [{"role": "user", "content": f"Spell the word: {w}"},
                                     {"role": "assistant", "content": f"{w}:{','.join(w)}"}]
    with pytest.raises(IndexError):
        simple[5]


def test_word_list_missing_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(synthetic, "WORD_LIST", "/nonexistent/words")
    monkeypatch.setitem(sys.modules, "english_words", None)  # import fails
    synthetic.words.cache_clear()
    try:
        with pytest.raises(UserError, match="wamerican.*english-words"):
            load_task("simple_spelling")[0]
    finally:
        synthetic.words.cache_clear()


def test_arithmetic():
    train, test = load_task("arithmetic", "train", 200), load_task("arithmetic", "test", 200)
    assert train.eval_type == "generative" and [train[i] for i in range(200)] != [test[i] for i in range(200)]
    for conv in train:
        parts = conv["messages"][1]["content"]
        expr, out = parts[1]["text"], parts[2]["text"]
        assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
        assert expr in conv["messages"][0]["content"]
        assert all(1 <= int(n) <= 99 for n in expr.split()[::2]) and 2 <= len(expr.split()) // 2 + 1 <= 3
        assert out == str(eval(expr)) == calculate(expr) and parts[3]["text"].endswith(f"#### {out}")
        assert train.score(conv, f"#### {out}") and not train.score(conv, f"#### {int(out) + 1}")


def test_identity(tmp_path, tok):
    ident = load_task("identity")
    assert 40 <= len(ident) <= 60 and ident.eval_type is None
    for conv in ident:
        tok.render_conversation(conv)  # each is a valid conversation
    assert any("JAX" in c["messages"][1]["content"] for c in ident if isinstance(c["messages"][1]["content"], str))
    path = tmp_path / "identity.jsonl"
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path.write_text("\n".join([json.dumps(good), "{not json", json.dumps({"role": "user"}),
                               json.dumps([{"role": "assistant", "content": "x"}]), ""]) + "\n")
    before = hub.BAD_ROWS["identity"]
    assert [c["messages"] for c in Identity(path=str(path))] == [good]
    assert hub.BAD_ROWS["identity"] - before == 3


def test_bench_script_runs():
    r = subprocess.run([sys.executable, str(ROOT / "bench/tasks.py"), "--rows", "400"], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rows"] == 400
