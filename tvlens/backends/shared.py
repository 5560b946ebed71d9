"""One attention computation for a batch of identical copies (a per-head sweep's rows).

A sweep over heads stacks ``k`` copies of the same ``B`` prompts and patches head ``h_j`` in copy ``j``
at ``attn.hook_z``. Up to that hook every copy computes the same thing: the block's input is the same
corrupted residual, so its queries, keys, values, scores and pattern are too. :func:`attention_once` lets
the block's attention compute them for the first ``B`` rows only; the hook on ``hook_z`` then returns the
``k x B`` rows (the copies, each with its head patched), and the output projection, the residual stream and
every later block run on all of them. The attention's own work at the patched layer drops ``k``-fold.

Whether a model's attention allows this (its output projection follows the batch of ``z``, not of its
input) is checked once per model by :func:`self_test` on a short random input, both ways; a model that
fails is never run this way.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def attention_once(attn: torch.nn.Module, n_rows: int, rows: int):
    """Within the context, every tensor argument of ``attn`` with ``n_rows`` rows is cut to its first ``rows``
    (the caller guarantees that the input is those rows repeated, and that a hook expands ``z`` back)."""
    def cut(v):
        return v[:rows] if torch.is_tensor(v) and v.ndim >= 2 and v.shape[0] == n_rows else v

    def pre(mod, args, kwargs):
        return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}

    handle = attn.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def self_test(bk) -> bool:
    """Whether block 0 of ``bk`` gives the same output for 2 copies of a short input with head 0 patched in
    the second copy, computed with its attention once (and ``z`` expanded at the hook) or twice."""
    g = torch.Generator().manual_seed(0)
    seq, dev = 5, bk.input_device
    x = (torch.randn(1, seq, bk.d_vocab, generator=g) if bk.continuous
         else torch.randint(0, max(1, min(bk.d_vocab, 1000)), (1, seq), generator=g)).to(dev)
    name = "blocks.0.attn.hook_z"

    def patch(act, hook, expand):
        act = act.repeat(2, *([1] * (act.ndim - 1))) if expand else act.clone()
        act[1, :, 0] = 0.5
        return act

    try:
        with torch.no_grad():
            resid = bk.embed_input(x).repeat(2, 1, 1)
            with bk.hooks(fwd_hooks=[(name, lambda a, hook: patch(a, hook, False))]):
                want = bk.run_from(resid, 0, 1)
            with bk.hooks(fwd_hooks=[(name, lambda a, hook: patch(a, hook, True))]), \
                    attention_once(bk.model.blocks[0].attn, 2, 1):
                got = bk.run_from(resid, 0, 1)
    except Exception:  # noqa: BLE001 - any failure means: this attention cannot be shared
        return False
    if got.shape != want.shape:
        return False
    return float((got - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max()))


__all__ = ["attention_once", "self_test"]
