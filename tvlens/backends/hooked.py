"""The HookedTransformer side of the seam (TransformerLens 3.x)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence

import torch

from tvlens.backends._common import CommonBackend, hook_error


def hooked_classes() -> tuple[type, ...]:
    """The HookedTransformer class where this TransformerLens has one (3.x), else ()."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from transformer_lens import HookedTransformer
    except ImportError:
        return ()
    return (HookedTransformer,)


class HookedBackend(CommonBackend):
    kind = "hooked"

    def __init__(self, model) -> None:
        self._read_shape(model)
        self.continuous = bool(getattr(model, "tvlens_continuous", False))

    # hooks
    def hook_name(self, canonical: str) -> str:
        if canonical not in self.model.hook_dict:
            raise hook_error(canonical, "HookedTransformer", self.model.hook_dict)
        return canonical

    def hooks(self, fwd_hooks: Sequence = (), bwd_hooks: Sequence = ()):
        for n, _ in list(fwd_hooks) + list(bwd_hooks):
            self.hook_name(n)
        return self.model.hooks(fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks))

    def run_with_hooks(self, x, fwd_hooks: Sequence = (), stop_at_layer: int | None = None):
        for n, _ in fwd_hooks:
            self.hook_name(n)
        return self.model.run_with_hooks(x, fwd_hooks=list(fwd_hooks), stop_at_layer=stop_at_layer)

    # running parts
    def embed_input(self, x):
        return self.model(x, stop_at_layer=0)

    def run_from(self, resid, start: int, stop: int | None = None, past_kv=None):
        return self.model(resid, start_at_layer=start, stop_at_layer=self.n_layers if stop is None else stop,
                          past_kv_cache=past_kv)

    def final_resid(self, x):
        return self.model(x, stop_at_layer=self.n_layers)

    def ln_final(self, resid):
        ln = getattr(self.model, "ln_final", None)
        return ln(resid) if ln is not None else resid

    def unembed(self, resid):
        return fast_unembed(self.model, self.ln_final(resid))

    def logits(self, x):
        return self.model(x)

    # weights and placement
    @property
    def W_O(self):
        return self.model.W_O

    @property
    def W_U(self):
        return self.model.W_U

    @property
    def ln_final_weight(self):
        ln = getattr(self.model, "ln_final", None)
        return getattr(ln, "w", None)

    @property
    def input_device(self) -> torch.device:
        return self.model.embed.W_E.device

    @property
    def tokenizer(self):
        return getattr(self.model, "tokenizer", None)

    def _fingerprint_tensors(self):
        m = self.model
        return [m.W_E, m.blocks[0].attn.W_Q, m.blocks[0].attn.W_O, m.W_U]

    def set_use_attn_result(self, on: bool) -> bool:
        old = bool(self.model.cfg.use_attn_result)
        self.model.set_use_attn_result(on)
        return old

    def set_use_split_qkv_input(self, on: bool) -> bool:
        old = bool(self.model.cfg.use_split_qkv_input)
        if old != bool(on):
            self.model.set_use_split_qkv_input(bool(on))
        return old

    def set_use_hook_mlp_in(self, on: bool) -> bool:
        old = bool(self.model.cfg.use_hook_mlp_in)
        if old != bool(on):
            self.model.set_use_hook_mlp_in(bool(on))
        return old

    def supports_prefix_kv(self) -> bool:
        return supports_prefix_kv(self.model)

    def prefix_kv_cache(self, keys, values, batch: int):
        return prefix_kv_cache(self.model, keys, values, batch)

    def record_kv(self, x, fwd_hooks: Sequence = (), stop_at_layer: int | None = None):
        """The logits of ``x`` under ``fwd_hooks``, and every layer's ``hook_k``/``hook_v`` (what
        TransformerLens' key/value cache holds)."""
        rec: dict[int, list] = {i: [None, None] for i in range(self.n_layers)}

        def keep(i, j):
            def f(act, hook):
                rec[i][j] = act
            return f
        kv = [(f"blocks.{i}.attn.hook_{c}", keep(i, j)) for i in range(self.n_layers) for j, c in enumerate("kv")]
        return self.run_with_hooks(x, list(fwd_hooks) + kv, stop_at_layer=stop_at_layer), rec

    def prefix_kv(self, record, start: int, offset: int, reps: int, stop: int | None = None):
        """A frozen cache for :meth:`run_from` from block ``start`` (to ``stop``, default the last): positions
        ``:offset`` of ``record``, stacked ``reps`` times along the batch."""
        def rep(t):
            return t[:, :offset].repeat(reps, *([1] * (t.ndim - 1)))
        layers = range(start, self.n_layers if stop is None else stop)
        batch = reps * int(record[start][0].shape[0])
        return prefix_kv_cache(self.model, {i: rep(record[i][0]) for i in layers},
                               {i: rep(record[i][1]) for i in layers}, batch)


