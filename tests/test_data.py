"""Corpus conversion, robust reading, grain pipelines (determinism, resume, sharding) and bits per byte."""
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat_jax import data
from nanochat_jax.config import UserError, base_config


def _config(tmp_path, source="embedded"):
    c = base_config()
    c.data.source = source
    c.data.dir = str(tmp_path / "data")
    return c


def _write_docs(root: Path, docs: dict[str, str]):
    for rel, text in docs.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")


@pytest.fixture
def fake_doc_sources(tmp_path, monkeypatch):
    """A small python3.X-doc-like source tree, so conversion tests do not depend on the real package."""
    root = tmp_path / "usr/share/doc/python3.99/html/_sources"
    docs = {f"library/mod{i:03d}.rst.txt": f"Module {i}\n=========\n\nSome prose number {i}.\n" * (i % 5 + 1)
            for i in range(60)}
    docs["empty.rst.txt"] = "   \n"
    _write_docs(root, docs)
    monkeypatch.setattr(data, "DOC_SOURCES", str(tmp_path / "missing"))
    monkeypatch.setattr(data, "DOC_SOURCES_GLOB", str(tmp_path / "usr/share/doc/python3.*/html/_sources"))
    return root, docs


def test_embedded_conversion_layout_split_and_idempotence(tmp_path, fake_doc_sources):
    root, docs = fake_doc_sources
    files = data.ensure_corpus(_config(tmp_path))
    assert [f.name for f in files] == [f"shard_{i:05d}.parquet" for i in range(data.EMBEDDED_TRAIN_SHARDS + 1)]
    train, val = data.split_files(files)
    train_texts, val_texts = list(data.iter_texts(train)), list(data.iter_texts(val))
    non_empty = sorted(t for t in docs.values() if t.strip())
    # Every non-empty document exactly once, split by document, val a small non-empty part.
    assert sorted(train_texts + val_texts) == non_empty
    assert 0 < len(val_texts) < len(train_texts)
    assert not set(val_texts) & set(train_texts)
    # Second call: no reconversion (files untouched), same list.
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert data.ensure_corpus(_config(tmp_path)) == files
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    # Deterministic: a conversion elsewhere yields the same shards, document for document.
    other = data.ensure_corpus(_config(tmp_path / "again"))
    for a, b in zip(files, other):
        assert pq.read_table(a).column("text").to_pylist() == pq.read_table(b).column("text").to_pylist()


def test_half_conversion_is_redone(tmp_path, fake_doc_sources):
    dest = data.corpus_dir(_config(tmp_path))
    dest.mkdir(parents=True)
    (dest / "shard_00000.parquet").write_bytes(b"half written")  # no completion marker
    files = data.ensure_corpus(_config(tmp_path))
    assert (dest / "_COMPLETE.json").exists()
    assert len(list(data.iter_texts(files))) == 60
    assert json.loads((dest / "_COMPLETE.json").read_text())["documents"] == 60


def test_missing_doc_sources_error_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DOC_SOURCES", str(tmp_path / "nope"))
    monkeypatch.setattr(data, "DOC_SOURCES_GLOB", str(tmp_path / "nope*/_sources"))
    with pytest.raises(FileNotFoundError, match="apt-get install python3.11-doc"):
        data.ensure_corpus(_config(tmp_path))


def test_real_embedded_corpus_if_installed(tmp_path):
    if not Path(data.DOC_SOURCES).is_dir():
        pytest.skip("python3.11-doc not installed")
    files = data.ensure_corpus(_config(tmp_path))
    n_src = len(list(Path(data.DOC_SOURCES).rglob("*.rst.txt")))
    meta = json.loads((files[0].parent / "_COMPLETE.json").read_text())
    assert n_src - 5 <= meta["documents"] <= n_src  # (a few may be blank)
    assert 0.02 * meta["documents"] < meta["val_documents"] < 0.08 * meta["documents"]
    chars = sum(len(t) for t in data.iter_texts(files))
    assert chars > 5_000_000  # ~11 MB of real prose


