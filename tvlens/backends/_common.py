"""What both backends share: capturing activations by canonical name, the fingerprint."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch

from tvlens.backends.protocol import layer_of


class CommonBackend:
    """Shared implementation; subclasses set the model-specific parts."""

    model: object
    kind: str
    _prefer_sdpa = False

    @contextmanager
    def prefer_fast_attention(self):
        """Within the context, forward passes that read only the residual stream may run the fastest
        attention the model class offers (a bridge: Hugging Face's SDPA where exact, see
        ``BridgeBackend.fast_attention``; a HookedTransformer: its own). Equal up to float rounding, so
        analyses that compare such a pass with a block replay (``run_from``) leave it off."""
        old = self._prefer_sdpa
        self._prefer_sdpa = True
        try:
            yield self
        finally:
            self._prefer_sdpa = old

    def _read_shape(self, model) -> None:
        """The model and its shape, read once from its config (the same fields on both classes)."""
        self.model = model
        cfg = model.cfg
        self.n_layers, self.n_heads = int(cfg.n_layers), int(cfg.n_heads)
        self.d_model, self.d_head, self.n_ctx = int(cfg.d_model), int(cfg.d_head), int(cfg.n_ctx)
        self.d_vocab = int(cfg.d_vocab)
        self.d_vocab_out = int(getattr(cfg, "d_vocab_out", None) or cfg.d_vocab)  # a bridge's config may lack it
        self.positional_embedding_type = str(getattr(cfg, "positional_embedding_type", None) or "standard")
        self.n_key_value_heads = getattr(cfg, "n_key_value_heads", None)

    def capture(self, x: torch.Tensor, names: Iterable[str], stop_at_layer: int | None = None,
                select: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        names = list(dict.fromkeys(names))
        store: dict[str, torch.Tensor] = {}

        def make(n: str):
            def keep(act, hook):
                store[n] = select(n, act) if select is not None else act
            return keep

        if stop_at_layer is None:  # run only as far as the deepest hook needs
            deepest = max((layer_of(n) if layer_of(n) is not None else self.n_layers for n in names), default=0)
            stop_at_layer = deepest + 1 if deepest < self.n_layers else None
        self.run_with_hooks(x, fwd_hooks=[(n, make(n)) for n in names], stop_at_layer=stop_at_layer)
        missing = [n for n in names if n not in store]
        if missing:
            from tvlens.errors import HookError

            raise HookError(f"hooks {missing} did not fire on this {self.kind} model's forward pass")
        return store

    def attention_pattern(self, resid: torch.Tensor, layer: int, fwd_hooks=()) -> torch.Tensor:
        """Block ``layer``'s attention pattern ``[batch, head, query, key]`` for the residual ``resid`` entering
        it, under ``fwd_hooks`` (canonical names in that block, e.g. replacing ``attn.hook_k``); the block stops
        at its pattern (no value mixing, output projection or MLP is computed)."""
        store: dict[str, torch.Tensor] = {}

        def stop(act, hook):
            store["p"] = act
            raise _StopBlock

        try:
            with self.hooks(fwd_hooks=list(fwd_hooks) + [(f"blocks.{layer}.attn.hook_pattern", stop)]):
                self.run_from(resid, layer, layer + 1)
        except _StopBlock:
            pass
        if "p" not in store:
            from tvlens.errors import HookError

            raise HookError(f"blocks.{layer}.attn.hook_pattern did not fire on this {self.kind} model")
        return store["p"]

    def final_resid(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_from(self.embed_input(x), 0)

    def supports_shared_attention(self) -> bool:
        """Whether a block's attention may run once for identical copies of its input, ``z`` expanded to every
        copy at ``attn.hook_z`` (``tvlens.backends.shared``; checked once per model)."""
        if "_shared_ok" not in self.__dict__:
            from tvlens.backends.shared import self_test

            self._shared_ok = self_test(self)
        return self._shared_ok

    def attention_once(self, layer: int, n_rows: int, rows: int):
        """A context in which block ``layer``'s attention computes the first ``rows`` of its ``n_rows`` rows
        only (see :meth:`supports_shared_attention`)."""
        from tvlens.backends.shared import attention_once

        return attention_once(self.model.blocks[layer].attn, n_rows, rows)

    def fast_kernels(self):
        """A context in which the model computes with fused kernels where they equal its own step-by-step
        ones up to float rounding (GPT-2's tanh GELU: ``tvlens.backends.kernels``); the model is unchanged
        after. A whole tvlens call runs inside it, so every run it compares uses the same kernels."""
        from tvlens.backends.kernels import fused_gelu

        return fused_gelu(self.model)

    @contextmanager
    def last_block_reads(self, positions):
        """Within the context, the last block's MLP runs only at ``positions`` (the positions that will be
        read after it: a list shared by every row, or a tensor ``[rows]`` / ``[rows, n]``; see
        ``tvlens.backends.narrow``) and the last block's output is NaN at every other position. A no-op
        where that is not exact or not possible: ``positions`` None, a model without an MLP module in its
        blocks, a model in training mode, or any hook attached inside the last MLP (checked on entry, so
        enter it inside the caller's ``hooks`` context)."""
        from tvlens.backends.narrow import mlp_is_narrowable, mlp_only_at

        mlp = getattr(self.model.blocks[self.n_layers - 1], "mlp", None)
        if positions is None or not mlp_is_narrowable(mlp) or getattr(self.model, "training", False):
            yield False
            return
        with mlp_only_at(mlp, positions):
            yield True

    def fingerprint(self) -> str:
        """A short hash of the model's shape and a sample of its weights in canonical form: which
        residual space vectors live in. The same weights held as a HookedTransformer and as a raw
        TransformerBridge give the same fingerprint; a processed copy (folded LayerNorm, centred weights,
        a bridge in compatibility mode) gives another."""
        h = hashlib.sha256()
        h.update(repr((self.d_model, self.n_layers, self.d_vocab)).encode())
        if getattr(self.model, "_weights_processed", False):  # a bridge after enable_compatibility_mode()
            h.update(b"processed")
        for t in self._fingerprint_tensors():
            h.update(t.detach().flatten()[:4096].float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def call_cost_tokens(self) -> float:
        """A block call's fixed cost (reading its weights, Python and kernel launches) in tokens' worth of
        compute: how many more positions a merged call may compute before two calls are cheaper. Measured
        on a GPT-2-small-shaped block on one CPU thread (~30); an accelerator runs many more tokens in the
        time a call's overhead takes."""
        return 32.0 if self.input_device.type == "cpu" else 512.0

    def block_device(self, layer: int) -> torch.device:
        for p in self.model.blocks[layer].parameters():
            return p.device
        return self.input_device


class _StopBlock(Exception):
    """Raised inside a hook to end a block's forward early (caught by the backend that raised it)."""


def hook_error(name: str, kind: str, known: Iterable[str]):
    from tvlens.errors import HookError

    near = sorted(k for k in known if k.split(".")[-1] == name.split(".")[-1])[:4]
    return HookError(f"this {kind} model cannot fire hook {name!r}" + (f" (it has e.g. {near})" if near else "")
                     + "; use a canonical TransformerLens hook name such as 'blocks.0.hook_resid_pre'")


__all__ = ["CommonBackend", "hook_error"]
