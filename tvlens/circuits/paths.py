"""Exact path patching of edges on the batched sweep engine."""

from __future__ import annotations

import torch

from tvlens.circuits.gradients import _gather, _prepare, _writers
from tvlens.circuits.graph import Graph, _EdgeFlags, _sender_outputs, graph_of
from tvlens.circuits.results import EdgeScores
from tvlens.errors import ConfigError
from tvlens.positions import prompt_answer_positions
from tvlens.prompts import describe


# --------------------------------------------------------------------------- exact path patching
def _check_edges(edges, graph) -> list[tuple[str, str]]:
    """``edges``: a non-empty list of distinct ``(sender, receiver)`` pairs of names in this model's graph."""
    if isinstance(edges, (str, bytes, dict)) or not hasattr(edges, "__iter__"):
        raise ConfigError(f"edges: expected a list of (sender, receiver) pairs such as [('L0H1', 'L2H0.q')], got "
                          f"{type(edges).__name__} {edges!r:.80}")
    out = []
    for e in edges:
        if isinstance(e, (str, bytes)) or not hasattr(e, "__len__") or len(e) not in (2, 3) \
                or not all(isinstance(x, str) for x in list(e)[:2]):
            raise ConfigError(f"edges: each edge must be a (sender, receiver) pair of names such as ('L0H1', 'L2H0.q') "
                              f"(or a (sender, receiver, score) triple from EdgeScores.top), got {e!r:.80}")
        s, r = e[0], e[1]
        graph.check_edge(s, r)
        out.append((s, r))
    if not out:
        raise ConfigError("edges: expected a non-empty list of (sender, receiver) pairs, got none")
    dup = sorted({e for e in out if out.count(e) > 1})
    if dup:
        raise ConfigError(f"edges: {dup[:3]} given more than once; each edge is patched once, give it once")
    return out


@torch.no_grad()
def path_patching(model, prompts, edges=None, corrupted=None, metric=None, seed: int = 0, batch_size: int = 4096,
                  ci: bool = False, progress: bool = True) -> EdgeScores:
    """Exact path patching of every edge (or the given ``edges``, ``(sender, receiver)`` pairs): the metric
    after adding the sender's clean-minus-corrupted output to that receiver's input only, minus the corrupted
    run's metric (see the module docstring). Built on ``tvlens.sweeps.activation_patching``: one engine call
    per receiver kind (q, k, v, MLP) and layer, all senders stacked along the batch."""
    from tqdm.auto import tqdm

    from tvlens.checks import check_seed

    seed = check_seed(seed, where="path_patching")
    graph = graph_of(model)
    edges = graph.edges if edges is None else _check_edges(edges, graph)  # before any work
    bk, P, C, fn, metric_name = _prepare(model, prompts, corrupted, metric, "path-patch", seed, gradient=False)
    s_idx = {s: i for i, s in enumerate(graph.senders)}
    B = len(P)
    reads = prompt_answer_positions(P)
    answers = P.answers
    L = graph.n_layers
    with _EdgeFlags(bk, graph.mlps):
        cap_names = [f"blocks.{l}.hook_{k}_input" for l in range(L) for k in "q"]
        cap_names += [f"blocks.{l}.hook_mlp_in" for l in range(L)] if graph.mlps else []
        corr_in = bk.capture(C.tokens, cap_names)
        delta = (_sender_outputs(bk, _writers(bk, P.tokens, graph.mlps), graph)
                 - _sender_outputs(bk, _writers(bk, C.tokens, graph.mlps), graph))  # [B, pos, S, d]
        final_k = bk.final_resid(C.tokens)
        corr_pp = fn(bk.unembed(_gather(final_k, reads)), answers).float().cpu()
        clean_m = float(fn(bk.unembed(_gather(bk.final_resid(P.tokens), reads)), answers).float().mean())
        out = torch.full((B, len(edges)), float("nan"))
        e_pos = {e: i for i, e in enumerate(edges)}
        groups = _receiver_groups(edges)
        bar = tqdm(total=len(groups), desc="path patching", disable=not progress, leave=False)
        for (k, l), sset in groups:
            snd = [s for s in graph.senders if s in sset]
            S = len(snd)
            d = delta[:, :, [s_idx[s] for s in snd]].permute(2, 0, 1, 3).reshape(S * B, *delta.shape[1:2], -1)
            if k == "logits":
                res = fn(bk.unembed(_gather(final_k.repeat(S, 1, 1) + d, reads)), answers.repeat(S, 1)).float().cpu()
                vals = (res.view(S, B) - corr_pp[None])[None]
            else:
                base = corr_in[f"blocks.{l}.hook_q_input" if k != "mlp" else f"blocks.{l}.hook_mlp_in"]
                if k != "mlp":
                    base = base[:, :, 0]  # every head's input is the same residual
                pp = _patch_receiver(model, C.tokens, fn, answers, reads, base.repeat(S, 1, 1) + d, k, l, S, batch_size)
                vals = pp - corr_pp[None, None]
            _store(out, e_pos, vals, snd, k, l, graph)
            bar.update(1)
        bar.close()
    res = EdgeScores(scores=out.mean(0), edges=list(edges), method="path-patch", metric=metric_name,
                     n_layers=graph.n_layers, n_heads=graph.n_heads, n_key_value_heads=graph.n_kv_heads,
                     per_prompt=out, prompts=describe(prompts),
                     notes={"seed": seed, "clean_metric": clean_m, "corrupted_metric": float(corr_pp.mean()),
                            "model_fingerprint": bk.fingerprint()})
    return res.with_ci(seed=seed) if ci else res


