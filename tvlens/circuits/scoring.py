"""Fast scoring methods: node scores (EAP-IG per head/MLP) and edge attribution (EAP, EAP-IG, AtP + GradDrop)."""

from __future__ import annotations

import numpy as np
import torch

from tvlens.backends import get_backend
from tvlens.circuits.gradients import DEFAULT_IG_STEPS, _check_steps, _chunks, _ig_gradients, _prepare, _writers
from tvlens.circuits.graph import (
    Graph,
    _EdgeFlags,
    _has_mlps,
    _receiver_hooks,
    _receiver_kind,
    _sender_outputs,
    check_layers,
    edges_in_layers,
    graph_of,
)
from tvlens.circuits.paths import path_patching
from tvlens.circuits.results import EdgeScores, HeadScores, _per_task
from tvlens.errors import ConfigError
from tvlens.positions import position_mask, prompt_answer_positions
from tvlens.prompts import describe


# --------------------------------------------------------------------------- node scores
def node_attribution(model, P, C, fn, ig_steps: int = DEFAULT_IG_STEPS, batch_size: int = 64, mlps: bool = True,
                     progress: bool = False, grad_drop: bool = False):
    """EAP-IG (or, ``grad_drop``, AtP + GradDrop at ``hook_z``) node estimates on trimmed prompts.

    Returns ``heads [n, layer, head]``, ``mlp [n, layer]`` (None without MLPs), the corrupted metric."""
    from tqdm.auto import tqdm

    bk = get_backend(model)
    steps = _check_steps(ig_steps, model, P)
    mlps = mlps and _has_mlps(bk)
    L = bk.n_layers
    names = [f"blocks.{l}.attn.hook_z" for l in range(L)] + ([f"blocks.{l}.hook_mlp_out" for l in range(L)] if mlps else [])
    heads, mlp_vals, bases = [], [], []
    reads = prompt_answer_positions(P)
    per = max(1, batch_size // (L if grad_drop else steps))
    for sl in tqdm(_chunks(len(P), per), desc="eap-ig" if not grad_drop else "atp+graddrop", disable=not progress,
                   leave=False):
        wc, wk = _writers(bk, P.tokens[sl], mlps), _writers(bk, C.tokens[sl], mlps)
        g, base = _ig_gradients(bk, P.tokens[sl], C.tokens[sl], reads[sl], P.answers[sl], fn, steps, names,
                                drop_groups=L if grad_drop else 0, method="atp" if grad_drop else "eap-ig")
        bases.append(base)

        def est(n, dims):
            d = wc[n] - wk[n]
            if grad_drop:  # AtP*: (1 / (L - 1)) sum over dropped layers of |estimate|, signed by plain AtP
                v = (d[None] * g[n]).sum(dims)
                return v.abs().sum(0) / max(L - 1, 1)
            return (d * g[n]).sum(dims)

        heads.append(torch.stack([est(f"blocks.{l}.attn.hook_z", (1, 3) if not grad_drop else (2, 4))
                                  for l in range(L)], 1).float().cpu())
        if mlps:
            mlp_vals.append(torch.stack([est(f"blocks.{l}.hook_mlp_out", (1, 2) if not grad_drop else (2, 3))
                                         for l in range(L)], 1).float().cpu())
    return torch.cat(heads), (torch.cat(mlp_vals) if mlps else None), float(torch.cat(bases).mean())


def head_scores(model, prompts, method, metric, corrupted, per_task, layers, seed, batch_size, progress, ig_steps,
                grad_drop):
    """``head_attribution(method="eap-ig")`` and ``method="atp", grad_drop=True``: a ``HeadScores``."""

    if grad_drop is not False and grad_drop is not True:
        raise ConfigError(f"grad_drop must be True or False, got {grad_drop!r}")
    if grad_drop and method != "atp":
        raise ConfigError(f"grad_drop=True is AtP*'s GradDrop: use it with method='atp', not method={method!r}")
    if method == "atp" and ig_steps is not None:
        raise ConfigError("ig_steps applies to method='eap-ig'; method='atp' takes one gradient per dropped layer")
    steps = _check_steps(DEFAULT_IG_STEPS if ig_steps is None else ig_steps, model, prompts)
    bk, P, C, fn, metric_name = _prepare(model, prompts, corrupted, metric, method, seed, gradient=True)
    heads, mlp, base = node_attribution(model, P, C, fn, ig_steps=steps, batch_size=batch_size, progress=progress,
                                        grad_drop=grad_drop)
    if layers is not None:
        keep = torch.zeros(bk.n_layers, dtype=torch.bool)
        keep[list(layers)] = True
        heads[:, ~keep] = float("nan")
    labels = prompts.labels.cpu()
    names = list(prompts.task_names)
    by_task, scores = _per_task(heads, labels, names)
    notes = {"seed": seed, "corrupted_metric": base, "layers": list(range(bk.n_layers)) if layers is None else list(layers)}
    if grad_drop:
        notes.update(atp_site="z", grad_drop=True)
    else:
        notes["ig_steps"] = steps
    if mlp is not None:
        notes["mlp"] = _per_task(mlp, labels, names)[1].tolist()
    return HeadScores(scores=scores, method=method, metric=metric_name, task_names=names,
                      per_task=by_task if per_task else None, prompts=describe(prompts), notes=notes)


# --------------------------------------------------------------------------- edge attribution



def edge_attribution(model, prompts, method: str = "eap-ig", corrupted=None, metric=None,
                     ig_steps: int | None = None, seed: int = 0, batch_size: int = 64, per_prompt: bool = True,
                     ci: bool = False, progress: bool = True, positions=None, qk_fix: bool | None = None,
                     layers=None) -> EdgeScores:
    """Score every edge of the graph by ``method``: ``"eap-ig"`` (default, ``ig_steps`` default
    ``DEFAULT_IG_STEPS``), ``"eap"`` (= ``ig_steps=1``) or ``"path-patch"`` (exact, ``path_patching``).

    ``corrupted``: the corrupted prompts (default: in-context labels shuffled, ``shuffle_labels(prompts,
    seed)``). ``metric``: as ``head_attribution`` (default ``"logprob"`` of the answer). ``ci``: add a
    bootstrap interval over prompts (cheap: the per-prompt scores are kept anyway).

    ``positions``: None (every position), ``"query"``, ``"answers"`` (the in-context examples' answer tokens,
    ``tvlens.encoding.representation_mask``) or a boolean mask ``[n, seq]``: the estimate of patching the edge
    only where its receiver reads at those positions (which heads read the task at the query, which write it
    at the examples' answers).

    ``layers``: score only the edges whose two ends are each the embedding, the logits, or a head or MLP of one
    of these layers (a sub-graph: cheaper on a large model, where the QK fix runs once per receiving layer;
    ``faithfulness`` needs the full graph). Under grouped-query attention a key/value head's input is one
    receiver ``L{l}KV{g}.k`` / ``.v`` shared by its query heads (``Graph.query_heads``)."""
    from tvlens.checks import check_seed

    seed = check_seed(seed, where="edge_attribution")
    if method == "path-patch":  # exact: no gradient, no interpolation, every position
        _refuse_for_path_patch(ig_steps, positions, qk_fix)
        sub = None if layers is None else edges_in_layers(graph_of(model), layers)
        return path_patching(model, prompts, edges=sub, corrupted=corrupted, metric=metric, seed=seed, ci=ci,
                             progress=progress)
    steps, batch_size = _edge_steps(method, ig_steps, batch_size, model, prompts)
    bk, P, C, fn, metric_name = _prepare(model, prompts, corrupted, metric, method, seed, gradient=True)
    from tqdm.auto import tqdm

    graph = graph_of(model)
    layers = check_layers(graph, layers)
    edges = graph.edges if layers is None else edges_in_layers(graph, layers)
    used = {r for _, r in edges}
    recv = [x for x in _receiver_hooks(graph) if x[0] in used]
    names = sorted({h for _, h, _, _ in recv if h != "final"})
    qk_fix = _qk_fix_of(qk_fix, method)
    qk_layers = sorted({Graph.receiver_layer(r)[1] for r in used if _receiver_kind(r) in ("q", "k")})
    if qk_fix:
        names += [f"blocks.{l}.attn.hook_pattern" for l in qk_layers]
    s_idx = {s: i for i, s in enumerate(graph.senders)}
    r_idx = {r: i for i, (r, *_) in enumerate(recv)}
    e_s = torch.tensor([s_idx[s] for s, _ in edges])
    e_r = torch.tensor([r_idx[r] for _, r in edges])
    reads = prompt_answer_positions(P)
    pmask = position_mask(prompts, positions, P.tokens.shape[1]).to(P.tokens.device)
    vals, bases = [], []
    with _EdgeFlags(bk, graph.mlps):
        for sl in tqdm(_chunks(len(P), max(1, batch_size // steps)), desc=method, disable=not progress, leave=False):
            with torch.no_grad():
                wk = _writers(bk, C.tokens[sl], graph.mlps)
                delta = (_sender_outputs(bk, _writers(bk, P.tokens[sl], graph.mlps), graph)
                         - _sender_outputs(bk, wk, graph))  # [b, pos, S, d]
            g, base = _ig_gradients(bk, P.tokens[sl], C.tokens[sl], reads[sl], P.answers[sl], fn, steps, names,
                                    final=True, method=method)
            bases.append(base)
            # receiver gradients [b, pos, R, d]
            gr = torch.stack([g[h][:, :, i] if i is not None else g[h] for _, h, i, _ in recv], 2)
            m = torch.einsum("bpsd,bprd,bp->bsr", delta.float(), gr.float(), pmask[sl].float())  # sender x receiver
            if qk_fix:
                _qk_fix_edges(bk, graph, C.tokens[sl], delta * pmask[sl][:, :, None, None].to(delta.dtype), g, m,
                              s_idx, r_idx, qk_layers, None if layers is None else {s for s, _ in edges})
            vals.append(m[:, e_s, e_r].cpu())
    pp = torch.cat(vals)
    res = EdgeScores(scores=pp.mean(0), edges=edges, method=method, metric=metric_name, n_layers=graph.n_layers,
                     n_heads=graph.n_heads, n_key_value_heads=graph.n_kv_heads,
                     per_prompt=pp if per_prompt or ci else None,
                     prompts=describe(prompts), notes={"ig_steps": steps, "seed": seed, "qk_fix": qk_fix, "layers": layers,
                                                       "model_fingerprint": get_backend(model).fingerprint(),
                                                        "positions": positions if positions is None or isinstance(
                                                            positions, str) else "mask",
                                                        "corrupted_metric": float(torch.cat(bases).mean())})
    res = res.with_ci(seed=seed) if ci else res
    if not per_prompt:
        res.per_prompt = None
    return res


def _qk_fix_of(qk_fix, method: str) -> bool:
    if qk_fix is None:
        return method == "eap-ig"
    if qk_fix is not True and qk_fix is not False:
        raise ConfigError(f"qk_fix must be True or False, got {qk_fix!r}")
    return qk_fix


def _refuse_for_path_patch(ig_steps, positions, qk_fix) -> None:
    """Options of the gradient methods that exact path patching would silently ignore."""
    from tvlens.checks import check_unused

    why = "method='path-patch' patches each edge exactly"
    check_unused("ig_steps", ig_steps, None, where="edge_attribution", because=why + " (no integrated gradients)")
    check_unused("positions", positions, None, where="edge_attribution",
                 because=why + " at every position; restrict positions with method='eap-ig'")
    check_unused("qk_fix", qk_fix, None, where="edge_attribution", because=why + " (no attention linearisation)")


def _edge_steps(method, ig_steps, batch_size, model, prompts) -> tuple[int, int]:
    """The gradient steps of ``method`` (``"eap"``: one) and the batch size, refusing options it cannot take."""
    from tvlens.checks import check_batch_size

    if not isinstance(method, str) or method not in ("eap", "eap-ig"):
        raise ConfigError(f"method must be 'eap-ig', 'eap' or 'path-patch', got {method!r}")
    if method == "eap":
        if ig_steps is not None and not (isinstance(ig_steps, (int, np.integer)) and not isinstance(ig_steps, bool)
                                         and int(ig_steps) == 1):
            raise ConfigError(f"ig_steps: method='eap' is one gradient (ig_steps=1), got ig_steps={ig_steps!r}; "
                              "use method='eap-ig' for more steps")
        steps = 1
    else:
        steps = _check_steps(DEFAULT_IG_STEPS if ig_steps is None else ig_steps, model, prompts)
    return steps, check_batch_size(batch_size, where="edge_attribution", allow_none=False)


@torch.no_grad()
def _qk_fix_edges(bk, graph: Graph, corr_x, delta, g, m, s_idx, r_idx, layers, senders=None) -> None:
    """Overwrite ``m[b, sender, receiver]`` for the q and k receivers of ``layers`` with the AtP* QK-fixed estimate
    (of the edges from ``senders``; default all). A key/value head's estimate sums its group's query heads."""
    H = graph.n_heads
    cap = bk.capture(corr_x, [f"blocks.{l}.{n}" for l in layers for n in
                              ("hook_resid_pre", "attn.hook_pattern", "attn.hook_q", "attn.hook_k")])
    b = delta.shape[0]
    old_split = bk.set_use_split_qkv_input(False)  # one residual input for q, k and v: the fork is not needed
    try:
        for l in layers:
            snd = [s for s in graph.senders if graph.upstream(s, f"L{l}H0.q") and (senders is None or s in senders)]
            if not snd:
                continue
            idx = [s_idx[s] for s in snd]
            S = len(idx)
            d = delta[:, :, idx].permute(2, 0, 1, 3).reshape(S * b, delta.shape[1], -1)  # [S*b, pos, d]
            base = cap[f"blocks.{l}.hook_resid_pre"]
            start = base.repeat(S, 1, 1) + d.to(base.dtype)
            a_k = cap[f"blocks.{l}.attn.hook_pattern"]  # [b, head, q, k]
            ga = g[f"blocks.{l}.attn.hook_pattern@0"]  # linearised after the softmax at the corrupted run
            for kind in "qk":
                # the sender reaches this receiver only: the other side keeps the corrupted run's value, and the
                # block stops at its pattern (no values, output projection or MLP computed)
                keep = cap[f"blocks.{l}.attn.hook_{'k' if kind == 'q' else 'q'}"]

                def fixed(act, hook, _c=keep, _S=S):
                    return _c.repeat(_S, *([1] * (_c.ndim - 1))).to(act.dtype)
                a_new = bk.attention_pattern(start, l, [(f"blocks.{l}.attn.hook_{'k' if kind == 'q' else 'q'}", fixed)])
                a_new = a_new.reshape(S, b, *a_k.shape[1:])
                est = torch.nan_to_num((a_new - a_k[None]) * ga[None]).sum((3, 4)).float()  # [S, b, head]
                n_r = graph.receiver_heads(kind)
                if n_r != H:  # a key head feeds the patterns of its group's query heads: sum over the group
                    est = est.view(S, b, n_r, H // n_r).sum(-1)
                for h in range(n_r):
                    m[:, idx, r_idx[graph.receiver_name(l, kind, h)]] = est[:, :, h].T
    finally:
        bk.set_use_split_qkv_input(old_split)

