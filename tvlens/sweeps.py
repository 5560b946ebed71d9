"""Clean/corrupted activation-patching sweeps: the numbers of ``transformer_lens.patching``, faster.

``activation_patching(model, clean, corrupted, metric, site, by)`` patches the clean run's
activation at one index (a layer and a position, a head, ...) into the corrupted run, for every
index, and records the metric. The speed comes from the structure, not from approximations:

- the corrupted run's residual stream entering every block is computed once; a patch at layer ``l``
  runs only blocks ``l..`` (``start_at_layer``), and a patch at position ``p`` only positions ``p..``
  (``skip_prefix``: the earlier positions' keys and values come from the corrupted run's cache);
- patch indices are stacked along the batch axis in chunks of at most ``batch_size`` sequences, and the
  patches of every layer at one chunk of positions share one run (each layer's rows join it at their own
  block), so the matrix products are large;
- only the positions the metric reads (``read_positions``) are put through the last block's MLP
  (``tvlens.backends.narrow``), the final layer norm and the unembedding (one unembedding for many runs);
- a per-head patch at ``z`` computes the patched block's attention once for its stacked copies
  (``tvlens.backends.shared``); GPT-2's tanh GELU runs as PyTorch's fused kernel (``tvlens.backends.kernels``).

The metric takes logits ``[batch, positions, d_vocab]`` of the prompts in their order (the read
positions, or every position when ``read_positions`` is None) and returns one number per prompt
``[batch]``; the sweep reports its mean over prompts (TransformerLens' metrics return that mean),
and with ``per_prompt=True`` every prompt's number too.

Beyond clean -> corrupted, the engine patches any given activation (``source``: per layer, a tensor
broadcastable to the site's activation, e.g. a mean over prompts or zeros for ablation) and can patch
only one position per prompt (``patch_positions``), which is what head attribution
(``tvlens.attribution``) sweeps.
"""

from __future__ import annotations

import contextlib
import functools
import html
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from tvlens.backends import get_backend
from tvlens.backends.narrow import gather
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
    # a head's own residual input (split q/k/v input) and the MLP's input: the receivers of path patching
    # (tvlens.circuits turns the backend's use_split_qkv_input / use_hook_mlp_in on around the call)
    "q_input": ("hook_q_input", "head"),
    "k_input": ("hook_k_input", "head"),
    "v_input": ("hook_v_input", "head"),
    "mlp_in": ("hook_mlp_in", "vector"),
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
    per_prompt: torch.Tensor | None = None  # [*values.shape, batch] with per_prompt=True
    corrupted_per_prompt: torch.Tensor | None = None  # [batch]: the unpatched run's metric per prompt
    # bootstrap CI over prompts of ``values`` (needs ``per_prompt``; ``with_ci``, or ``activation_patching(ci=)``)
    values_ci: torch.Tensor | None = None  # [2, *values.shape]: lo, hi
    ci_info: dict = field(default_factory=dict)

    def with_ci(self, ci: float = 0.95, n_boot: int = 1000, seed: int = 0) -> "SweepResult":
        """Fill ``values_ci``: the percentile bootstrap over prompts of every index's mean metric (one
        resample of the prompts for all indices; ``tvlens.stats``). Needs ``per_prompt``. Returns ``self``."""
        from tvlens import stats

        ci, n_boot, seed = stats.check_ci_args(ci, n_boot, seed)
        if self.per_prompt is None:
            raise ConfigError("a sweep's CI is over prompts and needs every prompt's metric: run "
                              "activation_patching(..., per_prompt=True) or activation_patching(..., ci=0.95)")
        iv = stats.mean_ci(self.per_prompt.double(), n_boot=n_boot, ci=ci, seed=seed)
        self.values_ci = torch.tensor(np.stack([iv.lo, iv.hi]), dtype=torch.float32)
        self.ci_info = {"ci": ci, "n_boot": n_boot, "seed": seed}
        return self

    def normalized(self) -> torch.Tensor:
        """(patched - corrupted) / (clean - corrupted): 1 = the patch restores the clean behaviour."""
        return (self.values - self.corrupted_metric) / (self.clean_metric - self.corrupted_metric)

    def normalized_ci(self) -> torch.Tensor | None:
        """``values_ci`` on the ``normalized()`` scale ``[2, ...]`` (clean and corrupted means held fixed)."""
        if self.values_ci is None:
            return None
        n = (self.values_ci - self.corrupted_metric) / (self.clean_metric - self.corrupted_metric)
        return torch.stack([n.min(0).values, n.max(0).values])

    def to_dataframe(self):
        import pandas as pd

        idx = torch.stack(torch.meshgrid(*[torch.arange(s) for s in self.values.shape], indexing="ij"), -1)
        df = pd.DataFrame(idx.reshape(-1, len(self.axes)).numpy(), columns=list(self.axes))
        df["metric"] = self.values.reshape(-1).numpy()
        if self.values_ci is not None:
            df["metric_lo"] = self.values_ci[0].reshape(-1).numpy()
            df["metric_hi"] = self.values_ci[1].reshape(-1).numpy()
        return df

    def __repr__(self) -> str:
        return (f"SweepResult(site={self.site!r}, axes={self.axes}, shape={tuple(self.values.shape)}, clean "
                f"{self.clean_metric:.4f}, corrupted {self.corrupted_metric:.4f})")

    def _repr_html_(self) -> str:
        from tvlens.plotting import figure_fragment, result_html

        return result_html(f"<div><b>Activation patching</b> <code>{html.escape(repr(self))}</code></div>",
                           [figure_fragment(self.plot())])

    def plot(self):
        """Layer x (position | head) heatmap of the metric: ``tvlens.views.sweep_figure``; for a sweep by
        position, ``tvlens.views.position_sweep_view(sweep, tokens)`` colours the prompt's tokens."""
        from tvlens.plotting import sweep_figure

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