def _receiver_groups(edges) -> list[tuple[tuple[str, int], set[str]]]:
    """The wanted edges' senders grouped by (receiver kind, layer), in layer order: one engine call each."""
    groups: dict[tuple[str, int], set[str]] = {}
    for s, r in edges:
        k, l, _ = Graph.receiver_layer(r)
        groups.setdefault((k, l), set()).add(s)
    return sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0]))


def _patch_receiver(model, corrupted_tokens, fn, answers, reads, src, k: str, l: int, S: int, batch_size: int):
    """The metric per prompt ``[heads or 1, S, B]`` of the corrupted run with receiver kind ``k`` of layer ``l``
    reading ``src`` (the corrupted input plus one sender's clean-minus-corrupted output, ``S`` senders stacked)."""
    from tvlens.sweeps import activation_patching

    B = len(answers)
    site = {"q": "q_input", "k": "k_input", "v": "v_input", "mlp": "mlp_in"}[k]

    def metric_rep(logits):
        return fn(logits, answers.repeat(S, 1))
    r = activation_patching(model, None, corrupted_tokens.repeat(S, 1), metric_rep, site=site,
                            by=("layer",) if k == "mlp" else ("layer", "head"), layers=[l],
                            read_positions=reads.repeat(S, 1), batch_size=max(batch_size, S * B),
                            progress=False, source={l: src if k == "mlp" else src[:, :, None]},
                            per_prompt=True)
    return r.per_prompt.reshape(-1, S, B).float()


def _store(out: torch.Tensor, e_pos: dict, vals: torch.Tensor, snd: list[str], k: str, l: int, graph: Graph) -> None:
    """Write ``vals [heads or 1, S, B]`` into the columns of ``out [B, edges]`` of the edges that were asked for."""
    for j, s in enumerate(snd):
        if k == "logits":
            out[:, e_pos[(s, "logits")]] = vals[0, j]
        elif k == "mlp":
            if (s, f"MLP{l}") in e_pos:
                out[:, e_pos[(s, f"MLP{l}")]] = vals[0, j]
        else:
            for h in range(graph.receiver_heads(k)):
                e = (s, graph.receiver_name(l, k, h))
                if e in e_pos:
                    out[:, e_pos[e]] = vals[h, j]
