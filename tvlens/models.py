"""Models: synthetic HookedTransformer configurations, checkpoints and ``load_model``.

This is the only module that touches TransformerLens model classes; every other module talks to a
model through hook names and ``run_with_hooks`` / ``run_with_cache``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing at run time may reach the network

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from jaxtyping import Float
from torch import nn
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tvlens import tasks as _tasks
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


def _hooked_transformer(cfg: HookedTransformerConfig, cls: type[HookedTransformer] = HookedTransformer):
    # TransformerLens 3.x warns that HookedTransformer is deprecated in favour of 4.x's
    # TransformerBridge. We pin <4 on purpose (DESIGN.md) and keep the move to 4.x in this module,
    # so the warning only adds noise to every notebook cell.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*HookedTransformer.*deprecated.*", category=DeprecationWarning)
        return cls(cfg)


class LinearEmbed(nn.Module):
    """Read-in of continuous inputs into the residual stream: ``x @ W_E + b_E``.

    ``W_E`` is ``[d_in, d_model]``, the same layout as a token embedding's ``[d_vocab, d_model]``.
    """

    def __init__(self, d_in: int, d_model: int) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.randn(d_in, d_model) / math.sqrt(d_in))
        self.b_E = nn.Parameter(torch.zeros(d_model))

    def forward(self, x: Float[torch.Tensor, "batch pos d_in"]) -> Float[torch.Tensor, "batch pos d_model"]:
        return x @ self.W_E + self.b_E


class HookedRegressionTransformer(HookedTransformer):
    """A HookedTransformer on continuous inputs ``[batch, pos, d_in]`` with a scalar read-out.

    Everything after the read-in is TransformerLens' own (same hook names, ``start_at_layer`` and
    ``stop_at_layer``); the read-out is the unembedding with ``d_vocab_out = 1``.
    """

    def __init__(self, cfg: HookedTransformerConfig) -> None:
        super().__init__(cfg)
        self.embed = LinearEmbed(cfg.d_vocab, cfg.d_model)  # d_vocab holds d_in

    def input_to_embed(self, input, prepend_bos=None, padding_side=None, attention_mask=None, past_kv_cache=None):
        if not (torch.is_tensor(input) and input.is_floating_point() and input.ndim == 3):
            raise ConfigError(
                "a regression model takes float inputs of shape [batch, pos, d_in]; "
                f"got {type(input).__name__} {getattr(input, 'shape', '')} {getattr(input, 'dtype', '')}"
            )
        if input.shape[-1] != self.cfg.d_vocab:
            raise ConfigError(f"input dimension {input.shape[-1]} does not fit this model (d_in={self.cfg.d_vocab})")
        embed = self.hook_embed(self.embed(input.to(self.W_E.device)))
        pos_index = torch.zeros(input.shape[:2], dtype=torch.long, device=embed.device)
        residual, shortformer = self.get_residual(
            embed, 0, False, None, pos_index, return_shortformer_pos_embed=True
        )
        return residual, pos_index, shortformer, None


@dataclass
class ModelInfo:
    """What tvlens knows about a model: where it came from and what it was trained on."""

    source: str
    family: dict[str, Any] | None = None
    step: int | None = None
    metrics: dict[str, Any] | None = None
    command: str | None = None
    continuous: bool = False

    def task_family(self) -> "_tasks.TaskFamily | None":
        return None if self.family is None else _tasks.from_config(self.family)


def model_info(model: HookedTransformer) -> ModelInfo:
    info = getattr(model, "tvlens_info", None)
    return info if info is not None else ModelInfo(source=str(model.cfg.model_name))


def is_continuous(model: HookedTransformer) -> bool:
    return isinstance(model, HookedRegressionTransformer)


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
) -> HookedTransformer:
    """A fresh (randomly initialised, seeded) model shaped for a task family.

    ``build_model(family, **model_config("paper"))`` builds a named configuration.
    """
    fam = _tasks.get(family) if isinstance(family, str) else family
    for name, v, lo in (("n_layers", n_layers, 1), ("d_model", d_model, 1), ("n_heads", n_heads, 1)):
        if not isinstance(v, int) or v < lo:
            raise ConfigError(f"build_model: {name} must be an integer >= {lo}, got {v!r}")
    if d_model % n_heads:
        raise ConfigError(f"build_model: n_heads={n_heads} must divide d_model={d_model}")
    if n_ctx is None:
        n_ctx = fam.seq_len(shots)
    d_vocab = fam.d_in if fam.continuous else fam.d_vocab
    cfg = HookedTransformerConfig(
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
        attn_only=attn_only,
        seed=seed,
        default_prepend_bos=False,
        model_name=f"tvlens-{fam.name}",
    )
    model = _hooked_transformer(cfg, HookedRegressionTransformer if fam.continuous else HookedTransformer)
    if fam.continuous:  # LinearEmbed was created after TransformerLens' seeded init: seed it too
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            model.embed.W_E.copy_(torch.randn(model.embed.W_E.shape, generator=g) / math.sqrt(d_vocab))
    model.tvlens_info = ModelInfo(source="build_model", family=fam.config(), step=0, continuous=fam.continuous)
    if isinstance(fam, _tasks.TokenTaskFamily):  # model.to_tokens / to_str_tokens over the family's words
        from tvlens.tokenizer import attach_tokenizer

        attach_tokenizer(model, fam.vocab)
    model.eval()
    return model


# --------------------------------------------------------------------------- checkpoints
def _cfg_dict(model: HookedTransformer) -> dict[str, Any]:
    return {k: getattr(model.cfg, k) for k in _CFG_FIELDS}


def save_checkpoint(
    model: HookedTransformer,
    path: str | Path,
    *,
    step: int | None = None,
    metrics: dict[str, Any] | None = None,
    family: dict[str, Any] | None = None,
    command: str | None = None,
    dtype: torch.dtype = torch.float16,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``path.safetensors`` (weights, half precision by default) and ``path.json``."""
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
    sd = {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    return save_tensors_with_sidecar(path, sd, meta)


def _model_from_meta(meta: dict[str, Any], where: str) -> HookedTransformer:
    try:
        cfg_d = meta["model_config"]
        cfg = HookedTransformerConfig(**{**cfg_d, "default_prepend_bos": False})
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: sidecar has no usable model_config ({e})") from e
    cls = HookedRegressionTransformer if meta.get("continuous") else HookedTransformer
    return _hooked_transformer(cfg, cls)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> HookedTransformer:
    """Load one tvlens checkpoint (``<stem>.safetensors`` + ``<stem>.json``), weights as float32."""
    stem = Path(path)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    if not stem.with_suffix(".safetensors").exists() and not stem.with_suffix(".json").exists():
        raise CheckpointError(f"no checkpoint at {stem} (expected {stem}.safetensors and {stem}.json)")
    tensors, meta = load_tensors_with_sidecar(stem, expect_kind="tvlens-model")
    model = _model_from_meta(meta, str(stem))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))[:5]
        unexpected = sorted(set(got) - set(expected))[:5]
        shapes = [f"{k}: {got[k]} vs {expected[k]}" for k in expected if k in got and got[k] != expected[k]][:5]
        raise CheckpointError(
            f"{stem}.safetensors does not match the model its sidecar describes: missing {missing}, "
            f"unexpected {unexpected}, shape mismatches {shapes}"
        )
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    model.to(device, print_details=False)
    model.eval()
    model.tvlens_info = ModelInfo(
        source=str(stem),
        family=meta.get("family"),
        step=meta.get("step"),
        metrics=meta.get("metrics"),
        command=meta.get("command"),
        continuous=bool(meta.get("continuous")),
    )
    from tvlens.tokenizer import attach_tokenizer, family_vocab

    attach_tokenizer(model, family_vocab(meta.get("family")))  # the family's words: model.to_tokens works
    return model


