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
  length on a one-row, hook-free forward pass (stopped before the last block), so only blocks ``start..``
  run and their hooks fire as usual;
- a prefix of positions is continued through the bridge attention's own ``past_key_values.update``
  (``tvlens.backends.prefix``: :meth:`record_kv`, :meth:`prefix_kv`, ``run_from(past_kv=...)``), checked
  once per model by a self-test, so sweeps compute only the positions from the patched one on.
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
        self._prefix_ok: bool | None = None

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
        with self.model.hooks(fwd_hooks=list(fwd_hooks)), self._attention(fwd_hooks):
            return self.model(self._input(x), stop_at_layer=stop_at_layer)

    # attention: the Hugging Face module with SDPA when no attention hook can fire
    def _attention(self, fwd_hooks: Sequence = ()):
        from contextlib import nullcontext

        return self.fast_attention(fwd_hooks) if self._prefer_sdpa else nullcontext()

    def fast_attention(self, fwd_hooks: Sequence = ()):
        """A context in which each block's attention runs as the Hugging Face module itself with PyTorch's
        scaled-dot-product attention, instead of the bridge's step-by-step re-implementation (which
        materializes scores and pattern to fire ``hook_attn_scores`` / ``hook_pattern``), when that is
        exact: a raw-mode bridge in eval mode whose attention bridges wrap the Hugging Face projections
        themselves (no copied weights: not GPT-2's split ``c_attn``), no logit soft-capping (SDPA has
        none), nothing offloaded, and no hook attached or requested inside any attention (``fwd_hooks``:
        canonical names), no module hook on an attention bridge. Otherwise a no-op. Same numbers up to
        float rounding (tests/test_fast_paths.py)."""
        from contextlib import nullcontext

        plan = self._sdpa_plan()
        if plan is None or self.model.training or self.mode != "raw":
            return nullcontext()
        swaps, configs, watched = plan
        if any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in watched):
            return nullcontext()  # a hook point fires, or a module hook expects the bridge's attention call
        ids = {id(m) for m in watched}
        if any(id(self.model.hook_dict.get(n)) in ids for n, _ in fwd_hooks):
            return nullcontext()
        return _swapped_attention(swaps, configs)

    def _sdpa_plan(self):
        """``(swaps, configs, watched modules)`` where SDPA is exact for this model, else None (cached);
        the watched modules are the bridge's own inside each attention (hook points, the bridge itself):
        a hook on any of them keeps the bridge's attention."""
        if "_sdpa" not in self.__dict__:
            self._sdpa = _sdpa_plan(self.model)
        return self._sdpa

    def _run_blocks(self, x, fwd_hooks: Sequence = ()) -> torch.Tensor:
        """The residual after the last block, the forward pass stopped there: the final norm and the
        unembedding (a ``[batch, pos, d_vocab]`` tensor: 15 GB for Gemma-3's 262k vocabulary at 105 x 136
        tokens) never run. The caller's hooks fire first; a hook on the last block's output then raises
        TransformerLens' own ``StopAtLayerException``, which the bridge's forward catches and returns."""
        from transformer_lens.model_bridge.exceptions import StopAtLayerException

        def stop(act, hook):
            raise StopAtLayerException(act)

        hooks = list(fwd_hooks) + [(f"blocks.{self.n_layers - 1}.hook_resid_post", stop)]
        with self.model.hooks(fwd_hooks=hooks), self._attention(fwd_hooks):
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
        """Each block's call arguments for inputs of ``resid``'s length, recorded once per length on a
        one-row forward pass with every hook detached (so a caller's hooks never see it). The recorded
        tensors (attention masks, rotary tables, position ids) have batch 1 and broadcast over any batch."""
        key = (int(resid.shape[1]), str(resid.device), resid.dtype)
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
                n = int(resid.shape[1])
                dummy = (torch.zeros(1, n, self.d_vocab, dtype=resid.dtype, device=self.input_device)
                         if self.continuous else torch.zeros((1, n), dtype=torch.long, device=self.input_device))
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
            if len(self._block_calls) > 64:
                self._block_calls.clear()
            self._block_calls[key] = calls
        return self._block_calls[key]

    def _prefix_calls(self, resid: torch.Tensor, offset: int) -> list[tuple[tuple, dict]]:
        """The recorded calls of the full length, cut to the positions ``offset..`` that ``resid`` holds."""
        from tvlens.backends.prefix import slice_call

        seq = offset + int(resid.shape[1])
        key = ("prefix", seq, offset, str(resid.device), resid.dtype)
        if key not in self._block_calls:
            full = self._calls(resid.new_zeros(1, seq, 1))
            cut = [slice_call(c, self._arg_names(i), offset, seq) for i, c in enumerate(full)]
            if any(c is None for c in cut):
                from tvlens.errors import UnsupportedModelError

                raise UnsupportedModelError("this bridge's blocks take per-position arguments tvlens cannot cut "
                                            "to a suffix of positions: use skip_prefix=None")
            self._block_calls[key] = cut
        return self._block_calls[key]

    def _arg_names(self, i: int) -> list[str]:
        import inspect

        block = self.model.blocks[i]
        fn = getattr(block.original_component, "forward", block.forward)
        return list(inspect.signature(fn).parameters)[1:]

    def run_from(self, resid, start: int, stop: int | None = None, past_kv=None):
        import contextlib

        stop = self.n_layers if stop is None else stop
        if past_kv is None:
            calls, ctx = self._calls(resid), contextlib.nullcontext()
        else:
            from tvlens.backends.prefix import PrefixKVCache, cache_into_attention

            if not isinstance(past_kv, PrefixKVCache):
                from tvlens.errors import ConfigError

                raise ConfigError(f"past_kv must come from this backend's prefix_kv(), got {type(past_kv).__name__}")
            calls = self._prefix_calls(resid, past_kv.offset)
            ctx = cache_into_attention(self.model.blocks, past_kv, range(start, stop))
        h = resid
        with ctx:
            for i in range(start, stop):
                args, kwargs = calls[i]
                out = self.model.blocks[i](h, *args, **kwargs)
                h = out[0] if isinstance(out, tuple) else out
        return h

    # continuing from a prefix of positions (tvlens.backends.prefix)
    def supports_prefix_kv(self) -> bool:
        if self._prefix_ok is None:
            from tvlens.backends.prefix import self_test

            self._prefix_ok = self_test(self)
        return self._prefix_ok

    def record_kv(self, x, fwd_hooks: Sequence = (), stop_at_layer: int | None = None):
        """The logits of ``x`` under ``fwd_hooks``, and every layer's keys and values as attention used them."""
        from tvlens.backends.prefix import KVRecordCache, cache_into_attention

        rec = KVRecordCache()
        with cache_into_attention(self.model.blocks, rec):
            logits = self.run_with_hooks(x, fwd_hooks, stop_at_layer=stop_at_layer)
        return logits, rec

    def prefix_kv(self, record, start: int, offset: int, reps: int, stop: int | None = None):
        """A cache for :meth:`run_from` from block ``start``: positions ``:offset`` of ``record`` (views of every
        layer's; stacked along the batch as each layer's call needs, so ``reps`` and ``stop`` cost nothing)."""
        from tvlens.backends.prefix import PrefixKVCache

        return PrefixKVCache(record, offset)

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

    def prefix_kv_cache(self, keys, values, batch: int):
        from tvlens.errors import ConfigError

        raise ConfigError("a TransformerBridge continues from a prefix through record_kv()/prefix_kv(), not from "
                          "hook_k/hook_v activations (its cache holds keys after the rotary embedding)")


