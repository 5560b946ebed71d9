"""The HookedTransformer side of the seam (TransformerLens 3.x)."""

from __future__ import annotations

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
        self.model = model
        cfg = model.cfg
        self.n_layers = int(cfg.n_layers)
        self.n_heads = int(cfg.n_heads)
        self.d_model = int(cfg.d_model)
        self.d_head = int(cfg.d_head)
        self.d_vocab = int(cfg.d_vocab)
        self.d_vocab_out = int(cfg.d_vocab_out)
        self.n_ctx = int(cfg.n_ctx)
        self.positional_embedding_type = str(cfg.positional_embedding_type)
        self.n_key_value_heads = getattr(cfg, "n_key_value_heads", None)
        from tvlens.models import is_continuous

        self.continuous = is_continuous(model)

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
        from tvlens.models import unembed

        return unembed(self.model, self.ln_final(resid))

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
        return [m.embed.W_E, m.blocks[0].attn.W_Q, m.blocks[0].attn.W_O, m.W_U]

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
        from tvlens.models import supports_prefix_kv

        return supports_prefix_kv(self.model)

    def prefix_kv_cache(self, keys, values, batch: int):
        from tvlens.models import prefix_kv_cache

        return prefix_kv_cache(self.model, keys, values, batch)


__all__ = ["HookedBackend", "hooked_classes"]