_STEP_RE = re.compile(r"step_(\d+)\.safetensors$")


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """``(step, stem)`` of every checkpoint in a run folder, or of a shipped model by name or alias
    (``"bitwise"``, ``"default"``), by step. An existing folder wins over a shipped name."""
    if not Path(folder).is_dir() and (CHECKPOINT_DIR / ALIASES.get(str(folder), str(folder))).is_dir():
        folder = CHECKPOINT_DIR / ALIASES.get(str(folder), str(folder))
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no checkpoint folder at {folder} (nor a shipped model: {sorted(ALIASES) + shipped_models()})")
    out = []
    for f in folder.iterdir():
        m = _STEP_RE.search(f.name)
        if m:
            out.append((int(m.group(1)), f.with_suffix("")))
    return sorted(out)


def shipped_models() -> list[str]:
    if not CHECKPOINT_DIR.is_dir():
        return []
    return sorted(d.name for d in CHECKPOINT_DIR.iterdir() if d.is_dir() and list_checkpoints(d))


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
    device: str | torch.device = "cpu",
    **pretrained_kwargs: Any,
) -> HookedTransformer:
    """Load a model by name or path, never touching the network.

    - a shipped tvlens model by name (``"default"``, ``"shift"``, ``"categories"``, ``"bitwise"``),
      its last checkpoint unless ``step`` names one;
    - a tvlens run folder (as written by ``tvlens train``) or one checkpoint (``.../step_000100``);
    - a TransformerLens pretrained model name (e.g. ``"gpt2"``) whose weights are in the local
      Hugging Face cache, or a local Hugging Face model folder (``config.json`` + weights).
    """
    s = str(name_or_path)
    name = ALIASES.get(s, s)
    folder = CHECKPOINT_DIR / name
    if folder.is_dir() and list_checkpoints(folder):
        return _load_from_folder(folder, step, device)
    p = Path(s).expanduser()
    if p.is_dir() and (p / "config.json").exists():
        return _load_pretrained(str(p), device, local_folder=True, **pretrained_kwargs)
    if p.is_dir():
        if not list_checkpoints(p):
            raise CheckpointError(f"{p} holds no tvlens checkpoint (step_*.safetensors) and no config.json")
        return _load_from_folder(p, step, device)
    if p.with_suffix(".safetensors").exists() or (p.suffix == ".safetensors" and p.exists()):
        return load_checkpoint(p, device)
    if "/" in s or s.startswith((".", "~")) or s.endswith((".safetensors", ".json")):
        raise CheckpointError(f"no model at path {s!r}: the path does not exist")
    from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES, make_model_alias_map

    aliases = make_model_alias_map()
    if s.lower() in aliases or s in OFFICIAL_MODEL_NAMES:
        return _load_pretrained(s, device, local_folder=False, **pretrained_kwargs)
    raise UnknownNameError(
        f"unknown model {s!r}. Shipped tvlens models: {sorted(set(ALIASES) | set(shipped_models()))}; "
        "or give a tvlens checkpoint folder, a local Hugging Face model folder, or a TransformerLens "
        "pretrained name (e.g. 'gpt2', 'pythia-70m')"
    )


