"""Split q/k/v inputs for a bridge around TransformerLens' own native model (``boot_native``).

TransformerLens' ``set_use_split_qkv_input`` forks the residual per head only in the attention bridges
of Hugging Face models (``JointQKVAttentionBridge``, ``PositionEmbeddingsAttentionBridge``); the plain
``AttentionBridge`` around ``NativeAttention`` (every tvlens checkpoint on a bridge: the shipped models on
TransformerLens 4.x) refuses it, although it already owns the hook points ``hook_q_input`` /
``hook_k_input`` / ``hook_v_input`` and its block already captures the residual before ``ln1``.

This module gives that attention the fork, with TransformerLens' own pieces and the HookedTransformer
semantics: the residual entering the block (before ``ln1``) is repeated per head (``[b, pos, n_heads,
d_model]`` for q, ``[b, pos, n_key_value_heads, d_model]`` for k and v), the hook fires, ``ln1`` is
applied per head, and each head's copy is projected by its own rows of ``W_Q`` / ``W_K`` / ``W_V``
(``AttentionBridge._project_per_head_qkv``). The rest of the attention (rotary, grouped-query repeat,
scale, soft cap, mask, softmax, ``hook_pattern``, output) is ``NativeAttention.forward`` itself, handed
the projections already made. With the flag off nothing is patched: the model runs as booted.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn


class _Given(nn.Module):
    """Stands in for a q/k/v projection for one call: returns the projection already made."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out


def native_attentions(model) -> list[Any] | None:
    """Each block's attention bridge when every one wraps TransformerLens' ``NativeAttention``, else None."""
    try:
        from transformer_lens.model_bridge.sources.native.model import NativeAttention
    except ImportError:  # pragma: no cover - every supported TransformerLens has it
        return None
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return None
    out = []
    for block in blocks:
        attn = block._modules.get("attn")
        orig = getattr(attn, "original_component", None)
        if not isinstance(orig, NativeAttention) or not all(hasattr(attn, n) for n in (
                "hook_q_input", "hook_k_input", "hook_v_input", "_fork_and_norm_per_head", "_project_per_head_qkv")):
            return None
        out.append(attn)
    return out


def _split_forward(attn):
    def forward(self, hidden_states, *args, **kwargs):
        b, s, _ = hidden_states.shape
        H, KV, dh = self.n_heads, self.n_kv_heads, self.d_head
        captured = attn._captured_pre_ln_residual  # the block's residual before ln1 (None: no ln1 to undo)
        src = captured if captured is not None else hidden_states
        proj = {}
        for name, hook, n in (("q", attn.hook_q_input, H), ("k", attn.hook_k_input, KV), ("v", attn.hook_v_input, KV)):
            x = attn._fork_and_norm_per_head(src, hook, n)  # [b, s, n, d_model], ln1 per head
            proj[name] = attn._project_per_head_qkv(getattr(attn, name), x, n, dh).reshape(b, s, n * dh)
        saved = {n: self._modules[n] for n in proj}
        try:
            for n, t in proj.items():
                self._modules[n] = _Given(t)
            return type(self).forward(self, hidden_states, *args, **kwargs)
        finally:
            self._modules.update(saved)
    return forward


def set_native_split_qkv(model, attns: list[Any], on: bool) -> None:
    """Turn the per-head q/k/v input fork on or off on a ``boot_native`` bridge (see the module docstring)."""
    for attn in attns:
        native = attn.original_component
        if on:
            native.forward = types.MethodType(_split_forward(attn), native)
        else:
            native.__dict__.pop("forward", None)
    model.cfg._set_bridge_managed_hook_flag("use_split_qkv_input", bool(on))  # lets hooks attach there
    model._propagate_attention_flag("use_split_qkv_input", bool(on))


__all__ = ["native_attentions", "set_native_split_qkv"]
