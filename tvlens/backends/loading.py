"""Building and loading models on either side of the seam.

tvlens checkpoints are stored in one format on disk, HookedTransformer's state dict (``embed.W_E``,
``blocks.0.attn.W_Q`` ``[heads, d_model, d_head]``, ...), whichever class wrote them. On TransformerLens 3.x
they load as a ``HookedTransformer``; as a ``TransformerBridge`` (TL 4.x, or ``backend="bridge"``) they
are converted with TransformerLens' own ``convert_tl_checkpoint`` into a ``boot_native`` bridge, and a
bridge's weights are converted back (:func:`tl_state`) when saved.
"""

from __future__ import annotations

import math
import types
from pathlib import Path
from typing import Any

import torch

from tvlens.backends.embed import LinearEmbed, read_in_of  # noqa: F401 - also importable from here
from tvlens.errors import ConfigError, UnsupportedModelError

BACKENDS = ("auto", "hooked", "bridge")


def resolve_backend(backend: str) -> str:
    """``"hooked"`` or ``"bridge"`` for a requested backend (``"auto"``: HookedTransformer where it exists)."""
    from tvlens.backends import has_hooked_transformer

    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "hooked" if has_hooked_transformer() else "bridge"
    if backend == "hooked" and not has_hooked_transformer():
        from tvlens.backends import tl_version

        raise UnsupportedModelError(
            f"backend='hooked': TransformerLens {tl_version()} has no HookedTransformer (4.0 removed it); "
            "use backend='bridge' or 'auto', or install transformer-lens 3.9"
        )
    return backend


