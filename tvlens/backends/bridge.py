"""The TransformerBridge side of the seam (TransformerLens 3.9+ and 4.x).

What differs from a HookedTransformer, and how this module hides it (measured, see
``shared/notes/transformerlens-bridge.md``):

- inside a hook, ``hook.name`` is the bridge's own spelling (``blocks.0.hook_in``); tvlens hooks never
  read it, and ``hook_name`` checks that the canonical alias exists;
- ``stop_at_layer=n_layers`` returns logits, not the final residual: :meth:`final_resid` (and
  ``run_with_hooks(stop_at_layer=n_layers)``) stop the forward pass with a hook on the last block's
  ``hook_resid_post`` that raises TransformerLens' ``StopAtLayerException``, so the final norm and the
  unembedding never run (no ``[batch, pos, d_vocab]`` tensor, no per-shape recording pass);
- ``start_at_layer`` is missing (3.9) or still runs the early blocks (4.x), and ``past_kv_cache`` is
  ignored: :meth:`run_from` calls the bridge's blocks directly, with the keyword arguments the
  Hugging Face model passes them (attention mask, positions, rotary tables) recorded once per input
  shape on a hook-free forward pass (stopped before the last block), so only blocks ``start..`` run and their hooks fire as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tvlens.backends._common import CommonBackend, hook_error


def bridge_classes() -> tuple[type, ...]:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # pragma: no cover - every supported TransformerLens has it
        return ()
    return (TransformerBridge,)


def _is_cache(v: Any) -> bool:
    return type(v).__name__.endswith("Cache") and not torch.is_tensor(v)


class BridgeBackend(CommonBackend):
    kind = "bridge"

    def __init__(self, model) -> None:
        self._read_shape(model)
        from tvlens.backends.embed import read_in_of

        self._read_in = read_in_of(model)
        self.continuous = self._read_in is not None
        self.softcap = float(getattr(model.cfg, "output_logits_soft_cap", 0.0) or 0.0)
        self._block_calls: dict[tuple, list[tuple[tuple, dict]]] = {}

    @property
    def mode(self) -> str:
        """``"compat"`` after ``enable_compatibility_mode()``, else ``"raw"`` (Hugging Face's own weights)."""
        return "compat" if getattr(self.model, "compatibility_mode", False) else "raw"

    # hooks
    def hook_name(self, canonical: str) -> str:
        if canonical not in self.model.hook_dict:
            raise hook_error(canonical, f"TransformerBridge ({self.mode} mode)", self.model.hook_dict)
        return canonical

    def hooks(self, fwd_hooks: Sequence = (), bwd_hooks: Sequence = ()):
        for n, _ in list(fwd_hooks) + list(bwd_hooks):
            self.hook_name(n)
        return self.model.hooks(fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks))

    def _input(self, x):
        return x  # a continuous model's read-in runs inside the native model's forward (loading.build_native_bridge)

    def logits(self, x):
        return self.model(self._input(x))

    def run_with_hooks(self, x, fwd_hooks: Sequence = (), stop_at_layer: int | None = None):
        for n, _ in fwd_hooks:
            self.hook_name(n)
        if stop_at_layer is not None and stop_at_layer >= self.n_layers:  # the bridge would return logits
            return self._run_blocks(x, fwd_hooks)
        with self.model.hooks(fwd_hooks=list(fwd_hooks)):
            return self.model(self._input(x), stop_at_layer=stop_at_layer)

    def _run_blocks(self, x, fwd_hooks: Sequence = ()) -> torch.Tensor:
        """The residual after the last block, the forward pass stopped there: the final norm and the
        unembedding (a ``[batch, pos, d_vocab]`` tensor: 15 GB for Gemma-3's 262k vocabulary at 105 x 136
        tokens) never run. The caller's hooks fire first; a hook on the last block's output then raises
        TransformerLens' own ``StopAtLayerException``, which the bridge's forward catches and returns."""
        from transformer_lens.model_bridge.exceptions import StopAtLayerException

        def stop(act, hook):
            raise StopAtLayerException(act)

        hooks = list(fwd_hooks) + [(f"blocks.{self.n_layers - 1}.hook_resid_post", stop)]
        with self.model.hooks(fwd_hooks=hooks):
            out = self.model(self._input(x))
        if not torch.is_tensor(out) or out.shape[-1] != self.d_model:  # pragma: no cover - a TL that swallows it
            from tvlens.errors import HookError

            raise HookError("this TransformerBridge did not stop after its last block (its forward returned "
                            f"{type(out).__name__}): tvlens cannot read the final residual stream")
        return out

    # running parts
    def embed_input(self, x):
        return self.model(self._input(x), stop_at_layer=0)

    def final_resid(self, x):
        return self._run_blocks(x)  # one forward pass that stops after the blocks: no per-shape recording

    def _calls(self, resid: torch.Tensor) -> list[tuple[tuple, dict]]:
        """Each block's call arguments for inputs of ``resid``'s batch and length, recorded once on a
        forward pass with every hook detached (so a caller's hooks never see it)."""
        key = (tuple(resid.shape[:2]), str(resid.device), resid.dtype)
        if key not in self._block_calls:
            calls: list[Any] = [None] * self.n_layers
            handles = []
            from transformer_lens.model_bridge.exceptions import StopAtLayerException

            last = self.n_layers - 1
            for i, block in enumerate(self.model.blocks):
                def pre(mod, args, kwargs, _i=i):
                    calls[_i] = (tuple(None if _is_cache(a) else a for a in args[1:]),
                                 {k: (None if _is_cache(v) else v) for k, v in kwargs.items()})
                    if _i == last:  # every call is recorded: the last block, norm and unembedding never run
                        raise StopAtLayerException(args[0] if args else None)
                handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            saved = [(hp, dict(hp._forward_hooks), dict(hp._backward_hooks)) for hp in self.model.hook_dict.values()]
            try:
                for hp, _, _ in saved:
                    hp._forward_hooks.clear()
                    hp._backward_hooks.clear()
                dummy = (torch.zeros(*resid.shape[:2], self.d_vocab, dtype=resid.dtype, device=self.input_device)
                         if self.continuous else torch.zeros(resid.shape[:2], dtype=torch.long, device=self.input_device))
                with torch.no_grad():
                    self.model(self._input(dummy))
            finally:
                for hp, f, b in saved:
                    hp._forward_hooks.update(f)
                    hp._backward_hooks.update(b)
                for h in handles:
                    h.remove()
            for c in calls:
                if c is not None and "use_cache" in c[1]:
                    c[1]["use_cache"] = False
            if len(self._block_calls) > 16:
                self._block_calls.clear()
            self._block_calls[key] = calls
        return self._block_calls[key]

    def run_from(self, resid, start: int, stop: int | None = None, past_kv=None):
        if past_kv is not None:
            from tvlens.errors import ConfigError

            raise ConfigError("a TransformerBridge cannot continue from a prefix key/value cache (TransformerLens "
                              "ignores past_kv_cache on a bridge): use skip_prefix=None")
        stop = self.n_layers if stop is None else stop
        calls = self._calls(resid)
        h = resid
        for i in range(start, stop):
            args, kwargs = calls[i]
            out = self.model.blocks[i](h, *args, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def ln_final(self, resid):
        ln = getattr(self.model, "ln_final", None)
        return ln(resid) if ln is not None else resid

    def unembed(self, resid):
        logits = self.model.unembed(self.ln_final(resid))
        if self.softcap > 0:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

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
        w = getattr(getattr(ln, "original_component", None), "weight", None)
        if w is not None and "Gemma" in type(ln.original_component).__name__:
            w = 1.0 + w  # Gemma's RMSNorm scales by (1 + weight)
        return w

    @property
    def input_device(self) -> torch.device:
        for p in self.model.parameters():
            if p.device.type != "meta":
                return p.device
        return torch.device("cpu")

    @property
    def tokenizer(self):
        return getattr(self.model, "tokenizer", None)

    def _fingerprint_tensors(self):
        m = self.model
        attn = m.blocks[0].attn  # block 0 alone: later blocks may be offloaded (meta tensors until they run)
        return [m.W_E, attn.W_Q, attn.W_O, m.W_U]

    def set_use_attn_result(self, on: bool) -> bool:
        old = bool(getattr(self.model.cfg, "use_attn_result", False))
        self.model.set_use_attn_result(on)
        return old

    def set_use_split_qkv_input(self, on: bool) -> bool:
        old = bool(getattr(self.model.cfg, "use_split_qkv_input", False))
        if old != bool(on):
            from tvlens.backends.native_qkv import native_attentions, set_native_split_qkv

            native = native_attentions(self.model)  # boot_native: TransformerLens refuses, tvlens forks it
            try:
                if native is not None:
                    set_native_split_qkv(self.model, native, bool(on))
                else:
                    self.model.set_use_split_qkv_input(bool(on))
            except NotImplementedError as e:
                from tvlens.errors import UnsupportedModelError

                raise UnsupportedModelError(
                    "this bridge's attention has no hook before its q/k/v projections (TransformerLens: "
                    f"{str(e).splitlines()[0][:200]}), so edges into q, k and v cannot be patched: use a "
                    "HookedTransformer (TL 3.x) or a bridge booted from Hugging Face (boot_transformers), or "
                    "node methods (head_attribution)") from e
        return old

    def set_use_hook_mlp_in(self, on: bool) -> bool:
        old = bool(getattr(self.model.cfg, "use_hook_mlp_in", False))
        if old != bool(on):
            self.model.set_use_hook_mlp_in(bool(on))
        return old

    def supports_prefix_kv(self) -> bool:
        return False

    def prefix_kv_cache(self, keys, values, batch: int):
        from tvlens.errors import ConfigError

        raise ConfigError("a TransformerBridge cannot continue from a prefix key/value cache")


__all__ = ["BridgeBackend", "bridge_classes"]
