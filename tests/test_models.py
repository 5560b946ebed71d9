"""Models: building, checkpoints, load_model (shipped, folders, local Hugging Face GPT-2), bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import tvlens
from tvlens import tasks
from tvlens.errors import CheckpointError, ConfigError, OfflineWeightsError, UnknownNameError
from tvlens.models import build_model, is_continuous, load_checkpoint, save_checkpoint


def test_token_model_keeps_transformerlens_hooks():
    m = build_model("shift", n_layers=2, d_model=32, n_heads=4)
    p = tasks.get("shift").sample(2, shots=4, seed=0)
    logits, cache = m.run_with_cache(p.tokens)
    assert logits.shape == (len(p), p.seq_len, m.cfg.d_vocab)
    assert cache["blocks.1.hook_resid_post"].shape == (len(p), p.seq_len, 32)


def test_regression_model_reads_float_inputs_with_the_same_hook_names():
    fam = tasks.get("sparse_regression_small")
    m = build_model(fam, n_layers=2, d_model=32, n_heads=4, shots=9)
    assert is_continuous(m)
    p = fam.sample(3, shots=9, seed=0)
    from tvlens.backends import get_backend
    from tvlens.backends.loading import read_in_of

    bk = get_backend(m)
    out = bk.logits(p.inputs)
    assert out.shape == (len(p), p.seq_len, 1)
    read_in = m.embed if bk.kind == "hooked" else read_in_of(m)
    resid0 = bk.capture(p.inputs, ["blocks.0.hook_resid_pre"])["blocks.0.hook_resid_pre"]
    emb = p.inputs @ read_in.W_E + read_in.b_E
    assert torch.allclose(resid0, emb + m.W_pos[: p.seq_len], atol=1e-6)
    # running blocks 1.. from the residual works as on token models
    resid = bk.capture(p.inputs, ["blocks.1.hook_resid_pre"])["blocks.1.hook_resid_pre"]
    assert torch.allclose(bk.unembed(bk.run_from(resid, 1)), out, atol=1e-5)
    with pytest.raises(ConfigError, match="input dimension 5"):
        bk.logits(torch.zeros(1, 4, 5))


def test_same_seed_same_initial_weights():
    a = build_model("bitwise", n_layers=1, d_model=16, n_heads=2, seed=3)
    b = build_model("bitwise", n_layers=1, d_model=16, n_heads=2, seed=3)
    c = build_model("bitwise", n_layers=1, d_model=16, n_heads=2, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("family", ["categories", "sparse_regression_small"])
def test_checkpoint_round_trip(tmp_path, family):
    fam = tasks.get(family)
    m = build_model(fam, n_layers=2, d_model=32, n_heads=4, seed=1)
    p = fam.sample(2, shots=4, seed=0)
    save_checkpoint(m, tmp_path / "step_000007", step=7, metrics={"mean": 0.5}, dtype=torch.float32)
    sidecar = json.loads((tmp_path / "step_000007.json").read_text())
    assert sidecar["step"] == 7 and sidecar["family"]["name"] == family and sidecar["model_config"]["d_model"] == 32
    m2 = load_checkpoint(tmp_path / "step_000007")
    assert torch.equal(m(p.model_input), m2(p.model_input))
    assert tvlens.model_info(m2).step == 7
    assert tvlens.model_info(m2).task_family().config() == fam.config()
    # half precision: close, and load_model finds the folder's last step
    save_checkpoint(m, tmp_path / "step_000009", step=9)
    m3 = tvlens.load_model(tmp_path)
    assert tvlens.model_info(m3).step == 9
    assert torch.allclose(m(p.model_input), m3(p.model_input), atol=0.05)
    assert tvlens.model_info(tvlens.load_model(tmp_path, step=7)).step == 7
    with pytest.raises(CheckpointError, match="no checkpoint at step 8"):
        tvlens.load_model(tmp_path, step=8)


def test_sidecar_that_does_not_match_its_weights(tmp_path):
    a = build_model("shift", n_layers=2, d_model=32, n_heads=4, seed=1)
    b = build_model("shift", n_layers=2, d_model=32, n_heads=4, seed=2)
    save_checkpoint(a, tmp_path / "a" / "step_000001")
    save_checkpoint(b, tmp_path / "b" / "step_000001")
    shutil.copy(tmp_path / "b" / "step_000001.safetensors", tmp_path / "a" / "step_000001.safetensors")
    with pytest.raises(CheckpointError, match="does not match its sidecar"):
        load_checkpoint(tmp_path / "a" / "step_000001")
    # a sidecar describing another architecture (hash removed): shapes are checked too
    c = build_model("shift", n_layers=1, d_model=32, n_heads=4)
    save_checkpoint(c, tmp_path / "c" / "step_000001")
    meta = json.loads((tmp_path / "b" / "step_000001.json").read_text())
    meta.pop("weights_sha256")
    (tmp_path / "c" / "step_000001.json").write_text(json.dumps(meta))
    # the weights file's header records the sidecar it was saved with: the swap is named
    with pytest.raises(CheckpointError, match="belongs to another save.*model_config"):
        load_checkpoint(tmp_path / "c" / "step_000001")
    # without any hash (verify=False, a pair the user trusts) the shapes are still checked
    with pytest.raises(CheckpointError, match="does not match the model its sidecar describes"):
        load_checkpoint(tmp_path / "c" / "step_000001", verify=False)


def test_missing_paths_and_unknown_names(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        tvlens.load_model(str(tmp_path / "nope" / "run"))
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "step_000001")
    with pytest.raises(CheckpointError, match="holds no tvlens checkpoint"):
        tvlens.load_model(tmp_path)
    with pytest.raises(UnknownNameError, match="Shipped tvlens models: .*default"):
        tvlens.load_model("not-a-model")
    with pytest.raises(ConfigError, match="n_heads=3 must divide"):
        build_model("shift", d_model=32, n_heads=3)


def test_list_checkpoints_takes_a_shipped_name_an_alias_or_a_folder(tmp_path, monkeypatch):
    from tvlens.models import CHECKPOINT_DIR

    pairs = tvlens.list_checkpoints("bitwise")
    assert pairs == tvlens.list_checkpoints(CHECKPOINT_DIR / "bitwise") and len(pairs) > 1
    assert [s for s, _ in pairs] == tvlens.checkpoint_steps("bitwise") == sorted(s for s, _ in pairs)
    assert tvlens.list_checkpoints("default") == tvlens.list_checkpoints(CHECKPOINT_DIR / "codes")
    run = tmp_path / "bitwise"  # a folder of that name, where given, is the folder
    save_checkpoint(build_model("shift", n_layers=1, d_model=16, n_heads=2), run / "step_000007")
    monkeypatch.chdir(tmp_path)
    assert [s for s, _ in tvlens.list_checkpoints("bitwise")] == [7]
    with pytest.raises(CheckpointError, match="no checkpoint folder at nope .*nor a shipped model.*'bitwise'"):
        tvlens.list_checkpoints("nope")


def test_pretrained_name_without_weights_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-home" / "hub"))
    with pytest.raises(OfflineWeightsError, match="offline"):
        tvlens.load_model("gpt2")


def _local_gpt2(folder):
    """A tiny GPT-2 with a word-level tokenizer, written as a Hugging Face model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<|endoftext|>", "the", "cat", "sat", "on", "mat", "dog", "ran", "a", "big", "red", "->", ";"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                     unk_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(words), n_positions=32, n_ctx=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return hf, hf_tok