def _architecture(folder) -> str:
    import json

    try:
        archs = json.loads((Path(folder) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        archs = []
    return str(archs[0]) if archs else "this architecture"


def _config_lacks_n_ctx(folder) -> bool:
    import json

    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("model_type") == "gpt2" and "n_ctx" not in cfg


def choose_backend(backend: str, folder: Any = None, architecture: str | None = None) -> tuple[str, str]:
    """The backend for a pretrained Hugging Face model (a local ``folder``, or only its ``architecture`` before
    the folder exists) and why. ``"auto"``: a HookedTransformer where this TransformerLens has one and supports
    the architecture, else a bridge. ``"hooked"`` for an architecture it does not support is refused here,
    before any weights load."""
    from tvlens.backends import tl_version

    kind = resolve_backend(backend)
    tl = f"TransformerLens {tl_version()}"
    arch = architecture or (_architecture(folder) if folder is not None else "this architecture")
    if kind == "bridge":
        return kind, (f"TransformerBridge: {tl} has no HookedTransformer" if backend == "auto"
                      else "TransformerBridge: backend='bridge' was asked for")
    from tvlens.backends.hooked import hooked_unsupported, hooked_unsupported_architecture

    why = hooked_unsupported(folder) if folder is not None else hooked_unsupported_architecture(arch)
    if why is None:
        note = ""
        if folder is not None and _config_lacks_n_ctx(folder):
            note = " (its GPT-2 config has no n_ctx, as transformers 5 saves it: tvlens maps n_positions)"
        return "hooked", f"HookedTransformer: {tl}'s HookedTransformer supports {arch}{note}"
    if backend == "auto":
        return "bridge", f"TransformerBridge: {tl}'s HookedTransformer does not support {arch} ({why})"
    raise UnsupportedModelError(f"backend='hooked': {tl}'s HookedTransformer does not support {arch} ({why}); "
                                "use backend='bridge' or backend='auto' (a TransformerBridge)")


def build(cfg: dict[str, Any], continuous: bool, backend: str = "auto", model_name: str = "tvlens"):
    """A fresh model from a tvlens model config (the ``_CFG_FIELDS`` of ``tvlens.models``), in eval mode."""
    kind = resolve_backend(backend)
    if kind == "hooked":
        from tvlens.backends.hooked import build_hooked

        return build_hooked(cfg, continuous, model_name).eval()
    return build_native_bridge(cfg, continuous, model_name).eval()


def _bridge_config(cfg: dict[str, Any]):
    from transformer_lens.config import TransformerBridgeConfig

    fields = {k: v for k, v in cfg.items() if k not in ("seed",)}
    try:
        return TransformerBridgeConfig(**fields, default_prepend_bos=False, seed=cfg.get("seed"))
    except TypeError as e:
        raise ConfigError(f"this TransformerLens cannot build a TransformerBridge config from {fields} ({e})") from e


def build_native_bridge(cfg: dict[str, Any], continuous: bool, model_name: str = "tvlens"):
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_native(_bridge_config(cfg), model_name=model_name)
    if continuous:
        g = torch.Generator().manual_seed(int(cfg.get("seed") or 0))
        read_in = LinearEmbed(int(cfg["d_vocab"]), int(cfg["d_model"]))
        with torch.no_grad():
            read_in.W_E.copy_(torch.randn(read_in.W_E.shape, generator=g) / math.sqrt(int(cfg["d_vocab"])))
        native = model.original_model
        native.tvlens_read_in = read_in  # trained and moved with the model's own parameters
        native.forward = types.MethodType(_read_in_forward, native)
    return model


def _read_in_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
    """The native model's forward with the continuous read-in applied to its float inputs (a bridge hands
    float inputs to the model as ``inputs_embeds``), so every TransformerLens call on the bridge works."""
    if inputs_embeds is not None:
        inputs_embeds = self.tvlens_read_in(inputs_embeds)
    return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              inputs_embeds=inputs_embeds, **kwargs)


def from_tl_state(state: dict[str, torch.Tensor], cfg: dict[str, Any], continuous: bool, backend: str = "auto",
                  into=None):
    """A model holding a HookedTransformer-format state dict (a tvlens checkpoint's weights). ``into``: a
    model built from the same config and class (e.g. the previous checkpoint of a run) to load the weights
    into instead of building one (booting a bridge costs ~1 s; loading weights a few ms)."""
    kind = resolve_backend(backend)
    model = into if into is not None else build(cfg, continuous, kind)
    if kind == "hooked":
        model.load_state_dict(state)
        return model
    try:
        from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint
    except ImportError as e:
        from tvlens.backends import tl_version

        raise UnsupportedModelError(
            f"backend='bridge': TransformerLens {tl_version()} has no convert_tl_checkpoint to turn a tvlens "
            "checkpoint into a bridge (TransformerLens 4.x has); load it with backend='hooked' here"
        ) from e
    state = dict(state)
    read_in = None
    if continuous:
        read_in = {"W_E": state.pop("embed.W_E"), "b_E": state.pop("embed.b_E")}
        state["embed.W_E"] = torch.zeros(int(cfg["d_vocab"]), int(cfg["d_model"]))  # the unused token table
    conv = convert_tl_checkpoint(state, _bridge_config(cfg))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("tvlens_read_in.")}
    got = {k: tuple(v.shape) for k, v in conv.items()}
    if expected != got:
        bad = sorted(set(expected) ^ set(got))[:5] + [f"{k}: {got[k]} vs {expected[k]}" for k in expected
                                                      if k in got and got[k] != expected[k]][:5]
        raise ValueError(f"the weights do not fit the model the config describes: {bad}")
    model.load_state_dict(conv, strict=False)  # strict would also ask for the read-in (loaded below)
    if read_in is not None:
        read_in_of(model).load_state_dict(read_in)
    return model


def tl_state(model) -> dict[str, torch.Tensor]:
    """A model's weights as a HookedTransformer-format state dict (what tvlens checkpoints hold)."""
    from tvlens.backends import get_backend

    bk = get_backend(model)
    if bk.kind == "hooked":
        return dict(model.state_dict())
    cfg = model.cfg
    H, dh, D = bk.n_heads, bk.d_head, bk.d_model
    kvh = getattr(cfg, "n_key_value_heads", None) or H
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if k.startswith("tvlens_read_in.") or k.endswith(".rotary.sin") or k.endswith(".rotary.cos"):
            continue
        out.update(_tl_key(k, v, H, kvh, dh, D))
    for i in range(bk.n_layers):
        out[f"blocks.{i}.attn.IGNORE"] = torch.tensor(float("-inf"))
        out[f"blocks.{i}.attn.mask"] = torch.zeros(0, 0, dtype=torch.bool)
    read_in = read_in_of(model)
    if read_in is not None:
        out["embed.W_E"], out["embed.b_E"] = read_in.W_E.detach(), read_in.b_E.detach()
    return out


