"""The one seam between tvlens and a TransformerLens model class.

Analyses never touch a model class: they ask :func:`tvlens.backends.get_backend` for a :class:`Backend`
and use only what it offers. Hook names are always the *canonical* TransformerLens names
(``blocks.{l}.hook_resid_pre``, ``blocks.{l}.attn.hook_z``, ``ln_final.hook_scale``, ...); a backend
maps them to its own spelling and never lets the spelling reach a caller (a TransformerBridge reports
``blocks.0.hook_in`` as ``hook.name`` inside a hook registered as ``blocks.0.hook_resid_pre``, so tvlens
hooks never read ``hook.name``: they close over the canonical name).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float

Hook = Callable[..., Any]  # (activation, hook) -> activation or None


@runtime_checkable
class Backend(Protocol):
    """What tvlens analyses need from a model (one implementation per model class)."""

    model: Any
    kind: str  # "hooked" (HookedTransformer) or "bridge" (TransformerBridge)
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_vocab: int  # the input vocabulary (d_in for a continuous model)
    d_vocab_out: int
    n_ctx: int
    continuous: bool
    positional_embedding_type: str
    n_key_value_heads: int | None

    # --- hooks ---------------------------------------------------------------------------------
    def hook_name(self, canonical: str) -> str:
        """The backend's spelling of a canonical hook name; ``HookError`` if it cannot fire it."""

    def hooks(self, fwd_hooks: Sequence[tuple[str, Hook]] = (), bwd_hooks: Sequence[tuple[str, Hook]] = ()
              ) -> AbstractContextManager:
        """A context in which the hooks (canonical names) are attached."""

    def run_with_hooks(self, x: torch.Tensor, fwd_hooks: Sequence[tuple[str, Hook]] = (),
                       stop_at_layer: int | None = None) -> torch.Tensor:
        """Run on inputs ``x``; the logits, or (``stop_at_layer=l < n_layers``) the residual entering block l."""

    def capture(self, x: torch.Tensor, names: Iterable[str], stop_at_layer: int | None = None,
                select: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Activations at canonical ``names`` (``select(name, act)`` keeps a slice), running only as
        far as needed (``stop_at_layer``)."""

    def prefer_fast_attention(self) -> AbstractContextManager:
        """A context in which residual-only passes may use the fastest exact attention (bridge: SDPA)."""

    # --- running parts of the model ------------------------------------------------------------
    def embed_input(self, x: torch.Tensor) -> Float[torch.Tensor, "batch pos d_model"]:
        """The residual stream entering block 0 (``blocks.0.hook_resid_pre``) for inputs ``x``."""

    def run_from(self, resid: Float[torch.Tensor, "batch pos d_model"], start: int, stop: int | None = None,
                 past_kv: Any = None) -> Float[torch.Tensor, "batch pos d_model"]:
        """Run blocks ``start..stop-1`` (default: to the end) on ``resid`` (the residual entering block
        ``start``) and return the residual after them (before the final norm). Hooks in a ``hooks()``
        context fire. ``past_kv``: a prefix cache from :meth:`prefix_kv`; ``resid`` then holds the positions after it."""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output for inputs ``x`` (token ids, or float vectors for a regression model)."""

    def final_resid(self, x: torch.Tensor) -> Float[torch.Tensor, "batch pos d_model"]:
        """The final residual stream (after the last block, before the final norm) for inputs ``x``."""

    def unembed(self, resid: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_vocab_out"]:
        """Final norm then unembedding of selected positions of the final residual."""

    def ln_final(self, resid: torch.Tensor) -> torch.Tensor:
        """The final norm alone (identity where the model has none)."""

    # --- weights and placement -----------------------------------------------------------------
    @property
    def W_O(self) -> Float[torch.Tensor, "layer head d_head d_model"]: ...

    @property
    def W_U(self) -> Float[torch.Tensor, "d_model d_vocab_out"]: ...

    @property
    def ln_final_weight(self) -> torch.Tensor | None: ...

    def block_device(self, layer: int) -> torch.device: ...

    @property
    def input_device(self) -> torch.device: ...

    @property
    def tokenizer(self) -> Any: ...

    def fingerprint_fields(self) -> tuple: ...

    def set_use_attn_result(self, on: bool) -> bool:
        """Turn per-head ``attn.hook_result`` on or off; returns the previous setting."""

    def set_use_split_qkv_input(self, on: bool) -> bool:
        """Turn the per-head residual inputs ``attn.hook_q_input/k_input/v_input`` ``[b, pos, head, d_model]``
        on or off (edges into a head's query, key or value); returns the previous setting."""

    def set_use_hook_mlp_in(self, on: bool) -> bool:
        """Turn ``blocks.{l}.hook_mlp_in`` (the MLP's residual input) on or off; returns the previous setting."""

    def supports_prefix_kv(self) -> bool:
        """Whether :meth:`run_from` continues exactly from a prefix cache (:meth:`prefix_kv`)."""

    def record_kv(self, x: torch.Tensor, fwd_hooks: Sequence[tuple[str, Hook]] = (),
                  stop_at_layer: int | None = None) -> tuple[torch.Tensor, Any]:
        """The logits of ``x`` under ``fwd_hooks`` (with ``stop_at_layer``: what ``run_with_hooks`` returns
        then, e.g. the final residual for ``n_layers``), and a record of every layer's cached keys and values."""

    def prefix_kv(self, record: Any, start: int, offset: int, reps: int, stop: int | None = None) -> Any:
        """A prefix cache for ``run_from(resid[:, offset:], start, stop, past_kv=...)``: positions ``:offset`` of a
        :meth:`record_kv` record, stacked ``reps`` times along the batch, for blocks ``start..stop-1`` (default:
        to the last)."""

    def prefix_kv_cache(self, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor], batch: int) -> Any: ...


def resid_name(layer: int) -> str:
    """The canonical hook of the representation at layer ``layer`` (0 = embedding, l > 0 = after block l-1)."""
    return "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"


def layer_of(name: str) -> int | None:
    """The block index of a canonical ``blocks.{l}.`` hook name (None for others)."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None


__all__ = ["Backend", "Hook", "layer_of", "resid_name"]
