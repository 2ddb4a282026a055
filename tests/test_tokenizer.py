"""Tokenizer: training (Rust) against a transparent Python BPE, tiktoken round trips, specials, saving,
the chat rendering of SPEC §7, bad input, the CLI and the pipeline stage."""
import collections
import json
import logging
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import regex  # a dependency of tiktoken

from nanochat_jax import _rustbpe, data, tokenizer as tokenizer_lib
from nanochat_jax.config import UserError, base_config
from nanochat_jax.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

DOCS = pathlib.Path("/usr/share/doc/python3.11/html/_sources")


def _doc_slice(names):
    return [(DOCS / n).read_text() for n in names]


TRAIN_FILES = ["tutorial/introduction.rst.txt", "tutorial/controlflow.rst.txt", "tutorial/datastructures.rst.txt",
               "tutorial/modules.rst.txt", "tutorial/errors.rst.txt", "tutorial/classes.rst.txt"]
HELD_OUT_FILES = ["tutorial/inputoutput.rst.txt", "library/functions.rst.txt"]


@pytest.fixture(scope="module")
def train_texts():
    return _doc_slice(TRAIN_FILES)


@pytest.fixture(scope="module")
def tok(train_texts):
    return Tokenizer.train(train_texts, 600)


def test_round_trip_on_held_out_text(tok):
    texts = _doc_slice(HELD_OUT_FILES) + ["", "ünïcödé 中文 😀 \x00\t\r\n  ", "<|bos|> is plain text here"]
    batch = tok.encode(texts)
    for text, ids in zip(texts, batch):
        assert ids == tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size - len(SPECIAL_TOKENS) for i in ids)  # no specials from text
    with_bos = tok.encode(texts[:2], prepend_bos=True, num_threads=2)
    assert [ids[0] for ids in with_bos] == [tok.bos_id] * 2 and with_bos[0][1:] == batch[0]
    n_chars, n_tokens = sum(map(len, texts[:2])), sum(map(len, batch[:2]))
    assert n_chars / n_tokens > 2.0  # it learned to compress real prose (bytes alone give 1.0)


def test_specials_follow_the_ranks(tok):
    assert tok.vocab_size == 600
    n = 600 - len(SPECIAL_TOKENS)
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(n, 600))
    assert tok.bos_id == tok.encode_special("<|bos|>")
    assert tok.decode([tok.encode_special("<|python_start|>")]) == "<|python_start|>"
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|nope|>")


def test_token_bytes(tok):
    tb = tok.token_bytes()
    assert tb.dtype == np.int32 and tb.shape == (600,)
    assert list(tb[:256]) == [1] * 256
    assert all(tb[tok.encode_special(s)] == 0 for s in SPECIAL_TOKENS)
    text = _doc_slice(HELD_OUT_FILES[:1])[0]
    assert tb[tok.encode(text)].sum() == len(text.encode("utf-8"))  # what bits-per-byte relies on


def test_save_load_and_hash(tok, tmp_path, train_texts):
    path = tok.save(tmp_path / "tok")
    loaded = Tokenizer.load(path)
    assert loaded.hash == tok.hash and loaded.mergeable_ranks == tok.mergeable_ranks
    assert loaded.encode(train_texts[0]) == tok.encode(train_texts[0])
    assert json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["hash"] == tok.hash
    assert len(tok.hash) == 64 and int(tok.hash, 16) >= 0
    # Different content -> different hash; the same content -> the same hash.
    assert Tokenizer.train(train_texts, 601).hash != tok.hash
    assert Tokenizer.train(train_texts[::-1], 600).hash == tok.hash
    # A tampered file is caught on load.
    ranks = (tmp_path / "tok" / "tokenizer.tiktoken")
    lines = ranks.read_text().splitlines()
    lines[300], lines[301] = lines[300].split()[0] + " 301", lines[301].split()[0] + " 300"
    ranks.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="hash mismatch"):
        Tokenizer.load(path)
    with pytest.raises(UserError, match="no readable tokenizer"):
        Tokenizer.load(tmp_path / "missing")