def _apply(act: torch.Tensor, clean: torch.Tensor, kind: str, rest: tuple[str, ...], idx, j: int, B: int,
           positions: torch.Tensor | None = None):
    """Patch index ``idx`` into rows ``j*B:(j+1)*B`` of ``act`` (in place); with ``positions`` (one per
    prompt) only at each prompt's position."""
    sl = slice(j * B, (j + 1) * B)
    if positions is not None:  # by ("layer",) or ("layer", "head"): one position per prompt
        rows = torch.arange(B, device=act.device)
        block = act[sl]
        if kind == "vector":
            block[rows, positions] = clean[rows, positions]
        else:
            block[rows, positions, idx[0]] = clean[rows, positions, idx[0]]
        return
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
    """``x[rows, pos]`` at the read positions (all when None): shared positions (a list), or a tensor ``[B]`` /
    ``[B, n]`` of each prompt's, applied to every stacked copy of the B prompts (``backends.narrow.gather``)."""
    return x if read_positions is None else gather(x, read_positions)


@torch.no_grad()
def activation_patching(
    model,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    metric: Metric,
    site: str = "resid_pre",
    by: Sequence[str] = ("layer", "pos"),
    layers: Sequence[int] | None = None,
    read_positions: Sequence[int] | Int[torch.Tensor, "batch"] | Int[torch.Tensor, "batch n"] | None = None,
    batch_size: int | None = 256,
    progress: bool = True,
    source: dict[int, torch.Tensor] | None = None,
    patch_positions: Int[torch.Tensor, "batch"] | None = None,
    per_prompt: bool = False,
    skip_prefix: bool | None = None,
    ci: float | None = None,
    n_boot: int = 1000,
    ci_seed: int = 0,
) -> SweepResult:
    """Patch clean activations into the corrupted run at every index of ``by``; record ``metric``.

    ``clean`` and ``corrupted`` are model inputs of the same shape (token ids, or float inputs for a
    regression model). ``by`` is ``("layer", "pos")`` or ``("layer",)`` for residual/attn/mlp sites,
    ``("layer", "head")`` (all positions) or ``("layer", "pos", "head")`` for ``z, result, q, k, v``,
    and ``("layer", "head")`` or ``("layer", "head", "dest")`` for ``pattern``.

    ``read_positions``: shared positions, one position per prompt ``[batch]``, or several per prompt
    ``[batch, n]``. ``source`` (``{layer: tensor}``, broadcastable to the site's activation
    ``[batch, pos, ...]``) is patched in instead of the clean run's activation (``clean`` may then be
    None, and ``clean_metric`` is nan). ``patch_positions`` ``[batch]`` patches only each prompt's
    position (``by`` without ``pos``: ``("layer",)`` or ``("layer", "head")``). ``per_prompt`` keeps every
    prompt's metric (``per_prompt``, ``corrupted_per_prompt``).

    ``skip_prefix``: a patch leaves every position before the first one it changes as in the corrupted run
    (causal attention): for a patch at position ``p`` that is ``p``; for a patch at every position (by layer or
    head alone) it is the first position where the patched activation differs from the corrupted run's. So when
    all read positions are at or after it, the patched run computes only positions ``min(first, reads)..`` of
    blocks ``l..``, attending to the corrupted run's cached keys and values of the earlier positions (exact, not
    an approximation). None (default) does it wherever valid, on both model classes (a HookedTransformer
    continues TransformerLens' key/value cache; a TransformerBridge its attention's, ``tvlens.backends.prefix``);
    patches with the same first position share calls where one call is cheaper than two (``_plan_chunks``).
    True raises ConfigError when it cannot be done (no read_positions, a pattern sweep, or a model it is not
    exact for); False always runs every position. Independently of it, a patch that writes exactly what the
    corrupted run holds (e.g. before the first corrupted position) is not run at all: its value is the corrupted
    run's metric (``notes["unchanged_patches"]``).

    ``ci`` (e.g. 0.95; opt-in, as it keeps every prompt's metric): a bootstrap CI over prompts of every
    value (``values_ci``), from ``n_boot`` resamples seeded by ``ci_seed``.
    """
    if ci is not None:
        from tvlens.stats import check_ci_args

        check_ci_args(ci, n_boot, ci_seed, ("ci", "n_boot", "ci_seed"))
        per_prompt = True
    kind, by, layers, batch_size = _check_sweep_args(model, clean, corrupted, site, by, layers, read_positions,
                                                     batch_size, source, patch_positions)
    bk = get_backend(model)
    use_skip = _use_skip(bk, model, kind, by, read_positions, patch_positions, skip_prefix)
    device = bk.input_device
    corrupted = corrupted.to(device)
    clean = clean.to(device) if clean is not None else None
    with _attn_result(bk, site == "result"), bk.fast_kernels():  # fused kernels for every run it compares
        sweep = _Sweep(bk, metric, site, kind, by, layers, read_positions, batch_size, per_prompt, corrupted.shape)
        clean_m, corrupt_pp = sweep.baselines(clean, corrupted, source, use_skip)
        pp = patch_positions.to(device) if patch_positions is not None else None
        sweep.find_noops(source, pp, corrupt_pp, device)
        bar = tqdm(total=sweep.n_patches(), desc=f"patching {site}", disable=not progress, leave=False)
        sweep.run_all(source, pp, use_skip, device, bar)
        bar.close()
    shape = [len(layers)] + [sweep.seq if a in ("pos", "dest") else sweep.n_heads for a in by[1:]]
    res = SweepResult(values=sweep.out.reshape(shape), axes=by, site=site, clean_metric=clean_m,
                      corrupted_metric=float(corrupt_pp.mean()),
                      notes={"layers": layers, "skip_prefix": use_skip and sweep.any_offset,
                             "forward_calls": sweep.n_calls, "last_block_read_only_calls": sweep.n_narrowed,
                             "unchanged_patches": sweep.n_noop,
                             "shared_attention_calls": sweep.n_shared},
                      per_prompt=sweep.out_pp.reshape(*shape, sweep.B) if sweep.out_pp is not None else None,
                      corrupted_per_prompt=corrupt_pp if per_prompt else None)
    return res.with_ci(ci, n_boot, ci_seed) if ci is not None else res