__all__ = ["HookedBackend", "hooked_classes"]


# --------------------------------------------------------------------------- building and loading (TL 3.x)
def _ht():
    with warnings.catch_warnings():
        # TransformerLens 3.x warns that HookedTransformer is deprecated in favour of the bridge; tvlens
        # supports both (this module is the HookedTransformer side), so the warning is noise here.
        warnings.simplefilter("ignore", DeprecationWarning)
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    return HookedTransformer, HookedTransformerConfig


_REGRESSION_CLS: list[type] = []


def regression_class() -> type:
    """``HookedRegressionTransformer``: a HookedTransformer on continuous inputs ``[batch, pos, d_in]``
    with a scalar read-out. Everything after the read-in is TransformerLens' own (same hook names,
    ``start_at_layer`` and ``stop_at_layer``); the read-out is the unembedding with ``d_vocab_out = 1``."""
    if _REGRESSION_CLS:
        return _REGRESSION_CLS[0]
    HookedTransformer, _ = _ht()
    from tvlens.backends.embed import LinearEmbed

    class HookedRegressionTransformer(HookedTransformer):
        tvlens_continuous = True

        def __init__(self, cfg) -> None:
            super().__init__(cfg)
            self.embed = LinearEmbed(cfg.d_vocab, cfg.d_model)  # d_vocab holds d_in

        def input_to_embed(self, input, prepend_bos=None, padding_side=None, attention_mask=None, past_kv_cache=None):
            embed = self.hook_embed(self.embed(input))
            pos_index = torch.zeros(input.shape[:2], dtype=torch.long, device=embed.device)
            residual, shortformer = self.get_residual(embed, 0, False, None, pos_index, return_shortformer_pos_embed=True)
            return residual, pos_index, shortformer, None

    HookedRegressionTransformer.__module__ = "tvlens.models"
    _REGRESSION_CLS.append(HookedRegressionTransformer)
    return HookedRegressionTransformer


def build_hooked(cfg: dict, continuous: bool, model_name: str = "tvlens"):
    HookedTransformer, HookedTransformerConfig = _ht()
    htc = HookedTransformerConfig(**{**cfg, "default_prepend_bos": False, "model_name": model_name})
    cls = regression_class() if continuous else HookedTransformer
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*HookedTransformer.*deprecated.*", category=DeprecationWarning)
        model = cls(htc)
    if continuous:  # LinearEmbed was created after TransformerLens' seeded init: seed it too
        import math

        g = torch.Generator().manual_seed(int(cfg.get("seed") or 0))
        with torch.no_grad():
            model.embed.W_E.copy_(torch.randn(model.embed.W_E.shape, generator=g) / math.sqrt(int(cfg["d_vocab"])))
    return model


def load_pretrained_hooked(name: str, device, local_folder: bool, **kwargs):
    from pathlib import Path

    HookedTransformer, _ = _ht()
    dm = {k: kwargs.pop(k) for k in ("device_map", "max_memory", "offload_folder") if k in kwargs}
    if dm:
        from tvlens.errors import ConfigError

        raise ConfigError(f"{sorted(dm)}: a HookedTransformer cannot take an accelerate device map; use "
                          "backend='bridge' (TransformerBridge.boot_transformers passes it to accelerate) or n_devices=")
    kwargs.pop("compatibility_mode", None)
    if not local_folder:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            return HookedTransformer.from_pretrained(name, device=device, **kwargs)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(name)
    hf_model = kwargs.pop("hf_model", None) or AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = kwargs.pop("tokenizer", None)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError):
            tokenizer = None
    with _tl_reads_folder(folder) as path:
        return HookedTransformer.from_pretrained(path, hf_model=hf_model, tokenizer=tokenizer, device=device, **kwargs)