def _load_from_folder(folder: Path, step: int | None, device) -> HookedTransformer:
    ckpts = list_checkpoints(folder)
    if step is None:
        return load_checkpoint(ckpts[-1][1], device)
    for s, stem in ckpts:
        if s == step:
            return load_checkpoint(stem, device)
    raise CheckpointError(f"{folder} has no checkpoint at step {step}; steps: {[s for s, _ in ckpts]}")


def _load_pretrained(name: str, device, local_folder: bool, **kwargs: Any) -> HookedTransformer:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if local_folder:
            folder = Path(name)
            has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
            if not has_weights:
                raise OfflineWeightsError(
                    f"{folder} has a config.json but no weights (model.safetensors or pytorch_model.bin)"
                )
            hf_model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
            try:
                tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            except (OSError, ValueError, TypeError):
                tokenizer = None
            # TransformerLens 3.x builds the config from a local folder (get_pretrained_model_config
            # accepts a path) but from_pretrained first maps the name to an official one and rejects
            # paths. Let paths through that one lookup, for this call only.
            import transformer_lens.loading_from_pretrained as loading

            official = loading.get_official_model_name
            with warnings.catch_warnings(), mock.patch.object(
                loading, "get_official_model_name", lambda n: n if Path(n).exists() else official(n)
            ):
                warnings.filterwarnings("ignore", category=DeprecationWarning)  # see _hooked_transformer
                model = HookedTransformer.from_pretrained(
                    str(folder), hf_model=hf_model, tokenizer=tokenizer, device=device, **kwargs
                )
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                model = HookedTransformer.from_pretrained(name, device=device, **kwargs)
    except OfflineWeightsError:
        raise
    except (OSError, ValueError) as e:
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise OfflineWeightsError(
            f"could not load pretrained model {name!r} offline ({msg}). tvlens never downloads: put the "
            "weights in the Hugging Face cache (HF_HOME) on a machine with access, or pass a local "
            "folder holding config.json, the weights and the tokenizer files"
        ) from e
    model.tvlens_info = ModelInfo(source=name)
    model.eval()
    return model