def test_iter_texts_caps(tmp_path):
    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["x" * 100, "y" * 50, "z" * 70]}), f)
    assert list(data.iter_texts([f], doc_cap=60)) == ["x" * 60, "y" * 50, "z" * 60]
    # Stops once max_chars were yielded (the document that crosses the limit is the last).
    assert list(data.iter_texts([f], max_chars=120)) == ["x" * 100, "y" * 50]


def _bad_files(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": ["alpha", "", None, "beta"]}), good)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    no_text = tmp_path / "notext.parquet"
    pq.write_table(pa.table({"body": ["gamma"]}), no_text)
    non_utf8 = tmp_path / "nonutf8.parquet"
    raw = pa.array([b"ok text", b"bad \xff\xfe bytes"], pa.binary())
    pq.write_table(pa.table({"text": raw.view(pa.string())}), non_utf8)
    return [good, corrupt, empty, no_text, non_utf8]


def test_bad_input_is_skipped_and_counted(tmp_path):
    data.BAD_INPUT.clear()
    texts = list(data.iter_texts(_bad_files(tmp_path)))
    assert texts == ["alpha", "beta", "ok text", "bad \ufffd\ufffd bytes"]
    counts = data.bad_input_counts()
    assert counts == {"unreadable_file": 1, "empty_file": 1, "no_text_column": 1,
                      "empty_document": 2, "non_utf8_document": 1}
    # A stage reports what it met itself: the counts since its snapshot, named in one report line.
    list(data.iter_texts(_bad_files(tmp_path)[:2]))
    since = data.bad_input_since(counts)
    assert since == {"empty_document": 2, "unreadable_file": 1}
    assert "the data (counted per read): empty_document 2, unreadable_file 1." in data.bad_input_markdown(since, "the data")
    assert data.bad_input_markdown({}, "the data") == ""


# ---------------------------------------------------------------------------------------------
# Downloader against a real HTTP server on loopback, with faults injected.

import http.server
import threading

from nanochat_jax import download


class _ShardServer:
    """Serves `files` (name -> bytes) with Range support; `faults[name]` lists faults for successive requests."""

    def __init__(self, files):
        self.files, self.faults, self.requests = files, {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.split("/data/", 1)[-1]  # files are keyed by their path under /data/
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                fault = server.faults.get(name, []).pop(0) if server.faults.get(name) else None
                if name not in server.files or fault == "404":
                    return self._empty(404)
                if fault == "500":
                    return self._empty(500)
                body, start = server.files[name], 0
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        return self._empty(416)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                part = body[start:]
                if fault == "truncate":  # a consistent but short body: headers agree, parquet does not
                    part = part[: len(part) // 2]
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                if fault == "cut":  # connection dies mid-file
                    self.wfile.write(part[: len(part) // 3])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(part)

            def _empty(self, code):
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _parquet_bytes(i, n_docs=400):
    import io
    buf = io.BytesIO()
    letters = np.random.default_rng(i).integers(97, 123, size=(n_docs, 1000), dtype=np.uint8)
    texts = [f"document {j} of shard {i}: " + row.tobytes().decode() for j, row in enumerate(letters)]  # ~400 KB
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=50)
    return buf.getvalue()


@pytest.fixture
def shard_server():
    files = {f"shard_{i:05d}.parquet": _parquet_bytes(i) for i in range(5)}
    s = _ShardServer(files)
    yield s
    s.close()


def _final_files_are_whole(dest, server):
    for p in Path(dest).glob("shard_*.parquet"):
        assert p.read_bytes() == server.files[p.name], p


def test_download_with_faults_then_rerun(tmp_path, shard_server):
    s = shard_server
    s.faults = {"shard_00000.parquet": ["cut"], "shard_00001.parquet": ["500", "500"],
                "shard_00002.parquet": ["truncate"], "shard_00003.parquet": ["404"]}
    dest = tmp_path / "fineweb"
    with pytest.raises(download.DownloadError, match="shard_00003.*404"):
        download.download_shards(5, dest, base_url=s.url, workers=3, backoff=0.001, progress=False)
    _final_files_are_whole(dest, s)  # nothing corrupt under a final name
    assert sorted(p.name for p in dest.glob("shard_*.parquet")) == [f"shard_{i:05d}.parquet" for i in (0, 1, 2, 4)]
    assert not (dest / "shard_00003.parquet.partial").exists()
    # The cut transfer resumed with a Range request rather than starting over.
    assert any(name == "shard_00000.parquet" and rng and rng != "bytes=0-" for name, rng in s.requests)
    # Rerun: only the missing shard is requested.
    s.requests.clear()
    files = download.download_shards(5, dest, base_url=s.url, workers=3, backoff=0.001, progress=False)
    assert [name for name, _ in s.requests] == ["shard_00003.parquet"]
    assert files == [dest / f"shard_{i:05d}.parquet" for i in range(5)]
    _final_files_are_whole(dest, s)


def test_download_resumes_from_partial_file(tmp_path, shard_server):
    s, dest = shard_server, tmp_path / "fw"
    dest.mkdir()
    name = "shard_00001.parquet"
    (dest / (name + ".partial")).write_bytes(s.files[name][:1000])  # left by a killed run
    download.download_file(f"{s.url}/{name}", dest / name, backoff=0.001)
    assert s.requests == [(name, "bytes=1000-")]
    assert (dest / name).read_bytes() == s.files[name]


def test_download_rejects_file_without_text_column(tmp_path, shard_server):
    import io
    s, buf = shard_server, io.BytesIO()
    pq.write_table(pa.table({"body": ["x"]}), buf)
    s.files["shard_00000.parquet"] = buf.getvalue()
    dest = tmp_path / "fw" / "shard_00000.parquet"
    dest.parent.mkdir()
    with pytest.raises(download.DownloadError, match="text"):
        download.download_file(f"{s.url}/shard_00000.parquet", dest, retries=1, backoff=0.001)
    assert not dest.exists() and not dest.with_name(dest.name + ".partial").exists()
    assert len(s.requests) == 2  # retried once, from scratch


def test_download_cli(tmp_path, shard_server):
    assert download.main(["--num-shards", "2", "--dest", str(tmp_path / "d"), "--base-url", shard_server.url,
                          "--workers", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["shard_00000.parquet", "shard_00001.parquet"]
    assert download.main(["--num-shards", "7", "--dest", str(tmp_path / "e"), "--base-url",
                          shard_server.url + "/missing"]) == 1


# ---------------------------------------------------------------------------------------------
# grain pipelines, with a byte-level tokenizer: ids = UTF-8 bytes, <|bos|> = 256.

class ByteTokenizer:
    bos_id = 256

    def encode(self, texts, prepend_bos=False, num_threads=None):
        return [[self.bos_id] * prepend_bos + list(t.encode("utf-8")) for t in texts]


def _corpus(tmp_path, n_files=3, docs_per_file=40, row_group=8):
    files = []
    for i in range(n_files):
        texts = [f"<doc {i}.{j}> " + "word " * (j % 13) + "end." for j in range(docs_per_file)]
        files.append(tmp_path / f"shard_{i:05d}.parquet")
        pq.write_table(pa.table({"text": texts}), files[-1], row_group_size=row_group)
    return files


def _expected_stream(files):
    """The reference stream written out by hand: every document, in order, prefixed with BOS."""
    out = []
    for t in data.iter_texts(files):
        out += [256] + list(t.encode("utf-8"))
    return np.array(out, np.int32)


def test_train_batches_pack_the_bos_prefixed_stream(tmp_path):
    files = _corpus(tmp_path)
    B, T = 3, 31
    it = data.make_train_iterator(files, ByteTokenizer(), B, T, num_threads=2)
    batches = [next(it) for _ in range(60)]
    assert all(b.shape == (B, T + 1) and b.dtype == np.int32 for b in batches)
    stream = _expected_stream(files)
    n = 60 * B * (T + 1)
    assert n > len(stream)  # the test crosses an epoch boundary: the stream repeats
    expected = np.concatenate([stream, stream])[:n].reshape(60, B, T + 1)
    np.testing.assert_array_equal(np.stack(batches), expected)


def test_train_iterator_resumes_exactly_from_json_state(tmp_path):
    files = _corpus(tmp_path)
    tok, B, T = ByteTokenizer(), 2, 45
    full = data.make_train_iterator(files, tok, B, T, num_threads=2)
    reference = [next(full) for _ in range(70)]
    assert 70 * B * (T + 1) > len(_expected_stream(files))
    for cut in (1, 7, 19, 61):  # mid-chunk and across epoch boundaries
        it = data.make_train_iterator(files, tok, B, T, num_threads=2)
        for _ in range(cut):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        resumed = data.make_train_iterator(files, tok, B, T, num_threads=2)
        resumed.set_state(state)
        for k in range(cut, 70):
            np.testing.assert_array_equal(next(resumed), reference[k])


def test_shuffle_is_seeded_and_processes_split_the_row_groups(tmp_path):
    files = _corpus(tmp_path)
    tok, B, T = ByteTokenizer(), 1, 63
    def first(n, **kw):
        it = data.make_train_iterator(files, tok, B, T, num_threads=1, **kw)
        return np.concatenate([next(it)[0] for _ in range(n)])
    a, b = first(20, shuffle=True, seed=1), first(20, shuffle=True, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, first(20, shuffle=True, seed=2))
    assert not np.array_equal(a, first(20))
    # Two processes: disjoint documents (BOS-delimited), together the whole corpus.
    def docs(process_index):
        ds = data._rows_dataset(files, tok, T, process_index, 2, repeat=False)
        stream = np.concatenate(list(iter(ds)))
        return [bytes(d[1:].astype(np.uint8)).decode() for d in np.split(stream, np.flatnonzero(stream == 256))[1:]]
    d0, d1 = docs(0), docs(1)
    everything = list(data.iter_texts(files))
    assert d0 and d1 and not set(d0) & set(d1)
    assert set(d0[:-1] + d1[:-1]) <= set(everything)  # (the last document of each may be cut by packing)
    assert len(d0) + len(d1) >= len(everything) - 2


def test_val_batches_fixed_token_count(tmp_path):
    files = _corpus(tmp_path, n_files=1, docs_per_file=10, row_group=4)
    stream = _expected_stream(files)
    B, T = 2, 20
    batches = data.make_val_batches(files, ByteTokenizer(), B, T, num_tokens=B * T * 3)
    assert len(batches) == 3 and all(b.shape == (B, T + 1) for b in batches)
    np.testing.assert_array_equal(np.concatenate([b.ravel() for b in batches]), stream[:3 * B * (T + 1)])
    # More tokens than the split holds: cycles through it, same count.
    many = data.make_val_batches(files, ByteTokenizer(), B, T, num_tokens=len(stream) * 3)
    assert len(many) == len(stream) * 3 // (B * T)
    # Identical at every call.
    assert all(np.array_equal(x, y) for x, y in zip(many, data.make_val_batches(files, ByteTokenizer(), B, T,
                                                                                   num_tokens=len(stream) * 3)))


def test_pipeline_survives_bad_input_and_fails_loudly_on_none(tmp_path):
    data.BAD_INPUT.clear()
    bad = _bad_files(tmp_path)
    it = data.make_train_iterator(bad, ByteTokenizer(), 2, 5, num_threads=2)
    rows = np.stack([next(it) for _ in range(5)])
    stream = np.array([256, *b"alpha", 256, *b"beta", 256, *b"ok text", 256, *"bad \ufffd\ufffd bytes".encode()])
    np.testing.assert_array_equal(rows.ravel(), np.resize(stream, rows.size))
    assert data.bad_input_counts()["unreadable_file"] == 1
    # Only unusable files: a clear error up front, not a stall.
    with pytest.raises(ValueError, match="no readable parquet"):
        data.make_train_iterator(bad[1:4], ByteTokenizer(), 2, 5)
    # Files that open but hold no usable document: an error after one pass, not an endless loop.
    only_empty = tmp_path / "blank.parquet"
    pq.write_table(pa.table({"text": ["", "", ""]}), only_empty)
    with pytest.raises(RuntimeError, match="no usable documents"):
        next(data.make_train_iterator([only_empty], ByteTokenizer(), 2, 5))


def test_evaluate_bpb_hand_computed():
    token_bytes = np.array([1, 2, 3, 0])  # token 3 is special (0 bytes)
    rows = np.array([[3, 0, 1, 3, 2],
                     [3, 2, -1, 1, 0]])
    # targets rows[:, 1:] = [[0, 1, 3, 2], [2, -1, 1, 0]]; losses chosen by hand:
    losses = np.array([[0.5, 1.0, 9.0, 2.0],
                       [1.5, 7.0, 0.25, 0.75]])
    # counted: (0.5,1B) (1.0,2B) (2.0,3B) | (1.5,3B) (0.25,2B) (0.75,1B); the special and the -1 are excluded
    nats, nbytes = 0.5 + 1.0 + 2.0 + 1.5 + 0.25 + 0.75, 1 + 2 + 3 + 3 + 2 + 1
    split = [rows[:1], rows[1:]]
    got = data.evaluate_bpb(lambda r: losses[:1] if r[0, 1] == 0 else losses[1:], split, token_bytes)
    assert got == pytest.approx(nats / math.log(2) / nbytes)


def test_ensure_corpus_fineweb_downloads_the_configured_shards(tmp_path, shard_server):
    c = _config(tmp_path, source="fineweb")
    c.data.num_shards, c.data.base_url, c.data.download_workers = 3, shard_server.url, 2
    files = data.ensure_corpus(c)
    assert files == [tmp_path / "data" / "fineweb" / f"shard_{i:05d}.parquet" for i in range(3)]
    assert len(list(data.iter_texts(data.split_files(files)[1]))) == 400  # the val shard reads back whole


def test_stage_corpus_turns_a_failed_download_into_one_clear_error(tmp_path, shard_server):
    c = _config(tmp_path, source="fineweb")
    c.data.num_shards, c.data.base_url, c.data.download_workers = 7, shard_server.url, 2  # the server has 5
    with pytest.raises(UserError, match=r"(?s)stage base: no corpus \(2 shard\(s\) failed.*HTTP 404.*base_url"):
        data.stage_corpus(c, "base")
    c.data.num_shards = 5  # a rerun fetches only what is missing and succeeds
    assert len(data.stage_corpus(c, "base")) == 5


def test_with_the_real_tokenizer(tmp_path):
    from nanochat_jax import tokenizer
    files = _corpus(tmp_path, n_files=2, docs_per_file=30)
    tok = tokenizer.Tokenizer.train(list(data.iter_texts(files)), 280)
    B, T = 2, 64
    val = data.make_val_batches(files, tok, B, T, num_tokens=B * T * 2)
    rows = np.concatenate([b.ravel() for b in val])
    # The rows decode to the documents, each behind <|bos|>, in order.
    docs = list(data.iter_texts(files))
    expected = "".join("<|bos|>" + d for d in docs)
    assert expected.startswith(tok.decode(rows.tolist()))
    # bpb with a uniform loss of 1 nat per target: (non-special targets) / ln 2 / (their UTF-8 bytes).
    token_bytes = tok.token_bytes()
    bpb = data.evaluate_bpb(lambda r: np.ones((r.shape[0], r.shape[1] - 1)), val, token_bytes)
    targets = np.concatenate([b[:, 1:].ravel() for b in val])
    text_targets = targets[targets != tok.bos_id]
    n_bytes = len(tok.decode(text_targets.tolist()).encode("utf-8"))  # ASCII corpus: bytes decode 1:1
    assert bpb == pytest.approx(len(text_targets) / math.log(2) / n_bytes)