def _reference_bpe(texts, num_merges):
    """Slow, transparent byte-level BPE: split with the `regex` module, recount all pairs every
    step, take the most frequent (ties: smallest (left, right) ids), merge left to right."""
    words = collections.Counter(m for t in texts for m in regex.findall(SPLIT_PATTERN, t))
    words = {tuple(w.encode()): n for w, n in words.items()}
    vocab = [bytes([b]) for b in range(256)]
    for _ in range(num_merges):
        pairs = collections.Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        best = min(pairs, key=lambda p: (-pairs[p], p))
        new_id = len(vocab)
        vocab.append(vocab[best[0]] + vocab[best[1]])
        merged = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if w[i:i + 2] == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    return vocab


def test_merges_match_reference_bpe():
    texts = _doc_slice(["tutorial/appetite.rst.txt", "tutorial/interpreter.rst.txt"])
    texts.append("aaaaaaaa abababab 1234567 don't WE'LL ſ't  \n\n\t x")  # overlapping pairs, contractions
    tok = Tokenizer.train(texts, 256 + 200 + len(SPECIAL_TOKENS))
    ours = sorted(tok.mergeable_ranks, key=tok.mergeable_ranks.get)
    assert ours == _reference_bpe(texts, 200)


def _conversation():
    return {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "2+3"},
            {"type": "python_output", "text": "5"},
            {"type": "text", "text": "It is 5."}]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]}


def test_render_conversation_masks(tok):
    ids, mask = tok.render_conversation(_conversation())
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    assert tok.decode(ids) == (
        "<|bos|><|user_start|>Be brief.\n\nWhat is 2+3?<|user_end|>"
        "<|assistant_start|>Let me compute. <|python_start|>2+3<|python_end|><|output_start|>5<|output_end|>"
        "It is 5.<|assistant_end|><|user_start|>Thanks<|user_end|><|assistant_start|>You're welcome.<|assistant_end|>")
    # Supervised = what the assistant writes; the tool's output and everything else are not.
    supervised = tok.decode([i for i, m in zip(ids, mask) if m])
    assert supervised == ("Let me compute. <|python_start|>2+3<|python_end|>It is 5.<|assistant_end|>"
                          "You're welcome.<|assistant_end|>")
    unsupervised = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "<|output_start|>5<|output_end|>" in unsupervised and "<|assistant_start|>" in unsupervised


def test_render_truncation_and_completion(tok):
    full_ids, full_mask = tok.render_conversation(_conversation())
    ids, mask = tok.render_conversation(_conversation(), max_tokens=20)
    assert ids == full_ids[:20] and mask == full_mask[:20]
    prompt = tok.render_for_completion(_conversation())
    assert tok.decode(prompt).endswith("<|user_start|>Thanks<|user_end|><|assistant_start|>")
    assert prompt[:-1] == full_ids[:len(prompt) - 1]
    no_reply = {"messages": [{"role": "user", "content": "Hi"}]}
    assert tok.decode(tok.render_for_completion(no_reply)) == "<|bos|><|user_start|>Hi<|user_end|><|assistant_start|>"


@pytest.mark.parametrize("conv, match", [
    ({"messages": []}, "at least one message"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "expected 'user'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "expected 'assistant'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "img", "text": ""}]}]},
     "bad part"),
    ({"messages": [{"role": "system", "content": "s"}]}, "followed by a user"),
    ({"messages": [{"role": "user"}]}, "needs a role and a content"),
])
def test_render_errors(tok, conv, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation(conv)


def test_training_errors(train_texts):
    with pytest.raises(ValueError, match=r"vocab_size must be in \[265, "):
        Tokenizer.train(train_texts, 264)
    with pytest.raises(ValueError, match="no training text"):
        Tokenizer.train([], 300)
    with pytest.raises(ValueError, match="no training text"):
        Tokenizer.train(["", ""], 300)
    with pytest.raises(ValueError, match="only supports 3 merges"):
        Tokenizer.train(["abcd"], 300)
    with pytest.raises(TypeError, match="str or bytes"):
        Tokenizer.train(["ok", 3], 300)
    with pytest.raises(TypeError, match="not a single str"):
        Tokenizer.train("a whole text", 300)
    with pytest.raises(ValueError, match=r"vocab_size must be in \[265, "):
        Tokenizer.train(train_texts, 2**31)  # token ids are int32
    with pytest.raises(ValueError, match="only supports 3 merges"):  # not an allocation failure in Rust
        _rustbpe.train(iter(["abcd"]), 1 << 40)
    with pytest.raises(ValueError, match="at least 256"):  # the Rust trainer's own checks
        _rustbpe.train(iter(["abc"]), 255)
    with pytest.raises(ValueError, match="invalid split pattern"):
        _rustbpe.train(iter(["abc"]), 300, pattern="(unclosed")

    def failing():
        yield "some text"
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):  # the iterator's own error comes through
        Tokenizer.train(failing(), 300)