def supports_prefix_kv(model) -> bool:
    """Whether ``prefix_kv_cache`` continues ``model`` exactly: a HookedTransformer with causal attention
    whose cached keys/values are the ``hook_k``/``hook_v`` activations and whose position information
    is in the residual stream (learned positions) or applied after the cache (rotary, with the offset)."""
    cfg = getattr(model, "cfg", None)
    return (
        isinstance(model, HookedTransformer)
        and cfg is not None
        and cfg.attention_dir == "causal"
        and cfg.positional_embedding_type in ("standard", "rotary")
        and getattr(cfg, "clip_qkv", None) is None  # clamped after hook_k
        and cfg.original_architecture not in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")
        and not getattr(cfg, "use_logn_attn", False)
        and not getattr(cfg, "use_dynamic_ntk_rope", False)
        and getattr(cfg, "n_devices", 1) == 1
    )


def unembed(model, x: torch.Tensor) -> torch.Tensor:
    """``model.unembed(x)`` without TransformerLens 3.x's per-call copy of the whole unembedding matrix
    (its ``Unembed.forward`` runs ``F.linear(x, W_U.T.contiguous(), b_U)``: 154 MB copied per call for
    GPT-2's 768 x 50257, which dominated sweeps that unembed a few positions many times). The hooks
    ``unembed.hook_in`` / ``hook_out`` still run; results equal TL's up to float rounding."""
    from transformer_lens.components import Unembed

    u = model.unembed
    if type(u) is not Unembed:  # e.g. the regression read-out: its own forward
        return u(x)
    return u.hook_out(torch.matmul(u.hook_in(x), u.W_U) + u.b_U)


def prefix_kv_cache(model, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor], batch: int):
    """A frozen TransformerLens KV cache holding ``keys[l]``/``values[l]`` (``hook_k``/``hook_v``
    activations ``[batch, prefix, kv_heads, d_head]``) for layers ``l``; other layers are empty. Passed
    with ``start_at_layer`` to ``model(...)``, the run continues those prefix positions."""
    from transformer_lens import TransformerLensKeyValueCache, TransformerLensKeyValueCacheEntry

    device = next(model.parameters()).device
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, batch)
    for layer, k in keys.items():
        cache.entries[layer] = TransformerLensKeyValueCacheEntry(past_keys=k, past_values=values[layer])
    cache.freeze()
    return cache


__all__ = [
    "unembed",
    "HookedRegressionTransformer",
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