_INV = [  # bridge suffix -> (HookedTransformer suffix, how to reshape)
    ("attn.q.weight", "attn.W_Q", "qkv"), ("attn.k.weight", "attn.W_K", "kv"), ("attn.v.weight", "attn.W_V", "kv"),
    ("attn.o.weight", "attn.W_O", "o"), ("attn.q.bias", "attn.b_Q", "bq"), ("attn.k.bias", "attn.b_K", "bkv"),
    ("attn.v.bias", "attn.b_V", "bkv"), ("attn.o.bias", "attn.b_O", "id"), ("mlp.in.weight", "mlp.W_in", "T"),
    ("mlp.in.bias", "mlp.b_in", "id"), ("mlp.out.weight", "mlp.W_out", "T"), ("mlp.out.bias", "mlp.b_out", "id"),
    ("mlp.gate.weight", "mlp.W_gate", "T"), ("mlp.gate.bias", "mlp.b_gate", "id"),
    ("unembed.weight", "unembed.W_U", "T"), ("unembed.bias", "unembed.b_U", "id"),
    ("embed.weight", "embed.W_E", "id"), ("pos_embed.weight", "pos_embed.W_pos", "id"),
    ("weight", "w", "id"), ("bias", "b", "id"),
]


def _tl_key(key: str, v: torch.Tensor, H: int, kvh: int, dh: int, D: int) -> dict[str, torch.Tensor]:
    v = v.detach()
    for suffix, tl_suffix, how in _INV:
        if key == suffix or key.endswith("." + suffix):
            k = key[: len(key) - len(suffix)] + tl_suffix
            if how in ("qkv", "kv"):
                v = v.reshape(H if how == "qkv" else kvh, dh, D).transpose(1, 2)
            elif how == "o":
                v = v.reshape(D, H, dh).permute(1, 2, 0)
            elif how == "bq":
                v = v.reshape(H, dh)
            elif how == "bkv":
                v = v.reshape(kvh, dh)
            elif how == "T":
                v = v.T
            if how == "kv" and kvh != H:
                k = k.replace(".W_", "._W_")
            if how == "bkv" and kvh != H:
                k = k.replace(".b_", "._b_")
            return {k: v.contiguous()}
    raise ConfigError(f"cannot convert the bridge weight {key!r} to a tvlens checkpoint")


def load_pretrained(name: str, backend: str, device: Any = None, local_folder: bool = False, **kwargs: Any):
    """A Hugging Face model (a local folder, or a name already in the local cache) as either class."""
    kind = resolve_backend(backend)
    if kind == "hooked":
        from tvlens.backends.hooked import load_pretrained_hooked

        try:
            return load_pretrained_hooked(name, device, local_folder, **kwargs)
        except NotImplementedError as e:
            raise UnsupportedModelError(f"{name!r}: TransformerLens' HookedTransformer does not support it ({e}); "
                                        "use backend='bridge'") from e
    from transformer_lens.model_bridge import TransformerBridge

    tokenizer = kwargs.pop("tokenizer", None)
    if local_folder and tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError, TypeError):
            tokenizer = None
    dm = {k: kwargs.pop(k) for k in ("device_map", "n_devices", "max_memory", "offload_folder") if k in kwargs}
    if dm and device not in (None, "cpu"):
        raise ConfigError("give either device= or device_map=/n_devices=, not both")
    compat = kwargs.pop("compatibility_mode", False)
    import inspect

    accepted = inspect.signature(TransformerBridge.boot_transformers).parameters
    refused = [k for k in dm if k not in accepted]
    if refused:
        from tvlens.backends import tl_version

        raise ConfigError(f"{refused[0]}: TransformerLens {tl_version()}'s TransformerBridge.boot_transformers does not "
                          "take it (4.x does); drop it, or install transformer-lens 4")
    try:
        model = TransformerBridge.boot_transformers(
            str(Path(name)) if local_folder else name, device=None if dm else device, tokenizer=tokenizer, **dm, **kwargs)
    except (NotImplementedError, KeyError) as e:
        raise UnsupportedModelError(f"TransformerLens' bridge cannot boot {name!r}: {str(e).splitlines()[0][:300]}") from e
    except ValueError as e:
        if "device_map" in str(e) or "offload" in str(e):
            raise ConfigError(f"device_map: {str(e).splitlines()[0][:300]}") from e
        raise
    if compat:
        model.enable_compatibility_mode(disable_warnings=True)
    return model


__all__ = ["BACKENDS", "LinearEmbed", "build", "choose_backend", "from_tl_state", "load_pretrained", "read_in_of",
           "resolve_backend", "tl_state"]