@contextlib.contextmanager
def _attn_result(bk, on: bool):
    """``hook_result`` (per-head outputs) turned on for the context when ``on``, then restored."""
    old = bk.set_use_attn_result(True) if on else None
    try:
        yield
    finally:
        if on:
            bk.set_use_attn_result(old)


def _check_sweep_args(model, clean, corrupted, site, by, layers, read_positions, batch_size, source, patch_positions):
    """Refuse what ``activation_patching`` cannot sweep, before any work; the site's kind, ``by`` as a tuple, the
    layers, the batch size."""
    import numbers

    from tvlens.validate import check_batch_size, check_model_inputs, int_list

    if site not in SITES:
        raise ConfigError(f"unknown site {site!r}; known sites: {sorted(SITES)}")
    kind = SITES[site][1]
    by = (by,) if isinstance(by, str) else tuple(by)  # by="layer" is ("layer",), not its letters
    check_model_inputs(corrupted, model, "corrupted", "activation_patching")
    if clean is not None:
        check_model_inputs(clean, model, "clean", "activation_patching")
    layers = int_list(layers, "layers", 0, get_backend(model).n_layers - 1, "activation_patching", " (block indices)")
    batch_size = check_batch_size(batch_size, where="activation_patching") or int(corrupted.shape[0])
    if isinstance(read_positions, str) or (read_positions is not None and not torch.is_tensor(read_positions)
                                           and not all(isinstance(r, numbers.Integral) and not isinstance(r, bool)
                                                       for r in read_positions)):
        raise ConfigError(f"activation_patching: read_positions must be positions (ints, or a tensor [batch] or "
                          f"[batch, n]), got {read_positions!r}")
    if source is not None and (not isinstance(source, dict)
                               or not all(torch.is_tensor(t) and t.is_floating_point() for t in source.values())):
        raise ConfigError("activation_patching: source must be {layer: float tensor} (activations to patch in), got "
                          f"{type(source).__name__}")
    if by not in BY[kind]:
        raise ConfigError(f"site {site!r} can be swept by {sorted(BY[kind])}, not {by}")
    if clean is None and source is None:
        raise ConfigError("clean is None: give the clean inputs, or the activations to patch in (source=)")
    if clean is not None and clean.shape != corrupted.shape:
        raise ConfigError(
            f"clean and corrupted inputs must have the same shape, got {tuple(clean.shape)} and "
            f"{tuple(corrupted.shape)}: pad or trim them to one length"
        )
    n_layers = get_backend(model).n_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [L for L in layers if not 0 <= L < n_layers]
    if bad:
        raise ConfigError(f"layers {bad} out of range: the model has blocks 0..{n_layers - 1}")
    B, seq = int(corrupted.shape[0]), int(corrupted.shape[1])
    if source is not None:
        missing = [L for L in layers if L not in source]
        if missing:
            raise ConfigError(f"source holds no activation for layers {missing}; give one per swept layer")
    _check_positions(site, kind, by, patch_positions, read_positions, B, seq)
    if batch_size < B:
        raise ConfigError(f"batch_size={batch_size} cannot fit one patch of {B} prompts; use batch_size >= {B}")
    return kind, by, layers, batch_size