def _sdpa_plan(model):
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:  # pragma: no cover - transformers without the attention registry
        return None
    hf = getattr(model, "original_model", None)
    if hf is None or not getattr(hf, "_supports_sdpa", False) or "sdpa" not in ALL_ATTENTION_FUNCTIONS:
        return None
    swaps, configs, watched = [], {}, []
    for block in model.blocks:
        attn, layer = getattr(block, "attn", None), getattr(block, "original_component", None)
        orig = getattr(attn, "original_component", None)
        cfg = getattr(orig, "config", None)
        if orig is None or layer is None or not hasattr(cfg, "_attn_implementation"):
            return None
        if getattr(cfg, "attn_logit_softcapping", None):
            return None  # Gemma-2: SDPA has no soft-capping
        if {id(p) for p in attn.parameters()} != {id(p) for p in orig.parameters()}:
            return None  # the bridge computes with weights of its own (e.g. GPT-2's split c_attn)
        if any(p.device.type == "meta" for p in orig.parameters()):
            return None  # offloaded: the bridge's call materializes the weights
        name = next((n for n, c in layer.named_children() if c is attn), None)
        if name is None:
            return None
        swaps.append((layer, name, attn, orig))
        configs[id(cfg)] = cfg
        own = {id(m) for m in orig.modules()}
        watched += [m for m in attn.modules() if id(m) not in own]  # the bridge's: its hook points, itself
    configs[id(hf.config)] = hf.config
    return swaps, list(configs.values()), watched


class _swapped_attention:
    def __init__(self, swaps, configs) -> None:
        self.swaps, self.configs, self.old = swaps, configs, []

    def __enter__(self):
        self.old = [(c, c._attn_implementation) for c in self.configs]
        try:
            for layer, name, _, orig in self.swaps:
                layer._modules[name] = orig
            for c in self.configs:
                c._attn_implementation = "sdpa"
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for layer, name, attn, _ in self.swaps:
            layer._modules[name] = attn
        for c, impl in self.old:
            c._attn_implementation = impl


__all__ = ["BridgeBackend", "bridge_classes"]
