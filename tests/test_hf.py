"""Hugging Face interop with real transformers (torch, CPU): export verifies itself and loads with
Auto* classes, ours -> export -> import is exact, a transformers-initialised model imports with equal
logits, tampering and what we cannot represent are refused; and the restore notebook runs (nbclient)."""
import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the hf extra (pip install -e '.[hf]') is not installed")
transformers = pytest.importorskip("transformers", reason="the hf extra (pip install -e '.[hf]') is not installed")

from nanochat_jax import checkpoint as ckpt_lib, export_hf, hf_format, import_hf, model as model_lib  # noqa: E402
from nanochat_jax.config import UserError, base_config  # noqa: E402
from nanochat_jax.engine import load_model  # noqa: E402
from nanochat_jax.tokenizer import Tokenizer  # noqa: E402

DOCS = pathlib.Path("/usr/share/doc/python3.11/html/_sources")
ROOT = pathlib.Path(__file__).resolve().parents[1]
STEP = 7


@pytest.fixture(scope="module")
def tok():
    texts = [(DOCS / n).read_text() for n in ("tutorial/introduction.rst.txt", "tutorial/controlflow.rst.txt")]
    return Tokenizer.train(texts, 300)


def _config(base_dir, tok):
    c = base_config()
    c.base_dir, c.run_name = str(base_dir), "tiny"
    c.model.update(depth=2, aspect_ratio=32, head_dim=32, n_kv_head=1, sequence_len=128)  # d_model 64, GQA 2:1
    c.tokenizer.vocab_size = tok.vocab_size
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory, tok):
    """A tiny sft run directory: tokenizer, a checkpoint of random params (every leaf perturbed: the zero-
    initialised projections and head would make every logit equal), a training log and a report metric."""
    base = tmp_path_factory.mktemp("run")
    tok.save(base / "tokenizer")
    config = _config(base, tok)
    cfg = model_lib.ModelConfig.from_config(config)
    params = model_lib.init_params(cfg, jax.random.key(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(str(base), "sft", "tiny"), async_save=False)
    meta = dict(config=config.to_json(), tokenizer_hash=tok.hash, stage="sft", step=STEP, history={})
    ckpt.save(STEP, params, None, train=dict(step=STEP), meta=meta)
    ckpt.close()
    (base / "logs").mkdir()
    (base / "logs" / "sft.jsonl").write_text("".join(json.dumps(dict(step=s, loss=3.0 - 0.1 * s, **(
        {"val_loss": 2.9 - 0.1 * s} if s % 3 == 0 else {}))) + "\n" for s in range(1, STEP + 1)))
    (base / "report").mkdir()
    (base / "report" / "sft.json").write_text(json.dumps({"val_loss": 1.25}))
    return base, params, cfg


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    base, _, _ = run
    out = tmp_path_factory.mktemp("export") / "hf"
    assert export_hf.main(["--stage", "sft", "--base_dir", str(base), "--out", str(out)]) == 0
    return out


def _max_logit_diff(params, cfg, hf_model, ids):
    ours = np.asarray(model_lib.logits_fn(params, cfg, jnp.asarray([ids], jnp.int32)))[0]
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits[0].numpy()
    return float(np.max(np.abs(ours - theirs)))


def test_export_loads_with_auto_classes_and_matches(run, exported, tok):
    base, params, cfg = run
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "README.md"} <= names
    hf_cfg = json.loads((exported / "config.json").read_text())
    assert hf_cfg[hf_format.HASH_KEY] == tok.hash
    assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"]) == (tok.bos_id, tok.encode_special("<|assistant_end|>"))
    assert (hf_cfg["intermediate_size"], hf_cfg["rms_norm_eps"], hf_cfg["head_dim"]) == (256, hf_format.RMS_EPS, 32)
    model = transformers.AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=False, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported, trust_remote_code=False)
    assert type(model).__name__ == "NanoChatForCausalLM"
    assert _max_logit_diff(params, cfg, model, tok.render_for_completion(hf_format.VERIFY_CHATS[2])) <= 1e-4
    # the chat template renders SPEC §7 exactly: prompts (a final assistant message dropped) and whole chats
    chats = hf_format.VERIFY_CHATS + [{"messages": [{"role": "user", "content": "2+2?"},
                                                    {"role": "assistant", "content": "4"}]}]
    for conv in chats:
        assert hf_tok.apply_chat_template(conv["messages"], add_generation_prompt=True, return_dict=False) == \
            tok.render_for_completion(conv)
        assert hf_tok.apply_chat_template(conv["messages"], return_dict=False) == tok.render_conversation(conv)[0]
    text = (DOCS / "tutorial/errors.rst.txt").read_text()[:3000]  # held out from the tokenizer's training text
    assert hf_tok(text)["input_ids"] == tok.encode(text, prepend_bos=True)
    assert hf_tok.decode(tok.encode(text)) == text
    card = (exported / "README.md").read_text()
    assert "| sft | val_loss | 1.25 |" in card and "greedy tokens identical" in card
    gen = json.loads((exported / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.encode_special("<|assistant_end|>"), tok.bos_id]


def test_export_import_round_trip_is_exact(run, exported, tok, tmp_path):
    base, params, _ = run
    # (the import's own check against transformers runs in the next-but-one test)
    assert import_hf.main(["--src", str(exported), "--out", str(tmp_path / "imp"), "--no-verify"]) == 0
    back, config, meta = ckpt_lib.restore_model(str(tmp_path / "imp"), "sft")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert jax.tree.structure(params) == jax.tree.structure(back)
    assert Tokenizer.load(tmp_path / "imp" / "tokenizer").hash == meta["tokenizer_hash"] == tok.hash
    chat, _, _ = load_model("sft", base_dir=str(tmp_path / "imp"))  # what the CLI and the Gradio app call
    assert len(list(chat.generate(chat.prompt_tokens([{"role": "user", "content": "hi"}]), max_tokens=5))) > 0


def test_bf16_export_stores_bf16_and_imports_rounded(run, tmp_path):
    base, params, _ = run
    out = tmp_path / "bf16"
    assert export_hf.main(["--stage", "sft", "--base_dir", str(base), "--out", str(out), "--dtype", "bf16",
                           "--no-verify"]) == 0
    from safetensors import safe_open
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert import_hf.main(["--src", str(out), "--out", str(tmp_path / "imp"), "--no-verify"]) == 0
    back, _, _ = ckpt_lib.restore_model(str(tmp_path / "imp"), "sft")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16).astype(jnp.float32)), np.asarray(b))


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_initialised_model_imports_with_equal_logits(tok, tmp_path, tied):
    """A model made by transformers from a config of its own (their rms_norm_eps, no tokenizer hash; tied:
    one matrix for embedding and head, which we import as an untied copy)."""
    src = tmp_path / "theirs"
    config = transformers.NanoChatConfig(tie_word_embeddings=tied,
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=128, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, final_logit_softcapping=15.0,
        bos_token_id=tok.bos_id, eos_token_id=tok.encode_special("<|assistant_end|>"), pad_token_id=None)
    torch.manual_seed(0)
    model = transformers.NanoChatForCausalLM(config).eval()
    with torch.no_grad():  # its init (std 0.02) gives near-uniform attention and logits; widen it
        for w in model.parameters():
            w.mul_(20.0)
    model.save_pretrained(src)
    (src / "tokenizer.json").write_text(hf_format.tokenizer_json(tok))
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"), bos_token="<|bos|>",
                                         eos_token="<|assistant_end|>",
                                         chat_template=hf_format.CHAT_TEMPLATE).save_pretrained(src)
    assert import_hf.main(["--src", str(src), "--out", str(tmp_path / "imp"), "--stage", "base"]
                          + ["--no-verify"] * tied) == 0  # (the import's own check: once is enough)
    params, config, meta = ckpt_lib.restore_model(str(tmp_path / "imp"), "base")
    if tied:
        np.testing.assert_array_equal(params["lm_head"]["kernel"], params["wte"]["embedding"].T)
    else:
        assert meta["verification"]["greedy_tokens_agreed"] == hf_format.GREEDY_TOKENS
    cfg = model_lib.ModelConfig.from_config(config)
    assert (cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.depth) == (64, 2, 1, 32, 2)
    ids = [tok.bos_id] + tok.encode("Python is an easy to learn, powerful programming language.")
    diff = _max_logit_diff(params, cfg, model, ids)
    assert diff <= 1e-4
    with torch.no_grad():
        assert float(model(torch.tensor([ids])).logits.std()) > 1.0  # logits far from uniform: the check has teeth


