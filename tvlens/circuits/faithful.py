"""Faithfulness: the metric recovered by the circuit of the top-k edges, against random circuits."""

from __future__ import annotations

import math

import numpy as np
import torch

from tvlens.backends import get_backend
from tvlens.circuits.gradients import _gather, _prepare, _writers
from tvlens.circuits.graph import Graph, _EdgeFlags, _receiver_hooks, _sender_outputs, graph_of
from tvlens.circuits.results import EdgeScores, Faithfulness
from tvlens.errors import ConfigError
from tvlens.positions import prompt_answer_positions


def _drop_masks(graph: Graph, keep_masks: torch.Tensor, s_idx: dict[str, int], r_idx: dict[str, int]) -> torch.Tensor:
    """``drop[g, r, s] = 1`` where the edge ``s -> r`` exists and is outside circuit ``g``."""
    exists = torch.zeros(len(r_idx), len(s_idx))
    kept = torch.zeros(keep_masks.shape[0], len(r_idx), len(s_idx))
    for e, (s, r) in enumerate(graph.edges):
        exists[r_idx[r], s_idx[s]] = 1
        kept[:, r_idx[r], s_idx[s]] = keep_masks[:, e].float()
    return exists[None] - kept


class _Rewired:
    """One batched run of ``n`` circuits: every sender's live output is recorded as it is written, and each
    receiver's input gets, for every dropped edge into it, ``replacement - live`` of that edge's sender."""

    def __init__(self, bk, graph: Graph, s_idx, r_idx, dm: torch.Tensor, repl: torch.Tensor, B: int, W_O: torch.Tensor):
        self.bk, self.graph, self.s_idx, self.r_idx, self.W_O = bk, graph, s_idx, r_idx, W_O
        self.dm, self.repl, self.B = dm, repl, B  # dm [n, R, S]; repl [n*B, pos, S, d]
        self.live: dict[int, torch.Tensor] = {}  # sender index -> live output [n*B, pos, d]

    def correction(self, r: int) -> torch.Tensor | None:
        """Sum over dropped senders of (replacement - live) for receiver ``r``: ``[n*B, pos, d]``."""
        idx = [i for i in self.live if bool(self.dm[:, r, i].any())]
        if not idx:
            return None
        d = torch.stack([self.repl[:, :, i] - self.live[i] for i in idx], 2)  # [nB, pos, k, d]
        wts = self.dm[:, r, idx].repeat_interleave(self.B, 0)  # [nB, k]
        return torch.einsum("bpkd,bk->bpd", d, wts)

    def _w_embed(self, act, hook):
        self.live[0] = act

    def _w_z(self, layer: int):
        W_O = self.W_O

        def hook(act, hook):
            o = torch.einsum("bphd,hdm->bphm", act, W_O[layer].to(act.dtype))
            base = self.s_idx[f"L{layer}H0"]
            for h in range(self.graph.n_heads):
                self.live[base + h] = o[:, :, h]
        return hook

    def _w_mlp(self, layer: int):
        def hook(act, hook):
            self.live[self.s_idx[f"MLP{layer}"]] = act
        return hook

    def _r_head(self, layer: int, k: str):
        def hook(act, hook):
            act = act.clone()
            for h in range(self.graph.receiver_heads(k)):
                c = self.correction(self.r_idx[self.graph.receiver_name(layer, k, h)])
                if c is not None:
                    act[:, :, h] = act[:, :, h] + c
            return act
        return hook

    def _r_mlp(self, layer: int):
        def hook(act, hook):
            c = self.correction(self.r_idx[f"MLP{layer}"])
            return act if c is None else act + c
        return hook

    def hooks(self) -> list:
        fwd = [("blocks.0.hook_resid_pre", self._w_embed)]
        for layer in range(self.graph.n_layers):
            fwd += [(f"blocks.{layer}.hook_{k}_input", self._r_head(layer, k)) for k in "qkv"]
            fwd.append((f"blocks.{layer}.attn.hook_z", self._w_z(layer)))
            if self.graph.mlps:
                fwd += [(f"blocks.{layer}.hook_mlp_in", self._r_mlp(layer)), (f"blocks.{layer}.hook_mlp_out", self._w_mlp(layer))]
        return fwd

    def final_resid(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final residual of ``tokens`` (repeated once per circuit), the logits' receiver corrected too."""
        with self.bk.hooks(fwd_hooks=self.hooks()):
            resid = self.bk.final_resid(tokens)
        c = self.correction(self.r_idx["logits"])
        return resid if c is None else resid + c


@torch.no_grad()
def circuit_metric(model, P, C, fn, keep_masks: torch.Tensor, graph: Graph, ablation: str = "corrupted",
                   batch_size: int = 256) -> torch.Tensor:
    """Per-circuit mean metric ``[G]`` of the clean prompts run with every edge outside each circuit
    (``keep_masks [G, n_edges]``, graph edge order) replaced by its corrupted (or mean clean) sender output."""
    bk = get_backend(model)
    s_idx = {s: i for i, s in enumerate(graph.senders)}
    r_idx = {r: i for i, (r, *_) in enumerate(_receiver_hooks(graph))}
    G = keep_masks.shape[0]
    drop = _drop_masks(graph, keep_masks, s_idx, r_idx)
    B = len(P)
    reads = prompt_answer_positions(P)
    out = torch.zeros(G)
    with _EdgeFlags(bk, graph.mlps):
        w_k = _sender_outputs(bk, _writers(bk, C.tokens, graph.mlps), graph)  # [B, pos, S, d]
        if ablation == "mean":
            w_k = _sender_outputs(bk, _writers(bk, P.tokens, graph.mlps), graph).mean(0, keepdim=True).expand_as(w_k)
        per = max(1, batch_size // B)
        W_O = bk.W_O
        for g0 in range(0, G, per):
            g1 = min(G, g0 + per)
            n = g1 - g0
            dm = drop[g0:g1].to(w_k.device, w_k.dtype)  # [n, R, S]
            run = _Rewired(bk, graph, s_idx, r_idx, dm, w_k.repeat(n, 1, 1, 1), B, W_O)
            resid = run.final_resid(P.tokens.repeat(n, 1))
            m = fn(bk.unembed(_gather(resid, reads)), P.answers.repeat(n, 1)).float().cpu()
            out[g0:g1] = m.view(n, B).mean(1)
    return out


def faithfulness(model, prompts, scores: EdgeScores, ks=None, corrupted=None, metric=None, n_random: int = 10,
                 ablation: str = "corrupted", by_abs: bool = True, seed: int = 0, batch_size: int = 256) -> Faithfulness:
    """How much of the clean - corrupted metric gap the circuit of the top-``k`` edges of ``scores`` recovers
    (every other edge patched to the corrupted run's sender output, or ``ablation="mean"``: the mean clean
    output), for each ``k`` of ``ks`` (default: 1, 2, 4, ... and all), against ``n_random`` random circuits of
    each size (seeded). ``metric``/``corrupted`` should be those ``scores`` were computed with."""
    from tvlens.checks import check_seed, check_size, forward_flops

    if not isinstance(scores, EdgeScores):
        raise ConfigError(f"scores: faithfulness needs EdgeScores (tvlens.edge_attribution(model, prompts) or "
                          f"tvlens.path_patching(...)), got {type(scores).__name__}"
                          + ("; head scores rank heads, not edges: a circuit here is a set of edges"
                             if type(scores).__name__ == "HeadScores" else ""))
    seed = check_seed(seed, where="faithfulness")
    graph = graph_of(model)
    edges = graph.edges
    fp = (scores.notes or {}).get("model_fingerprint")
    if fp is not None and fp != get_backend(model).fingerprint():
        raise ConfigError(f"scores: these EdgeScores were computed on another model (fingerprint {fp}, this model "
                          f"{get_backend(model).fingerprint()}): a circuit ranked on one model says nothing about "
                          "another; score this model's edges (tvlens.edge_attribution(model, prompts))")
    if (int(scores.n_layers), int(scores.n_heads)) != (graph.n_layers, graph.n_heads):
        raise ConfigError(f"scores: these EdgeScores are of a {scores.n_layers} x {scores.n_heads} model, this model "
                          f"is {graph.n_layers} x {graph.n_heads}: score this model's edges")
    if list(scores.edges) != edges:
        raise ConfigError("scores: these EdgeScores do not cover this model's full edge graph "
                          f"({len(scores.edges)} edges scored, the graph has {len(edges)}): score all edges")
    if ablation not in ("corrupted", "mean"):
        raise ConfigError(f"ablation must be 'corrupted' or 'mean', got {ablation!r}")
    n = len(edges)
    if ks is None:
        ks = sorted({min(n, 2 ** i) for i in range(int(math.log2(n)) + 2)})
    ks = [ks] if isinstance(ks, (int, np.integer)) else list(ks)
    from tvlens.checks import _is_int

    bad = [k for k in ks if not _is_int(k) or not 0 <= int(k) <= n]
    if bad or not ks:
        raise ConfigError(f"ks: circuit sizes must be integers in 0..{n} (the graph has {n} edges), got {bad or ks}")
    ks = [int(k) for k in ks]
    bk0 = get_backend(model)
    tokens = getattr(prompts, "tokens", None)
    n_tok = 0 if tokens is None else tokens.numel()
    n_random = check_size(n_random, "n_random", minimum=0, where="faithfulness",
                          flops_each=len(ks) * forward_flops(n_tok, n_layers=int(bk0.n_layers), d_model=int(bk0.d_model),
                                                             d_vocab_out=int(bk0.d_vocab_out),
                                                             seq=1 if tokens is None else tokens.shape[1]),
                          bytes_each=len(ks) * n * 1.0,
                          hint="random circuits per size (their forward passes are the cost)")
    bk, P, C, fn, metric_name = _prepare(model, prompts, corrupted, metric, "faithfulness", seed, gradient=False)
    with torch.no_grad():
        reads = prompt_answer_positions(P)
        clean_pp = fn(bk.unembed(_gather(bk.final_resid(P.tokens), reads)), P.answers).float().cpu()
        corr_pp = fn(bk.unembed(_gather(bk.final_resid(C.tokens), reads)), P.answers).float().cpu()
    clean_m, corr_m = float(clean_pp.mean()), float(corr_pp.mean())
    gap_notes = _check_gap(clean_pp, corr_pp, metric_name, seed)  # before any circuit runs
    order = scores.order(by_abs)
    masks = []
    for k in ks:
        m = torch.zeros(n, dtype=torch.bool)
        m[order[:k]] = True
        masks.append(m)
    gen = torch.Generator().manual_seed(seed)
    for k in ks:
        for _ in range(n_random):
            m = torch.zeros(n, dtype=torch.bool)
            m[torch.randperm(n, generator=gen)[:k]] = True
            masks.append(m)
    masks.append(torch.ones(n, dtype=torch.bool))  # the full graph: the clean run (a check)
    masks.append(torch.zeros(n, dtype=torch.bool))  # no edge: the corrupted run's outputs everywhere
    vals = circuit_metric(model, P, C, fn, torch.stack(masks), graph, ablation=ablation, batch_size=batch_size)
    rec = (vals - corr_m) / (clean_m - corr_m)
    K = len(ks)
    return Faithfulness(ks=ks, recovered=rec[:K], random=rec[K:K + K * n_random].view(K, n_random), n_edges=n,
                        clean_metric=clean_m, corrupted_metric=corr_m, ablation=ablation, method=scores.method,
                        notes={"full_graph_recovered": float(rec[-2]), "empty_graph_recovered": float(rec[-1]),
                               "seed": seed, "metric": metric_name, "by_abs": by_abs, **gap_notes})


GAP_RTOL = 1e-4  # |clean - corrupted| at or below this times max(1, |clean|, |corrupted|): numerically equal


def _check_gap(clean_pp: torch.Tensor, corr_pp: torch.Tensor, metric_name: str, seed: int) -> dict:
    """Refuse a clean - corrupted gap too small to divide by; notes with the gap's bootstrap 95% interval over
    prompts and, where that interval holds 0, a warning that the recovered fractions are noise."""
    clean_m, corr_m = float(clean_pp.mean()), float(corr_pp.mean())
    gap = clean_m - corr_m
    scale = max(1.0, abs(clean_m), abs(corr_m))
    if not math.isfinite(gap) or abs(gap) <= GAP_RTOL * scale:
        raise ConfigError(
            f"corrupted: the clean and corrupted prompts give the same mean {metric_name} ({clean_m:.6g} vs "
            f"{corr_m:.6g}, gap {gap:.3g}, at most {GAP_RTOL:g} x {scale:.3g} counts as equal), so the fraction of the "
            "gap a circuit recovers is undefined (a division by ~0). Choose corrupted prompts the metric separates "
            "(e.g. corrupted=swap_contexts(prompts)[1] with the clean prompts it returns), or another metric")
    d = (clean_pp - corr_pp).double()
    notes: dict = {"gap": gap}
    if d.numel() >= 2:
        g = torch.Generator().manual_seed(seed)
        means = d[torch.randint(0, d.numel(), (1000, d.numel()), generator=g)].mean(1)
        lo, hi = (float(v) for v in torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)))
        notes["gap_ci"] = [lo, hi]
        if lo <= 0 <= hi:
            notes["gap_warning"] = (f"the clean - corrupted gap {gap:.3g} is not distinguishable from 0 over "
                                    f"{d.numel()} prompts (95% bootstrap interval [{lo:.3g}, {hi:.3g}], seed {seed}): "
                                    "the recovered fractions divide by noise")
    return notes
