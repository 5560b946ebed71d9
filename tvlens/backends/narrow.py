"""A block's MLP computed only at the positions that will be read.

After the last block nothing mixes positions: the final norm and the unembedding act on each position
alone, and a sweep's metric or an extraction reads only some positions (``read_positions``, each prompt's
query). The last block's attention still needs every position (its keys and values come from the
residual entering the block), but its MLP (two thirds of a GPT-2 block's matrix products, three
quarters of a Llama block's) is per position, so it need run only at the read positions.

:func:`mlp_only_at` runs a block's MLP module on the gathered read positions and scatters its output
back into a tensor of the full shape that is NaN everywhere else: a position that was not asked for
can never be read as a number by mistake (a NaN, not a silent wrong value, if anything reads it).
The same numbers at the read positions as the full MLP, up to float rounding (a matrix product over
fewer rows may round differently: ~1e-7 relative; tests/test_narrow.py).

Positions come in the forms ``tvlens.sweeps`` reads them: a list of shared positions, a tensor
``[rows]`` (one position per row) or ``[rows, n]`` (several per row); a tensor of fewer rows than the
batch applies to each stacked copy of those rows (a sweep stacks ``k`` copies of its ``B`` prompts).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch


def gather(x: torch.Tensor, positions) -> torch.Tensor:
    """``x[rows, positions]`` ``[rows, n, ...]`` of a ``[rows, seq, ...]`` tensor, ``positions`` in any of the
    forms above (what a sweep reads, what the narrowed MLP computes)."""
    r, p = _index(positions, int(x.shape[0]), int(x.shape[1]), x.device)
    return x[r, p] if r is not None else x[:, p]


def _index(positions, rows: int, seq: int, device):
    """``(row_index [R, 1] or None, pos_index)`` selecting the positions from a ``[rows, seq, ...]`` tensor."""
    if not torch.is_tensor(positions):
        return None, torch.tensor([int(p) % seq for p in positions], device=device)
    p = positions.to(device).long() % seq
    p = p[:, None] if p.ndim == 1 else p
    if rows % p.shape[0]:
        raise ValueError(f"{p.shape[0]} rows of positions do not tile a batch of {rows}")
    return torch.arange(rows, device=device)[:, None], p.repeat(rows // p.shape[0], 1)


def mlp_is_narrowable(mlp) -> bool:
    """Whether ``mlp`` may run on a subset of positions here: a module in eval mode (dropout draws per
    position) with no hook attached inside it (a hook there would see the gathered shape)."""
    if not isinstance(mlp, torch.nn.Module) or mlp.training:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in mlp.modules())


@contextlib.contextmanager
def mlp_only_at(mlp: torch.nn.Module, positions: Sequence[int] | torch.Tensor):
    """Within the context, ``mlp`` (called with the residual-shaped ``[rows, seq, d]`` input first) computes
    only at ``positions`` and returns NaN at every other position."""
    state: dict = {}

    def pre(mod, args, kwargs):
        x = args[0]
        state["shape"], state["idx"] = x.shape, _index(positions, int(x.shape[0]), int(x.shape[1]), x.device)
        return (gather(x, positions),) + tuple(args[1:]), kwargs

    def post(mod, args, kwargs, out):
        if not torch.is_tensor(out):
            from tvlens.errors import UnsupportedModelError

            raise UnsupportedModelError(f"this model's MLP returns {type(out).__name__}, not a tensor: it cannot "
                                        "be computed at the read positions only")
        shape, (r, p) = state.pop("shape"), state.pop("idx")
        full = out.new_full((*shape[:2], *out.shape[2:]), float("nan"))
        if r is not None:
            full[r, p] = out
        else:
            full[:, p] = out
        return full

    handles = [mlp.register_forward_pre_hook(pre, with_kwargs=True),
               mlp.register_forward_hook(post, with_kwargs=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


__all__ = ["gather", "mlp_is_narrowable", "mlp_only_at"]