def _check_positions(site, kind, by, patch_positions, read_positions, B: int, seq: int) -> None:
    if patch_positions is not None:
        if "pos" in by or "dest" in by or kind == "pattern":
            raise ConfigError(f"patch_positions patches one position per prompt: sweep by ('layer',) or "
                              f"('layer', 'head'), not {by} at site {site!r}")
        if not torch.is_tensor(patch_positions) or patch_positions.shape != (B,):
            raise ConfigError(f"patch_positions must be a tensor of {B} positions (one per prompt)")
        if int(patch_positions.max()) >= seq or int(patch_positions.min()) < 0:
            raise ConfigError(f"patch_positions out of range for sequences of length {seq}")
    if read_positions is not None:
        rp = read_positions
        if torch.is_tensor(rp) and (rp.ndim not in (1, 2) or rp.is_floating_point() or rp.is_complex()
                                    or rp.dtype == torch.bool):
            raise ConfigError(f"read_positions must be an integer tensor [batch] or [batch, n] (or a list of "
                              f"positions), got a {rp.dtype} tensor of shape {tuple(rp.shape)}")
        if len(rp) == 0:
            raise ConfigError("read_positions is empty: give the positions the metric reads, or None for all")
        if torch.is_tensor(rp) and rp.ndim == 2:
            if rp.shape[0] != B or int(rp.max()) >= seq or int(rp.min()) < -seq:
                raise ConfigError(f"read_positions [batch, n] must have {B} rows of positions < {seq}")
        elif torch.is_tensor(rp) and rp.ndim == 1 and len(rp) == B:
            if int(rp.max()) >= seq or int(rp.min()) < -seq:
                raise ConfigError(f"read_positions out of range for sequences of length {seq}")
        elif any(not -seq <= int(p) < seq for p in rp):
            raise ConfigError(f"read_positions {list(rp)} out of range for sequences of length {seq}")


def _use_skip(bk, model, kind, by, read_positions, patch_positions, skip_prefix) -> bool:
    """Whether to compute only the positions a patch can change (``skip_prefix``; see ``activation_patching``)."""
    at_positions = kind != "pattern"  # every other site's patch changes positions from its first changed one on
    can_skip = at_positions and read_positions is not None and bk.supports_prefix_kv()
    if skip_prefix and not can_skip:
        why = ("an attention-pattern patch (site 'pattern') changes every query's keys at once" if not at_positions else
               "read_positions is None (the metric reads every position)" if read_positions is None else
               f"the model ({type(model).__name__}, positional_embedding_type "
               f"{bk.positional_embedding_type!r}) cannot be continued exactly from a key/value cache")
        raise ConfigError(f"skip_prefix=True cannot skip the unchanged prefix: {why}; use skip_prefix=None")
    return can_skip and skip_prefix is not False