def test_local_hugging_face_gpt2_loads_offline_with_the_same_logits(tmp_path):
    hf, hf_tok = _local_gpt2(tmp_path / "tiny-gpt2")
    model = tvlens.load_model(tmp_path / "tiny-gpt2")
    ids = torch.tensor([hf_tok.encode("the cat sat on the mat")])
    with torch.no_grad():
        ref = hf(ids).logits
    ours = model(ids)
    # TransformerLens centres the unembedding: logits agree up to a constant per position
    assert torch.allclose(ours.log_softmax(-1), ref.log_softmax(-1), atol=1e-4)
    assert model.to_str_tokens("the cat", prepend_bos=False) == ["the", "cat"]


def test_local_folder_without_weights(tmp_path):
    _local_gpt2(tmp_path / "g")
    for f in (tmp_path / "g").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(OfflineWeightsError, match="no weights"):
        tvlens.load_model(tmp_path / "g")


def test_extract_and_td_on_a_locally_built_pretrained_model(tmp_path):
    """The encoding path runs on any model load_model returns, e.g. a local Hugging Face GPT-2."""
    from tvlens.encoding import extract, task_decodability

    _, hf_tok = _local_gpt2(tmp_path / "g")
    model = tvlens.load_model(tmp_path / "g")
    texts = {0: ["the cat sat on the mat ->", "a dog sat on a mat ->", "the big cat ran on a mat ->"],
             1: ["the red dog ran ->", "a big red dog ran ->", "the dog ran on the red mat ->"]}
    rows, labels = [], []
    for t, ts in texts.items():
        for text in ts:
            ids = hf_tok.encode(text)
            rows.append(ids + [0] * (8 - len(ids)))
            labels.append(t)
    tokens = torch.tensor(rows)
    qpos = torch.tensor([len(hf_tok.encode(x)) - 1 for ts in texts.values() for x in ts])
    p = tvlens.PromptSet(family="text", params={}, task_names=["cat", "dog"], labels=torch.tensor(labels),
                         query_pos=qpos, answers=torch.zeros(6, 1, dtype=torch.long),
                         targets=torch.full((6, 8), -100), train_mask=torch.zeros(6, 8, dtype=torch.bool),
                         shots=0, tokens=tokens)
    enc = extract(model, p, progress=False)
    assert enc.acts.shape == (6, 3, 32)
    _, cache = model.run_with_cache(tokens)
    assert torch.allclose(enc.at(2), cache["blocks.1.hook_resid_post"][torch.arange(6), qpos], atol=1e-5)
    assert task_decodability(enc, k=1).td.shape == (3,)


def test_named_model_configurations():
    from tvlens.models import model_config

    m = build_model("shift", **model_config("tiny"))
    assert (m.cfg.n_layers, m.cfg.d_model, m.cfg.n_heads) == (2, 32, 4)
    paper = model_config("paper")
    assert (paper["n_layers"], paper["d_model"], paper["n_heads"]) == (12, 256, 8)
    with pytest.raises(UnknownNameError, match="known: .*small"):
        model_config("huge")
