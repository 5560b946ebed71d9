"""Clean/corrupted activation-patching sweeps: the numbers of ``transformer_lens.patching``, faster.

``activation_patching(model, clean, corrupted, metric, site, by)`` patches the clean run's
activation at one index (a layer and a position, a head, ...) into the corrupted run, for every
index, and records the metric. The speed comes from the structure, not from approximations:

- the corrupted run's residual stream entering every block is computed once; a patch at layer ``l``
  runs only blocks ``l..`` (``start_at_layer``);
- patch indices are stacked along the batch axis in chunks of at most ``batch_size`` sequences;
- only the positions the metric reads (``read_positions``) are put through the final layer norm
  and the unembedding.

The metric takes logits ``[batch, positions, d_vocab]`` of the prompts in their order (the read
positions, or every position when ``read_positions`` is None) and returns one number per prompt
``[batch]``; the sweep reports its mean over prompts (TransformerLens' metrics return that mean).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from tvlens.errors import ConfigError

# site -> (hook name inside block l, kind)
SITES: dict[str, tuple[str, str]] = {
    "resid_pre": ("hook_resid_pre", "vector"),
    "resid_mid": ("hook_resid_mid", "vector"),
    "resid_post": ("hook_resid_post", "vector"),
    "attn_out": ("hook_attn_out", "vector"),
    "mlp_out": ("hook_mlp_out", "vector"),
    "z": ("attn.hook_z", "head"),
    "result": ("attn.hook_result", "head"),
    "q": ("attn.hook_q", "head"),
    "k": ("attn.hook_k", "head"),
    "v": ("attn.hook_v", "head"),
    "pattern": ("attn.hook_pattern", "pattern"),
}
# which index axes each kind of site can be swept over (after "layer")
BY = {
    "vector": {("layer", "pos"), ("layer",)},
    "head": {("layer", "head"), ("layer", "pos", "head")},
    "pattern": {("layer", "head"), ("layer", "head", "dest")},
}

Metric = Callable[[Float[torch.Tensor, "batch pos d_vocab"]], Float[torch.Tensor, "batch"]]


@dataclass
class SweepResult:
    """Metric after each patch, with one axis per index name (``layer`` first)."""

    values: torch.Tensor
    axes: tuple[str, ...]
    site: str
    clean_metric: float
    corrupted_metric: float
    notes: dict = field(default_factory=dict)

    def normalized(self) -> torch.Tensor:
        """(patched - corrupted) / (clean - corrupted): 1 = the patch restores the clean behaviour."""
        return (self.values - self.corrupted_metric) / (self.clean_metric - self.corrupted_metric)

    def to_dataframe(self):
        import pandas as pd

        idx = torch.stack(torch.meshgrid(*[torch.arange(s) for s in self.values.shape], indexing="ij"), -1)
        df = pd.DataFrame(idx.reshape(-1, len(self.axes)).numpy(), columns=list(self.axes))
        df["metric"] = self.values.reshape(-1).numpy()
        return df

    def __repr__(self) -> str:
        return (f"SweepResult(site={self.site!r}, axes={self.axes}, shape={tuple(self.values.shape)}, clean "
                f"{self.clean_metric:.4f}, corrupted {self.corrupted_metric:.4f})")

    def _repr_html_(self) -> str:
        from tvlens.views.page import figure_fragment, result_html

        return result_html(f"<div><b>Activation patching</b> <code>{html.escape(repr(self))}</code></div>",
                           [figure_fragment(self.plot())])

    def plot(self):
        """Layer x (position | head) heatmap of the metric: ``tvlens.views.sweep_figure``; for a sweep by
        position, ``tvlens.views.position_sweep_view(sweep, tokens)`` colours the prompt's tokens."""
        from tvlens.views.plots import sweep_figure

        return sweep_figure(self)


def _hook_name(site: str, layer: int) -> str:
    return f"blocks.{layer}.{SITES[site][0]}"


def _indices(kind: str, by: tuple[str, ...], seq: int, n_heads: int) -> list[tuple[int, ...]]:
    rest = by[1:]
    ranges = {"pos": seq, "head": n_heads, "dest": seq}
    out: list[tuple[int, ...]] = [()]
    for ax in rest:
        out = [o + (i,) for o in out for i in range(ranges[ax])]
    return out


def _apply(act: torch.Tensor, clean: torch.Tensor, kind: str, rest: tuple[str, ...], idx, j: int, B: int):
    """Patch index ``idx`` into rows ``j*B:(j+1)*B`` of ``act`` (in place)."""
    sl = slice(j * B, (j + 1) * B)
    if kind == "vector":
        if rest == ("pos",):
            act[sl, idx[0]] = clean[:, idx[0]]
        else:
            act[sl] = clean
    elif kind == "head":
        if rest == ("head",):
            act[sl, :, idx[0]] = clean[:, :, idx[0]]
        else:  # (pos, head)
            act[sl, idx[0], idx[1]] = clean[:, idx[0], idx[1]]
    else:  # pattern [batch, head, dest, src]
        if rest == ("head",):
            act[sl, idx[0]] = clean[:, idx[0]]
        else:  # (head, dest)
            act[sl, idx[0], idx[1]] = clean[:, idx[0], idx[1]]


def _select(x: torch.Tensor, read_positions) -> torch.Tensor:
    """``x[rows, pos]`` at the read positions (all when None). A per-prompt position tensor of
    length B applies to every stacked copy of the B prompts."""
    if read_positions is None:
        return x
    if torch.is_tensor(read_positions) and read_positions.ndim == 1 and read_positions.shape[0] != 0:
        reps = x.shape[0] // read_positions.shape[0]
        rows = torch.arange(x.shape[0], device=x.device)
        return x[rows, read_positions.to(x.device).repeat(reps)][:, None]
    return x[:, list(read_positions)]