def test_one_enormous_document(train_texts):
    # 3 MB in one document with million-character runs (a regex VM gives up on those: PyPI rustbpe
    # panics); the result is the same as for the text cut at line starts into many documents.
    text = "\n".join(train_texts) + "\n" + "x" * 1_000_000 + " " * 1_000_000 + "\n" * 1_000 + "end"
    one = Tokenizer.train([text], 400)
    pieces = regex.split(r"(?<=\n)(?=\S)", text)
    assert len(pieces) > 100 and Tokenizer.train(pieces, 400).hash == one.hash
    assert one.decode(one.encode(text)) == text


def test_invalid_utf8_is_replaced_and_counted(caplog):
    docs = [b"caf\xe9 ok \xff\xfe", "fine text", b"bad \xc3".decode("utf-8", errors="surrogateescape")]
    with caplog.at_level(logging.WARNING):
        tok = Tokenizer.train(docs * 20, 270)
    # Counted like Python's own errors="replace": one U+FFFD per maximal invalid subpart (4 here).
    per_round = sum(d.decode("utf-8", "replace").count("\ufffd") for d in [docs[0], b"bad \xc3"])
    assert per_round == 4 and tok.train_stats["replaced"] == 20 * per_round
    assert "80 invalid UTF-8" in caplog.text
    assert tok.train_stats["documents"] == 60


def test_cli(tmp_path, capsys):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for i, text in enumerate(_doc_slice(TRAIN_FILES[:3])):
        (src / ("sub" if i else ".") / f"doc{i}.rst").write_text(text)
    (src / "ignored.bin").write_bytes(b"\x00" * 100)
    out = tmp_path / "tok"
    assert tokenizer_lib.main(["train", "--input", str(src), "--vocab-size", "300", "--out", str(out)]) == 0
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 300
    assert tok.mergeable_ranks == Tokenizer.train(_doc_slice(TRAIN_FILES[:3]), 300).mergeable_ranks
    assert "trained 300 tokens on 3 documents" in capsys.readouterr().out
    for args, match in [(["--input", str(tmp_path / "nope")], "not a directory"),
                        (["--input", str(tmp_path / "tok")], "no .txt, .rst or .parquet"),
                        (["--input", str(src), "--vocab-size", "100"], "must be in [265, "),
                        (["--input", str(src), "--vocab-size", str(10**11)], "must be in [265, ")]:
        full = ["train", "--input", str(src), "--vocab-size", "300", "--out", str(tmp_path / "o")]
        full[full.index(args[0]) + 1] = args[1]
        if len(args) > 2:
            full[full.index(args[2]) + 1] = args[3]
        assert tokenizer_lib.main(full) == 2
        assert match in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: missing --vocab-size
        tokenizer_lib.main(["train", "--input", str(src), "--out", str(out)])