@contextlib.contextmanager
def _tl_reads_folder(folder):
    """Make TransformerLens 3.x read a local folder's config.json, for the calls inside this block only.

    - from_pretrained first maps the name to an official one and rejects paths: let existing paths through;
    - TL 3.9 guesses the architecture from the *name* when it holds "llama" or "gemma" (and then reads no
      config: a crash, or Gemma-2 taken for Gemma-1): a neutral link name makes it read config.json;
    - a GPT-2 config saved by transformers 5 has no ``n_ctx`` (TL reads it): map it from ``n_positions``.
    Yields the path to give TransformerLens."""
    import re
    import tempfile
    from pathlib import Path
    from unittest import mock

    import transformer_lens.loading_from_pretrained as loading

    official = loading.get_official_model_name
    auto_config = loading.AutoConfig

    class _MappedAutoConfig:
        @staticmethod
        def from_pretrained(*args, **kw):
            cfg = auto_config.from_pretrained(*args, **kw)
            if getattr(cfg, "model_type", None) == "gpt2" and not hasattr(cfg, "n_ctx") and hasattr(cfg, "n_positions"):
                cfg.n_ctx = cfg.n_positions
            return cfg

    with tempfile.TemporaryDirectory(prefix="tvlens-") as tmp:
        path = str(folder)
        if re.search("llama|gemma", path.lower()):
            link = Path(tmp) / "model"
            link.symlink_to(Path(folder).resolve(), target_is_directory=True)
            path = str(link)
        with warnings.catch_warnings(), mock.patch.object(
            loading, "get_official_model_name", lambda n: n if Path(n).exists() else official(n)
        ), mock.patch.object(loading, "AutoConfig", _MappedAutoConfig):
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield path


def hooked_unsupported(folder) -> str | None:
    """Why TransformerLens' HookedTransformer cannot load the local Hugging Face folder ``folder`` (None when it
    can, or when this TransformerLens has no HookedTransformer to ask). Reads config.json only: cheap, before
    any weights are loaded."""
    if not hooked_classes():
        return None
    import transformer_lens.loading_from_pretrained as loading

    try:
        with _tl_reads_folder(folder) as path:
            loading.convert_hf_model_config(path)
    except NotImplementedError as e:
        return str(e).splitlines()[0][:200] if str(e) else "architecture not supported"
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None  # not an architecture question: loading reports it with its own message
    return None


def hooked_unsupported_architecture(architecture: str) -> str | None:
    """:func:`hooked_unsupported` for a Hugging Face architecture class name (e.g. ``"Gemma3ForCausalLM"``),
    asked through a minimal config.json, before any weights exist."""
    import json
    import tempfile
    from pathlib import Path

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = next((t for t, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if cls == architecture), None)
    if model_type is None or not hooked_classes():
        return None
    with tempfile.TemporaryDirectory(prefix="tvlens-arch-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": model_type}))
        return hooked_unsupported(tmp)


def pretrained_names() -> tuple[set[str], set[str]]:
    """TransformerLens' official model names and their aliases (3.x: loading_from_pretrained; 4.x:
    supported_models)."""
    try:
        from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES, make_model_alias_map

        return set(OFFICIAL_MODEL_NAMES), set(make_model_alias_map())
    except ImportError:
        pass
    try:
        from transformer_lens.supported_models import OFFICIAL_MODEL_NAMES, _model_alias_map

        return set(OFFICIAL_MODEL_NAMES), set(_model_alias_map())
    except ImportError:
        return set(), set()


def fast_unembed(model, x: torch.Tensor) -> torch.Tensor:
    """``model.unembed(x)`` without TransformerLens 3.x's per-call copy of the whole unembedding matrix
    (its ``Unembed.forward`` runs ``F.linear(x, W_U.T.contiguous(), b_U)``: 154 MB copied per call for
    GPT-2's 768 x 50257, which dominated sweeps that unembed a few positions many times). The hooks
    ``unembed.hook_in`` / ``hook_out`` still run; results equal TL's up to float rounding."""
    from transformer_lens.components import Unembed

    u = model.unembed
    if type(u) is not Unembed:  # e.g. the regression read-out: its own forward
        return u(x)
    return u.hook_out(torch.matmul(u.hook_in(x), u.W_U) + u.b_U)


def supports_prefix_kv(model) -> bool:
    """Whether ``prefix_kv_cache`` continues ``model`` exactly: a HookedTransformer with causal attention
    whose cached keys/values are the ``hook_k``/``hook_v`` activations and whose position information
    is in the residual stream (learned positions) or applied after the cache (rotary, with the offset)."""
    cfg = model.cfg
    return (
        bool(hooked_classes()) and isinstance(model, hooked_classes())
        and cfg.attention_dir == "causal"
        and cfg.positional_embedding_type in ("standard", "rotary")
        and getattr(cfg, "clip_qkv", None) is None  # clamped after hook_k
        and cfg.original_architecture not in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")
        and not getattr(cfg, "use_logn_attn", False)
        and not getattr(cfg, "use_dynamic_ntk_rope", False)
        and getattr(cfg, "n_devices", 1) == 1
    )


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