def _read(model, resid: torch.Tensor, read_positions) -> torch.Tensor:
    """Final layer norm and unembedding at the read positions only."""
    return model.unembed(model.ln_final(_select(resid, read_positions)))


@torch.no_grad()
def activation_patching(
    model,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    metric: Metric,
    site: str = "resid_pre",
    by: Sequence[str] = ("layer", "pos"),
    layers: Sequence[int] | None = None,
    read_positions: Sequence[int] | Int[torch.Tensor, "batch"] | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> SweepResult:
    """Patch clean activations into the corrupted run at every index of ``by``; record ``metric``.

    ``clean`` and ``corrupted`` are model inputs of the same shape (token ids, or float inputs for a
    regression model). ``by`` is ``("layer", "pos")`` or ``("layer",)`` for residual/attn/mlp sites,
    ``("layer", "head")`` (all positions) or ``("layer", "pos", "head")`` for ``z, result, q, k, v``,
    and ``("layer", "head")`` or ``("layer", "head", "dest")`` for ``pattern``.
    """
    if site not in SITES:
        raise ConfigError(f"unknown site {site!r}; known sites: {sorted(SITES)}")
    kind = SITES[site][1]
    by = tuple(by)
    if by not in BY[kind]:
        raise ConfigError(f"site {site!r} can be swept by {sorted(BY[kind])}, not {by}")
    if clean.shape != corrupted.shape:
        raise ConfigError(
            f"clean and corrupted inputs must have the same shape, got {tuple(clean.shape)} and "
            f"{tuple(corrupted.shape)}: pad or trim them to one length"
        )
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [L for L in layers if not 0 <= L < n_layers]
    if bad:
        raise ConfigError(f"layers {bad} out of range: the model has blocks 0..{n_layers - 1}")
    B, seq = int(clean.shape[0]), int(clean.shape[1])
    if read_positions is not None:
        rp = read_positions
        if torch.is_tensor(rp) and rp.ndim == 1 and len(rp) == B:
            if int(rp.max()) >= seq or int(rp.min()) < -seq:
                raise ConfigError(f"read_positions out of range for sequences of length {seq}")
        elif any(not -seq <= int(p) < seq for p in rp):
            raise ConfigError(f"read_positions {list(rp)} out of range for sequences of length {seq}")
    if batch_size < B:
        raise ConfigError(f"batch_size={batch_size} cannot fit one patch of {B} prompts; use batch_size >= {B}")
    device = next(model.parameters()).device
    clean, corrupted = clean.to(device), corrupted.to(device)
    use_result = site == "result"
    old_result = model.cfg.use_attn_result
    if use_result:
        model.set_use_attn_result(True)
    try:
        names = {_hook_name(site, L) for L in layers}
        clean_logits, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n in names)
        starts = {f"blocks.{L}.hook_resid_pre" for L in layers}
        corrupt_logits, corrupt_cache = model.run_with_cache(corrupted, names_filter=lambda n: n in starts)

        def score(logits_full):
            return _per_prompt(metric, _select(logits_full, read_positions), B)

        clean_m = float(score(clean_logits).mean())
        corrupt_m = float(score(corrupt_logits).mean())
        n_heads = model.cfg.n_heads
        idx_all = _indices(kind, by, seq, n_heads)
        rest = by[1:]
        out = torch.zeros(len(layers), len(idx_all))
        per_chunk = max(1, batch_size // B)
        total = len(layers) * ((len(idx_all) + per_chunk - 1) // per_chunk)
        bar = tqdm(total=total, desc=f"patching {site}", disable=not progress, leave=False)
        for li, L in enumerate(layers):
            start = corrupt_cache[f"blocks.{L}.hook_resid_pre"]
            clean_act = clean_cache[_hook_name(site, L)]
            for c0 in range(0, len(idx_all), per_chunk):
                chunk = idx_all[c0 : c0 + per_chunk]
                k = len(chunk)

                def hook(act, hook, _chunk=chunk, _clean=clean_act):
                    act = act.clone()
                    for j, idx in enumerate(_chunk):
                        _apply(act, _clean, kind, rest, idx, j, B)
                    return act

                resid_in = start.repeat(k, *([1] * (start.ndim - 1)))
                with model.hooks(fwd_hooks=[(_hook_name(site, L), hook)]):
                    resid = model(resid_in, start_at_layer=L, stop_at_layer=n_layers)
                logits = _read(model, resid, read_positions)
                # the metric sees the B prompts in their order, once per stacked patch
                vals = torch.stack([_per_prompt(metric, logits[j * B : (j + 1) * B], B).mean() for j in range(k)])
                out[li, c0 : c0 + k] = vals.float().cpu()
                bar.update(1)
        bar.close()
    finally:
        if use_result:
            model.set_use_attn_result(old_result)
    shape = [len(layers)] + [seq if a in ("pos", "dest") else n_heads for a in rest]
    return SweepResult(values=out.reshape(shape), axes=by, site=site, clean_metric=clean_m,
                       corrupted_metric=corrupt_m, notes={"layers": layers})


def _per_prompt(metric: Metric, logits: torch.Tensor, n: int) -> torch.Tensor:
    v = metric(logits)
    if not torch.is_tensor(v) or v.shape != (n,):
        got = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
        raise ConfigError(
            f"the metric must return one number per prompt, a tensor of shape ({n},); it returned {got}. "
            "Reduce over positions and vocabulary but not over the batch"
        )
    return v


__all__ = ["SITES", "SweepResult", "activation_patching"]
