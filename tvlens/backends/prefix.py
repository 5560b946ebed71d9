"""Continuing a TransformerBridge from a prefix of positions: the key/value cache a bridge can use.

A patch at position ``p`` leaves every earlier position as in the unpatched run (causal attention), so
a patched run need compute only positions ``o..`` (``o <= p``), attending to the unpatched run's keys
and values of positions ``< o``. TransformerLens' ``past_kv_cache`` is ignored by a bridge, and under
transformers 5 a Hugging Face block passes its cache to attention as ``cache=``, which the bridge's
attention does not read (it reads ``past_key_values``). The bridge's own attention (the
reconstructed attention of ``JointQKVAttentionBridge`` / ``PositionEmbeddingsAttentionBridge``) does
call ``past_key_values.update(k, v, layer_idx)`` after its projections and rotary embedding, so:

- :class:`KVRecordCache` is handed to every block's attention (a forward pre-hook adds the keyword) on
  the unpatched run and keeps each layer's keys and values exactly as attention uses them;
- :class:`PrefixKVCache` hands them back on a patched run (the first ``o`` positions, stacked ``reps``
  times along the batch) and joins them to the new positions' keys and values;
- :func:`slice_call` cuts a block's recorded call arguments (attention mask rows, rotary tables,
  position ids) to the computed positions.

Whether a model continues exactly is checked once per model by running a short input both ways
(:func:`self_test`): an architecture whose attention does not go through ``update`` is refused, never
silently wrong.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


class KVRecordCache:
    """Duck-typed cache (the name ends in ``Cache`` so a recorded block call drops it) that keeps the
    keys and values every attention layer passes to ``update`` and returns them unchanged."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, k, v, layer_idx, *args, **kwargs):
        self.layers[int(layer_idx)] = (k.detach(), v.detach())
        return k, v


class PrefixKVCache:
    """Keys and values of positions ``:offset`` of the recorded run (``[batch, heads, pos, d_head]``), joined
    before each layer's new keys/values, repeated along the batch to match the batch each layer is given (a
    sweep's stacked copies, or one copy where the attention is shared: ``tvlens.backends.shared``)."""

    def __init__(self, record: KVRecordCache, offset: int) -> None:
        self.offset = int(offset)
        self._kv = {i: (k[:, :, :offset], v[:, :, :offset]) for i, (k, v) in record.layers.items()}

    def update(self, k, v, layer_idx, *args, **kwargs):
        pk, pv = self._kv[int(layer_idx)]
        reps = int(k.shape[0]) // int(pk.shape[0])
        if reps > 1:
            pk, pv = pk.repeat(reps, 1, 1, 1), pv.repeat(reps, 1, 1, 1)
        return torch.cat([pk.to(k.dtype), k], dim=-2), torch.cat([pv.to(v.dtype), v], dim=-2)


@contextlib.contextmanager
def cache_into_attention(blocks, cache, layers=None):
    """Within the context, every attention module of ``blocks`` (indices ``layers``, default all) is
    called with ``past_key_values=cache``."""
    def pre(mod, args, kwargs):
        kwargs = dict(kwargs)
        kwargs["past_key_values"] = cache
        kwargs.pop("layer_past", None)
        return args, kwargs

    idx = range(len(blocks)) if layers is None else layers
    handles = [blocks[i].attn.register_forward_pre_hook(pre, with_kwargs=True) for i in idx]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# keyword -> how its tensors are cut to positions o.. (the axis holding positions)
_POSITIONAL_KWARGS = {"attention_mask": "rows", "position_embeddings": -2, "position_ids": -1,
                      "cache_position": -1}


def _cut(v: Any, how, o: int, seq: int):
    if v is None:
        return v
    if isinstance(v, tuple):
        return tuple(_cut(t, how, o, seq) for t in v)
    if not torch.is_tensor(v):
        return v
    if how == "rows":  # an additive/boolean mask [..., query, key]: keep every key, the queries o..
        return v[..., o:, :] if v.ndim >= 2 and v.shape[-2] == seq else v
    return v.narrow(how, o, seq - o) if v.shape[how] == seq else v


def slice_call(call: tuple[tuple, dict], arg_names: list[str], o: int, seq: int) -> tuple[tuple, dict] | None:
    """A block's recorded call for positions ``o..seq-1`` of a length-``seq`` input; None when an
    argument holds per-position tensors this module does not know how to cut."""
    args, kwargs = call
    out_args = []
    for name, a in zip(arg_names, args):
        if torch.is_tensor(a) or isinstance(a, tuple):
            if name not in _POSITIONAL_KWARGS:
                return None
            a = _cut(a, _POSITIONAL_KWARGS[name], o, seq)
        out_args.append(a)
    out_kw = {}
    for name, v in kwargs.items():
        if torch.is_tensor(v) or (isinstance(v, tuple) and any(torch.is_tensor(t) for t in v)):
            if name not in _POSITIONAL_KWARGS:
                return None
            v = _cut(v, _POSITIONAL_KWARGS[name], o, seq)
        out_kw[name] = v
    return tuple(out_args), out_kw


def self_test(bk) -> bool:
    """Whether ``bk`` (a BridgeBackend) continues a prefix exactly: the last positions of a short random
    input computed from the first positions' cache equal the full run's (within 1e-4 relative)."""
    seq = 5
    g = torch.Generator().manual_seed(0)
    dev = bk.input_device
    if bk.continuous:
        x = torch.randn(1, seq, bk.d_vocab, generator=g).to(dev)
    else:
        x = torch.randint(0, max(1, min(bk.d_vocab, 1000)), (1, seq), generator=g).to(dev)
    try:
        with torch.no_grad():
            resid0 = bk.embed_input(x)
            rec = KVRecordCache()
            with cache_into_attention(bk.model.blocks, rec):
                full = bk.run_from(resid0, 0)
            if sorted(rec.layers) != list(range(bk.n_layers)):
                return False
            part = bk.run_from(resid0[:, 2:], 0, past_kv=PrefixKVCache(rec, 2))
    except Exception:  # noqa: BLE001 - any failure means: not continuable on this architecture
        return False
    err = float((part - full[:, 2:]).abs().max())
    return err <= 1e-4 * max(1.0, float(full.abs().max()))


__all__ = ["KVRecordCache", "PrefixKVCache", "cache_into_attention", "self_test", "slice_call"]