def _copy(exported, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(exported, dst)
    return dst


def _edit_json(path, edit):
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d, ensure_ascii=False))


def test_tampered_tokenizer_and_mismatched_vocab_are_refused(exported, tok, tmp_path, capsys):
    src = _copy(exported, tmp_path)

    def swap_two_bytes(d):  # 'a' and 'b' trade ids: a valid tokenizer, but not the one the weights learned
        v = d["model"]["vocab"]
        v["a"], v["b"] = v["b"], v["a"]
    _edit_json(src / "tokenizer.json", swap_two_bytes)
    assert import_hf.main(["--src", str(src), "--out", str(tmp_path / "imp")]) == 2
    assert "does not belong to these weights" in capsys.readouterr().err
    assert not (tmp_path / "imp").exists()

    src = _copy(exported, tmp_path / "2")
    _edit_json(src / "config.json", lambda d: d.update(vocab_size=d["vocab_size"] + 64))
    with pytest.raises(UserError, match=f"vocab_size {tok.vocab_size + 64} but tokenizer.json has {tok.vocab_size} "):
        import_hf.import_hf(str(src), str(tmp_path / "imp"))


@pytest.mark.parametrize("file,edit,named", [
    ("config.json", lambda d: d.update(hidden_act="silu"), "hidden_act='silu'"),
    ("config.json", lambda d: d["rope_parameters"].update(rope_theta=500000.0), "rope_theta=500000.0"),
    ("config.json", lambda d: d["rope_parameters"].update(rope_type="linear", factor=2.0), "rope_type='linear'"),
    ("config.json", lambda d: d.update(final_logit_softcapping=None), "final_logit_softcapping=None"),
    ("config.json", lambda d: d.update(intermediate_size=192), "intermediate_size=192"),
    ("config.json", lambda d: d.update(attention_bias=True), "attention_bias"),
    ("config.json", lambda d: d.update(model_type="llama"), "model_type is 'llama'"),
    ("tokenizer.json", lambda d: d["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\s+|\S+"),
     "split regex"),
    ("tokenizer.json", lambda d: d["added_tokens"][0].update(content="<s>"), "added tokens"),
    ("tokenizer.json", lambda d: d.update(normalizer={"type": "NFC"}), "a normalizer (NFC)"),
])
def test_what_we_cannot_represent_is_refused_by_name(exported, tmp_path, capsys, file, edit, named):
    src = _copy(exported, tmp_path)
    _edit_json(src / file, edit)
    assert import_hf.main(["--src", str(src), "--out", str(tmp_path / "imp")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot import") and named in err, err


def test_a_mismatch_fails_the_export_with_the_numbers(run, tmp_path, monkeypatch, capsys):
    base, _, _ = run
    real = hf_format.to_hf_tensors

    def rope_halves_swapped(params):  # a plausible mapping bug: q's two RoPE halves exchanged in every head
        t = real(params)
        for name in [n for n in t if n.endswith("q_proj.weight")]:
            t[name] = t[name].reshape(-1, 2, 16, t[name].shape[1])[:, ::-1].reshape(t[name].shape).copy()
        return t
    monkeypatch.setattr(hf_format, "to_hf_tensors", rope_halves_swapped)
    out = tmp_path / "hf"
    assert export_hf.main(["--stage", "sft", "--base_dir", str(base), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "logits differ by up to" in err and "greedy tokens agree for" in err, err
    assert not out.exists() and (tmp_path / "hf.failed" / "model.safetensors").exists()


def test_restore_notebook_runs(run, monkeypatch):
    nbclient, nbformat = pytest.importorskip("nbclient"), pytest.importorskip("nbformat")
    base, _, _ = run
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("NANOCHAT_STAGE", "sft")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel imports this checkout's nanochat_jax
    nb = nbformat.read(ROOT / "notebooks" / "restore_and_chat.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(base)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"sft step {STEP}: " in text and "assistant: " in text and "stages plotted: ['sft']" in text
    assert any("image/png" in o.get("data", {}) for o in outputs if o.output_type == "display_data")