def test_cli_trains_without_importing_jax_or_grain(tmp_path):
    """Training a tokenizer on text files starts neither jax nor grain (a second of imports, the most of
    the CLI's time), nor pyarrow when there is no parquet file: checked in a fresh interpreter."""
    src = tmp_path / "in"
    src.mkdir()
    for i, text in enumerate(_doc_slice(TRAIN_FILES[:2])):
        (src / f"doc{i}.txt").write_text(text)
    script = ("import sys; from nanochat_jax import tokenizer; "
              f"rc = tokenizer.main(['train', '--input', {str(src)!r}, '--vocab-size', '300', '--out', "
              f"{str(tmp_path / 'tok')!r}]); "
              "print(rc, sorted(m for m in ('jax', 'grain', 'flax', 'pyarrow') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=pathlib.Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "0 []", res.stdout
    assert Tokenizer.load(tmp_path / "tok").vocab_size == 300


def _stage_config(tmp_path) -> ml_collections.ConfigDict:
    c = base_config()
    c.base_dir = str(tmp_path / "run")
    c.data.source, c.data.dir = "embedded", str(tmp_path / "data")
    c.tokenizer.vocab_size, c.tokenizer.max_chars, c.tokenizer.doc_cap = 400, 300_000, 20_000
    return c


def test_stage(tmp_path, monkeypatch):
    from evals import tok_eval
    monkeypatch.setattr(tok_eval, "VAL_CHARS", 200_000)
    c = _stage_config(tmp_path)
    assert not tokenizer_lib.stage_done(c)
    # Bad rows at the head of the first training shard: skipped or repaired, counted in the report.
    first = data.ensure_corpus(c)[0]
    texts = pq.read_table(first).column("text").to_pylist()
    raw = pa.array([b"caf\xe9 bad bytes", b"", *(t.encode() for t in texts)], pa.binary())
    pq.write_table(pa.table({"text": raw.view(pa.string())}), first, row_group_size=16)
    result = tokenizer_lib.run_stage(c)
    assert tokenizer_lib.stage_done(c)
    tok = Tokenizer.load(tokenizer_lib.tokenizer_dir(c))
    assert result["outputs"] == [tokenizer_lib.tokenizer_dir(c)] and tok.vocab_size == 400
    m = result["metrics"]
    assert m["vocab_size"] == 400 and m["chars_per_token"] > 1.5 and m["train_seconds"] > 0
    assert 300_000 <= m["train_bytes"] < 400_000  # max_chars stopped it (doc_cap bounds the overshoot)
    assert "SentencePiece BPE" in result["report"] and "| nanochat_jax BPE (ours) | 400 |" in result["report"]
    assert m["bad_input_skipped"] == 2  # the training pass only, not the evaluation's rereading
    assert "empty_document 1, non_utf8_document 1" in result["report"]
    # Same stream of text as the stage's contract says -> same tokenizer.
    files = data.ensure_corpus(c)
    again = Tokenizer.train(data.iter_texts(files[:-1], max_chars=300_000, doc_cap=20_000), 400)
    assert again.hash == tok.hash
    c.tokenizer.vocab_size = 500  # a different vocab is not "done"
    assert not tokenizer_lib.stage_done(c)


def test_stage_missing_corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DOC_SOURCES", str(tmp_path / "none"))
    monkeypatch.setattr(data, "DOC_SOURCES_GLOB", str(tmp_path / "none*"))
    with pytest.raises(UserError, match="apt-get install python3.11-doc"):
        tokenizer_lib.run_stage(_stage_config(tmp_path))


def test_tok_eval_never_downloads(tok, monkeypatch, tmp_path, train_texts):
    from evals import tok_eval
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("requests.get", lambda *a, **k: pytest.fail("tok_eval tried to download"))
    assert tok_eval.cached_encoding("gpt2") is None
    results = tok_eval.evaluate(tok, train_texts, _doc_slice(HELD_OUT_FILES[:1]))
    notes = {r["name"]: r["note"] for r in results["rows"]}
    assert notes["GPT-2"] == "not cached" and notes["GPT-4 (cl100k_base)"] == "not cached"
    sp = results["rows"][1]
    assert sp["name"] == "SentencePiece BPE" and sp["vocab_size"] == 600 and 1.5 < sp["chars_per_token"] < 6
    assert "not cached" in tok_eval.markdown(results)