class _Sweep:
    """The batched engine of one ``activation_patching`` call: the corrupted (and clean) runs cached once, then,
    per layer, chunks of patches stacked along the batch and run from that layer on; the read positions' final
    residuals are unembedded many calls at once (``flush``)."""

    def __init__(self, bk, metric, site, kind, by, layers, read_positions, batch_size, per_prompt, shape):
        self.bk, self.metric, self.site, self.kind, self.by, self.layers = bk, metric, site, kind, by, layers
        self.rest = by[1:]
        self.B, self.seq = int(shape[0]), int(shape[1])
        if torch.is_tensor(read_positions) and read_positions.ndim == 1 and len(read_positions) != self.B:
            read_positions = [int(p) for p in read_positions]  # shared positions, as _check_positions took them
        self.read_positions = read_positions
        self.n_heads = _site_heads(bk, site)
        self.idx_all = _indices(kind, by, self.seq, self.n_heads)
        self.out = torch.zeros(len(layers), len(self.idx_all))
        self.out_pp = torch.zeros(len(layers), len(self.idx_all), self.B) if per_prompt else None
        self.per_chunk = max(1, batch_size // self.B)
        self.n_calls = 0
        self.n_narrowed = 0  # calls whose last block ran its MLP at the read positions only
        self.share_attention = site == "z" and bk.supports_shared_attention()
        self.n_shared = 0  # calls whose patched block ran its attention once for all stacked copies
        self.ids = list(range(len(self.idx_all)))  # the indices being planned and run (``run_all``)
        self.first_ids: list[int] = []  # their first changed positions
        self.first: list[list[int | None]] = []  # per layer and index: the first position the patch changes (None:
        # it changes nothing; ``find_noops``)
        self.n_noop, self.any_offset = 0, False
        self.pending: list[tuple[int, list[int], int, torch.Tensor]] = []  # (layer index, indices, k, reads)
        self.pending_rows = 0

    def read_logits(self, x, names, record_kv: bool = False):
        """The logits of ``x`` at the read positions only (the final residual is unembedded there alone, and
        the last block's MLP runs there alone unless a cached activation lies in that block), the activations
        at hook ``names``, and (``record_kv``) the keys/values record."""
        bk, last = self.bk, f"blocks.{self.bk.n_layers - 1}."
        narrow = None if any(n.startswith(last) for n in names) else self.read_positions
        store: dict[str, torch.Tensor] = {}
        hooks = [(n, functools.partial(_keep, store=store, name=n)) for n in names]
        with bk.last_block_reads(narrow):
            if record_kv:
                resid, rec = bk.record_kv(x, hooks, stop_at_layer=bk.n_layers)
            else:
                resid, rec = bk.run_with_hooks(x, fwd_hooks=hooks, stop_at_layer=bk.n_layers), None
        return bk.unembed(_select(resid, self.read_positions)), store, rec

    def baselines(self, clean, corrupted, source, use_skip: bool) -> tuple[float, torch.Tensor]:
        """Cache what the patched runs need; the clean run's mean metric (nan with ``source``) and the
        corrupted run's per prompt."""
        layers = self.layers
        starts = {f"blocks.{L}.hook_resid_pre" for L in layers}
        if self.kind != "pattern":  # the corrupted run's own activation at the site: which patches change nothing
            starts |= {_hook_name(self.site, L) for L in layers}
        # with use_skip, also the corrupted run's keys/values (a patched run continues from its prefix)
        corrupt_logits, self.corrupt_cache, self.kv_rec = self.read_logits(corrupted, starts, record_kv=use_skip)
        if source is None:
            clean_logits, self.clean_cache, _ = self.read_logits(clean, {_hook_name(self.site, L) for L in layers})
            clean_m = float(_per_prompt(self.metric, clean_logits, self.B).mean())
            del clean_logits
        else:
            clean_m = float("nan")
        corrupt_pp = _per_prompt(self.metric, corrupt_logits, self.B).float().cpu()
        del corrupt_logits
        return clean_m, corrupt_pp

    def plan(self, use_skip: bool, device) -> list[tuple[int, int, int]]:
        """Chunks ``(c0, c1, o)`` of the indices ``self.ids``: ``ids[c0:c1]`` run together from position ``o``."""
        n, per_chunk = len(self.ids), self.per_chunk
        if use_skip:
            self.reads = _normalized_reads(self.read_positions, self.seq, device)
            min_read = int(self.reads.min()) if torch.is_tensor(self.reads) else min(self.reads)
            # the first position each index's patch changes (by pos: its position; else: where the patched activation
            # first differs from the corrupted run's, ``find_noops``)
            return _plan_chunks(self.first_ids, min_read, per_chunk, self.B, self.seq, self.bk.call_cost_tokens)
        self.reads = self.read_positions
        return [(c0, min(c0 + per_chunk, n), 0) for c0 in range(0, n, per_chunk)]

    def flush(self) -> None:
        """Unembed the pending read residuals (of any layers) in one call and score them."""
        if not self.pending:
            return
        B = self.B
        sel = torch.cat([x for *_, x in self.pending])
        logits = self.bk.unembed(sel)
        r0 = 0
        for li, ids, k, _ in self.pending:
            # the metric sees the B prompts in their order, once per stacked patch
            pp_vals = torch.stack([_per_prompt(self.metric, logits[r0 + j * B : r0 + (j + 1) * B], B) for j in range(k)])
            r0 += k * B
            self.out[li, ids] = pp_vals.mean(1).float().cpu()
            if self.out_pp is not None:
                self.out_pp[li, ids] = pp_vals.float().cpu()
        self.pending.clear()
        self.pending_rows = 0

    def find_noops(self, source, pp, corrupt_pp: torch.Tensor, device) -> None:
        """``self.first[li][j]``: the first position where index ``j``'s patch at layer ``li`` changes the corrupted
        run's activation at the site, None where it changes nothing: then its value is the corrupted run's metric,
        exactly, with no forward pass (``notes["unchanged_patches"]``): positions before a corruption, layer 0
        away from it. A pattern patch counts as changing everything from position 0."""
        self.first, self.n_noop = [], 0
        for li, L in enumerate(self.layers):
            name = _hook_name(self.site, L)
            if self.kind == "pattern" or name not in self.corrupt_cache:
                self.first.append([0] * len(self.idx_all))
                continue
            differs = self._clean_act(L, source, device) != self.corrupt_cache[name]
            self.first.append([_first_write(differs, self.kind, self.rest, idx, self.B, pp) for idx in self.idx_all])
            noop = [j for j, f in enumerate(self.first[li]) if f is None]
            self.out[li, noop] = corrupt_pp.mean()
            if self.out_pp is not None:
                self.out_pp[li, noop] = corrupt_pp
            self.n_noop += len(noop)

    def n_patches(self) -> int:
        """The patches that will run (``find_noops`` first)."""
        return sum(f is not None for first in self.first for f in first)

    def run_all(self, source, pp, use_skip: bool, device, bar) -> None:
        """Every patch that changes something: layers with the same such indices share a plan (and runs)."""
        groups: dict[tuple, list[int]] = {}
        for li, first in enumerate(self.first):
            groups.setdefault(tuple((j, f) for j, f in enumerate(first) if f is not None), []).append(li)
        self.any_offset = False
        for key, lis in groups.items():
            if not key:
                continue
            self.ids = [j for j, _ in key]
            self.first_ids = [f for _, f in key]  # each index's first changed position
            plan = self.plan(use_skip, device)
            self.any_offset |= any(o for _, _, o in plan)
            self.run_layers([(li, self.layers[li]) for li in lis], source, plan, pp, device, bar)
        self.flush()  # the pending reads of the last layers: unembedded once for all of them

    def run_layers(self, pairs, source, plan, pp, device, bar) -> None:
        """The patches ``self.ids`` at the layers ``pairs`` (``(li, L)``) by ``plan``."""
        if self.share_attention or len({L for _, L in pairs}) < len(pairs):  # z: one call per layer (shared attention)
            for li, L in pairs:
                self.run_layer(li, L, source, plan, pp, device, bar)
            return
        # the layers' patches of one chunk join a single run, each at its own block
        last = self.bk.n_layers - 1  # run apart: a hook in its MLP (a bridge's mlp_out) would stop every
        pairs = sorted(pairs, key=lambda t: t[1])  # merged run's read-only last MLP
        early, final = [p for p in pairs if p[1] != last], [[p] for p in pairs if p[1] == last]
        for c0, c1, o in plan:
            g = max(1, self.per_chunk // (c1 - c0))  # layers per run: at most batch_size rows
            for group in [early[s:s + g] for s in range(0, len(early), g)] + final:
                self.run_merged(group, (c0, c1, o), source, pp, device)
                bar.update(len(group) * (c1 - c0))

    def _clean_act(self, L: int, source, device) -> torch.Tensor:
        start = self.corrupt_cache[f"blocks.{L}.hook_resid_pre"]
        if source is None:
            return self.clean_cache[_hook_name(self.site, L)]
        return _expand_source(source[L], start, self.site, self.bk, device)

    def _hook(self, chunk, clean_o, pp_o, share: bool, row0: int = 0):
        """The patch of ``chunk``'s indices into rows ``row0..`` (copy ``j`` at rows ``row0 + j*B``); with
        ``share`` the hook receives one copy and returns them all."""
        kind, rest, B, k = self.kind, self.rest, self.B, len(chunk)

        def hook(act, hook):
            act = act.repeat(k, *([1] * (act.ndim - 1))) if share else act.clone()
            for j, idx in enumerate(chunk):
                _apply(act, clean_o, kind, rest, idx, row0 // B + j, B, pp_o)
            return act
        return hook

    def _shares(self, o: int, k: int) -> bool:
        """Whether a run of ``k`` stacked copies from position ``o`` computes the patched attention once (z; from
        a later position only on a bridge, whose prefix cache follows the batch it is given)."""
        return self.share_attention and k > 1 and (o == 0 or self.bk.kind == "bridge")

    def _chunk(self, c0: int, c1: int, o: int):
        """Patch indices ``ids[c0:c1]`` with positions shifted to a run from position ``o``."""
        idx = [self.idx_all[j] for j in self.ids[c0:c1]]
        return [((i[0] - o,) + i[1:]) if "pos" in self.by else i for i in idx]

    def run_merged(self, group, span, source, pp, device) -> None:
        """The patches ``span`` (``c0, c1, o``) at every layer of ``group`` (``(li, L)``, ascending) in one run:
        from the first layer's block on, each layer's copies join the batch at their own block (the rows of the
        layers before run on unchanged). Bigger matrix products than one run per layer, the same numbers."""
        bk, B = self.bk, self.B
        (c0, c1, o), chunk = span, self._chunk(*span)
        k, pp_o = len(chunk), (pp - o if pp is not None and o else pp)
        joins, hooks = {}, []
        for n, (_, L) in enumerate(group):
            clean_o = self._clean_act(L, source, device)[:, o:]
            hooks.append((_hook_name(self.site, L), self._hook(chunk, clean_o, pp_o, False, n * k * B)))
            start = self.corrupt_cache[f"blocks.{L}.hook_resid_pre"][:, o:]
            joins[L] = start.repeat(k, *([1] * (start.ndim - 1)))
        reads, h = _shift(self.reads, o), None
        with bk.hooks(fwd_hooks=hooks), bk.last_block_reads(reads) as narrowed:
            for i in range(group[0][1], bk.n_layers):
                if i in joins:
                    h = joins[i] if h is None else torch.cat([h, joins[i]])
                kv = bk.prefix_kv(self.kv_rec, i, o, h.shape[0] // B, stop=i + 1) if o else None
                h = bk.run_from(h, i, i + 1, past_kv=kv)
        self.n_calls += 1
        self.n_narrowed += int(narrowed)
        for n, (li, _) in enumerate(group):
            self.pending.append((li, self.ids[c0:c1], k, _select(h[n * k * B:(n + 1) * k * B], reads)))
            self.pending_rows += k * B
        if self.pending_rows >= self.per_chunk * B:
            self.flush()

    def run_layer(self, li: int, L: int, source, plan, pp, device, bar) -> None:
        """Every chunk of patches at block ``L``: run from ``L`` (and position ``o``) on, reads kept for ``flush``."""
        bk, B = self.bk, self.B
        start = self.corrupt_cache[f"blocks.{L}.hook_resid_pre"]
        clean_act = self._clean_act(L, source, device)
        for c0, c1, o in plan:
            # positions o.. are computed; the metric reads only positions >= o, patches are at >= o
            chunk = self._chunk(c0, c1, o)
            k = len(chunk)
            # a per-head patch at z: the k copies' attention is computed once, z expanded at the hook
            share = self._shares(o, k)
            hook = self._hook(chunk, clean_act[:, o:] if o else clean_act, pp - o if pp is not None and o else pp,
                              share)
            resid_in = start[:, o:].repeat(k, *([1] * (start.ndim - 1)))
            kv = bk.prefix_kv(self.kv_rec, L, o, k) if o else None
            reads = _shift(self.reads, o)
            # the last block's MLP runs only at the read positions (NaN elsewhere: never read)
            once = bk.attention_once(L, k * B, B) if share else contextlib.nullcontext()
            with bk.hooks(fwd_hooks=[(_hook_name(self.site, L), hook)]), bk.last_block_reads(reads) as narrowed, once:
                resid = bk.run_from(resid_in, L, past_kv=kv)
            self.n_calls += 1
            self.n_narrowed += int(narrowed)
            self.n_shared += int(share)
            # keep only the read positions' final residual; unembed many calls at once (reading the
            # unembedding matrix once per flush, not once per call: it dominates small calls)
            self.pending.append((li, self.ids[c0:c1], k, _select(resid, reads)))
            self.pending_rows += k * B
            if self.pending_rows >= self.per_chunk * B:
                self.flush()
            bar.update(k)


def _first_write(differs: torch.Tensor, kind: str, rest: tuple[str, ...], idx, B: int, positions) -> int | None:
    """The first position where the patch of ``idx`` writes an element that differs from the corrupted run's
    (``differs``: their elementwise ``!=``; NaN counts as different), None when it writes none: ``_apply`` of the
    mask onto nothing. Positions are axis 1 of every non-pattern site's activation."""
    written = torch.zeros_like(differs)
    _apply(written, differs, kind, rest, idx, 0, B, positions)
    at = written.reshape(written.shape[0], written.shape[1], -1).any(-1).any(0).nonzero()
    return int(at[0, 0]) if len(at) else None


def _normalized_reads(read_positions, seq: int, device):
    """Read positions as non-negative indices, in the form ``_select`` takes (list or tensor)."""
    if torch.is_tensor(read_positions):
        return read_positions.to(device).long() % seq
    return [int(p) % seq for p in read_positions]


def _shift(reads, o: int):
    if not o or reads is None:
        return reads
    return reads - o if torch.is_tensor(reads) else [p - o for p in reads]


def _plan_chunks(first: list[int], min_read: int, per_chunk: int, B: int = 1, seq: int = 0,
                 call_cost: float = 0.0) -> list[tuple[int, int, int]]:
    """Split the indices into forward calls ``(c0, c1, offset)`` of at most ``per_chunk`` patches; a call
    computes positions ``offset..`` where ``offset = min(first patched position in it, min_read)``.

    Indices patching the same first position share an offset; neighbouring groups are merged into one
    call where that is cheaper, by a cost of ``call_cost`` (one block call's fixed cost: reading the
    weights, launching kernels, in tokens' worth of compute) plus the tokens computed, ``B`` rows per patch
    times the positions from the call's offset (an exact minimum over all splits into consecutive calls).
    With ``call_cost`` 0 every group keeps its own calls."""
    groups: list[tuple[int, int]] = []  # runs of indices patching the same first position
    for i, p in enumerate(first):
        if groups and first[groups[-1][0]] == p:
            groups[-1] = (groups[-1][0], i + 1)
        else:
            groups.append((i, i + 1))
    pieces = [(c0, min(c0 + per_chunk, g1), min(first[c0], min_read)) for g0, g1 in groups
              for c0 in range(g0, g1, per_chunk)]
    if call_cost <= 0 or any(a[2] > b[2] for a, b in zip(pieces, pieces[1:])):
        return pieces
    n = len(pieces)
    best, prev = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):  # best[j]: cheapest calls covering pieces[:j]
        k = 0
        for i in range(j - 1, -1, -1):
            k += pieces[i][1] - pieces[i][0]
            if k > per_chunk:
                break
            cost = best[i] + call_cost + B * k * (seq - pieces[i][2])  # offsets ascend: pieces[i]'s is the least
            if cost < best[j]:
                best[j], prev[j] = cost, i
    plan, j = [], n
    while j:
        i = prev[j]
        plan.append((pieces[i][0], pieces[j - 1][1], pieces[i][2]))
        j = i
    return plan[::-1]


def _site_heads(bk, site: str) -> int:
    """Heads on a site's head axis: key/value heads for ``k``/``v`` (and their inputs ``k_input``/``v_input``)
    under grouped-query attention."""
    kv = bk.n_key_value_heads
    return int(kv) if site in ("k", "v", "k_input", "v_input") and kv else bk.n_heads


def _keep(act, hook, store: dict, name: str) -> None:
    store[name] = act


def _expand_source(src: torch.Tensor, resid: torch.Tensor, site: str, bk, device) -> torch.Tensor:
    """A source activation, checked against the site's activation shape (broadcast over the batch)."""
    B, seq = resid.shape[:2]
    cfg = bk
    kind = SITES[site][1]
    if kind == "vector":
        tail: tuple[int, ...] = (cfg.d_model,)
    elif kind == "head":
        tail = (_site_heads(cfg, site), cfg.d_model if site.endswith("_input") else cfg.d_head)
    else:
        tail = (cfg.n_heads, seq, seq)
    full = (B, seq, *tail) if kind != "pattern" else (B, *tail)
    src = src.to(device=device, dtype=resid.dtype)
    try:
        return src.reshape((1,) * (len(full) - src.ndim) + tuple(src.shape)).expand(full)
    except RuntimeError as e:
        raise ConfigError(f"source activation of shape {tuple(src.shape)} does not broadcast to the {site!r} "
                          f"activation {full}") from e


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
