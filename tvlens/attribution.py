"""Attention-head attribution: which heads write the task and which read it.

``head_attribution(model, prompts, method)`` scores every head (layer x head), per task:

- ``"cie"``: the causal indirect effect of Todd et al. (Function Vectors, 2024). Each prompt's
  in-context labels are shuffled among its examples (the corrupted prompt); one head's output
  (``hook_z``) at the query position is replaced by its mean over the clean prompts of the same task;
  the score is the gain of the correct answer's probability, averaged over prompts. Batched over
  heads through the patching engine (``tvlens.sweeps.activation_patching``).
- ``"ablation"``: zero- or mean-ablate each head (all positions, or the query only) in the clean
  prompts; the score is the metric's *drop* (positive = the head helps), per task.
- ``"patch"``: the exact clean -> corrupted sweep of each head's output at every position (the
  number AtP estimates).
- ``"atp"``: attribution patching (Nanda 2023; Kramar et al. 2024): ``(clean - corrupted) x
  gradient`` for every head from one clean forward, one corrupted forward and one backward. With
  ``atp_site="qkv"`` a head's effect is split into its values, queries and keys; ``qk_fix=True`` (the
  AtP* fix) recomputes the attention softmax exactly with the clean queries (or keys) and linearises
  only after it, instead of through it. ``atp_site="z"`` linearises at the head's output, which holds
  no softmax of its own.
- ``"dla"``: direct logit attribution of each head's output at the query position to the answer's
  logit, through the final layer norm's scale (as TransformerLens' ``apply_ln_to_stack``), from
  ``hook_z`` at the query position only (no per-head results at every position).

Every score map is ``[n_layers, n_heads]``, larger = more important; ``per_task`` is
``[n_tasks, n_layers, n_heads]`` and the headline ``scores`` is its mean over the real (non-null)
tasks, as Todd et al. average the indirect effect over tasks.

What to expect on the shipped models (measured; see tests/test_attribution.py and
benchmarks/bench_attribution.py): on ``categories`` the shuffled-label prompts still show the task
(every label is a word of the task's category), so ``"cie"`` is near zero everywhere there and
``"patch"``/``"ablation"`` are the informative maps; on ``codes`` (default) the labels carry the task
only through the input -> code mapping and ``"cie"`` picks out layer-1 heads. AtP tracks the exact
sweep on ``codes`` (Spearman 0.55-0.67) and on a random GPT-2-small-shaped model (0.92-0.98), but not
on ``bitwise`` (0.07-0.38): there patching a layer-0 head's output raises the answer's log-probability
by 0.73 while its gradient says -0.015 (checked by finite differences), a saturation no first-order
estimate sees.

``function_vector(model, prompts, scores, k)`` sums the top-k heads' mean outputs at the query
(projected by ``W_O``: their contribution to the residual stream), per task, as a ``TaskVectors``
that ``run_patching(..., mode="add")`` takes.
"""

from __future__ import annotations

import functools
import html
from dataclasses import dataclass, field

import torch

from tvlens.accuracy import metric_fn
from tvlens.backends import get_backend
from tvlens.circuits.results import HeadScores, _per_task
from tvlens.encoding import TaskVectors
from tvlens.errors import ConfigError
from tvlens.positions import at_answer_positions, prompt_answer_positions, shuffle_labels, trim_to_answers
from tvlens.prompts import describe

METHODS = ("cie", "ablation", "patch", "atp", "dla", "eap-ig")


# --------------------------------------------------------------------------- inputs




def _check_common(model, prompts, method: str, layers, batch_size):
    from tvlens.accuracy import check_prompts_fit

    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; use one of {list(METHODS)}")
    from tvlens.validate import check_batch_size, int_list

    check_prompts_fit(model, prompts, "head_attribution")
    if prompts.is_continuous:
        raise ConfigError("head_attribution scores answer tokens: these prompts are continuous (regression), "
                          "which it does not support yet")
    n = get_backend(model).n_layers
    layers = int_list(layers, "layers", 0, n - 1, "head_attribution", " (block indices)")
    check_batch_size(batch_size, where="head_attribution")
    return list(range(n)) if layers is None else layers





def _z_at_query(model, tokens, query_pos, layers) -> tuple[torch.Tensor, torch.Tensor]:
    """``hook_z`` at each prompt's query position ``[b, layer, head, d_head]`` (one forward; only that
    position is kept), and the logits."""
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    store: dict[int, torch.Tensor] = {}

    def save(act, hook, _layer):
        store[_layer] = act[rows.to(act.device), query_pos.to(act.device)].detach().to(tokens.device)

    logits = get_backend(model).run_with_hooks(
        tokens, fwd_hooks=[(f"blocks.{L}.attn.hook_z", functools.partial(save, _layer=L)) for L in layers])
    return torch.stack([store[L] for L in layers], 1), logits


# --------------------------------------------------------------------------- head_attribution
DEFAULT_METRIC = {"cie": "prob", "ablation": "logprob", "patch": "logprob", "atp": "logprob", "dla": "logit",
                  "eap-ig": "logprob"}


def _refuse_unused(method: str, corrupted, ablation, positions, atp_site, ig_steps, qk_fix) -> None:
    """Arguments a method does not read are refused, not ignored (a user would believe they took effect)."""
    from tvlens.checks import check_unused

    w, m = "head_attribution", f"method={method!r}"
    if method != "eap-ig":
        check_unused("ig_steps", ig_steps, None, where=w, because=f"only method='eap-ig' integrates gradients, not {m}")
    if method in ("dla", "ablation"):
        check_unused("corrupted", corrupted, None, where=w, because=f"{m} runs the clean prompts only")
    if method != "ablation":
        check_unused("ablation", ablation, "mean", where=w, because=f"it is method='ablation''s, not {m}'s")
        check_unused("positions", positions, "all", where=w, because=f"it is method='ablation''s, not {m}'s")
    if method != "atp":
        check_unused("atp_site", atp_site, "qkv", where=w, because=f"it is method='atp''s, not {m}'s")
        check_unused("qk_fix", qk_fix, True, where=w, because=f"it is method='atp''s, not {m}'s")


def head_attribution(
    model,
    prompts,
    method: str = "cie",
    per_task: bool = True,
    metric=None,
    corrupted=None,
    ablation: str = "mean",
    positions: str = "all",
    atp_site: str = "qkv",
    qk_fix: bool = True,
    layers=None,
    seed: int = 0,
    batch_size: int | None = 256,
    progress: bool = True,
    ig_steps: int | None = None,
    grad_drop: bool = False,
) -> HeadScores:
    """Score every attention head (layer x head) by ``method``; see the module docstring.

    - ``metric``: ``"prob"`` (default for ``"cie"``), ``"logprob"`` (default for ``"ablation"``,
      ``"patch"``, ``"atp"``), ``"logit"`` or ``"accuracy"`` of the query's answer (teacher forced), or a
      callable ``f(logits [b, n_answer, vocab], answers [b, n_answer]) -> [b]``. ``"dla"`` scores the
      logit of the answer's first token at the query position.
    - ``corrupted``: the corrupted prompts of ``"cie"``, ``"patch"`` and ``"atp"`` (default: ``prompts``
      with their in-context labels shuffled, ``shuffle_labels(prompts, seed)``); same layout as ``prompts``.
    - ``ablation``: ``"mean"`` (each position's mean over the prompts) or ``"zero"``; ``positions``:
      ablate at ``"all"`` positions or at the ``"query"`` only.
    - ``atp_site``: ``"qkv"`` (values, queries and keys; ``qk_fix`` selects the AtP* fix), ``"z"`` (the
      head's output), or one of ``"q"``, ``"k"``, ``"v"`` alone (estimates of patching only that input).
    - ``layers``: the blocks to score (others are nan); ``batch_size``: sequences per forward pass.
    - ``"eap-ig"``: integrated gradients at each head's output (``tvlens.circuits``), ``ig_steps`` steps
      (default ``tvlens.circuits.DEFAULT_IG_STEPS``); ``notes["mlp"]`` holds the MLPs' scores ``[layer]``.
      ``grad_drop=True`` with ``"atp"``: AtP* GradDrop at ``hook_z`` (``tvlens.circuits.node_attribution``).
    """
    layers = _check_common(model, prompts, method, layers, batch_size)
    batch_size = batch_size or len(prompts)  # None: all prompts in one batch
    fn, metric, metric_name = _check_options(method, metric, ablation, positions, atp_site, qk_fix)
    from tvlens.validate import check_seed

    seed = check_seed(seed, where="head_attribution")
    _refuse_unused(method, corrupted, ablation, positions, atp_site, ig_steps, qk_fix)
    if method == "eap-ig" or grad_drop:
        from tvlens.circuits import head_scores

        return head_scores(model, prompts, method, metric, corrupted, per_task, layers, seed, batch_size, progress,
                           ig_steps, grad_drop)
    if method in ("cie", "patch", "atp"):
        corrupted = _corrupted_for(model, prompts, corrupted, seed)
    device = get_backend(model).input_device
    P = trim_to_answers(prompts).to(device)
    C = trim_to_answers(corrupted).to(device) if corrupted is not None else None
    labels = prompts.labels.cpu()
    notes: dict = {"layers": layers, "seed": seed}
    vals, per_position = _run_method(model, method, P, C, layers, fn, notes, ablation, positions, atp_site, qk_fix,
                                     batch_size, progress)
    bk = get_backend(model)
    full = _all_layers(vals, len(prompts), bk, layers)
    if per_position is not None:
        per_position = _all_layers(per_position, per_position.shape[0], bk, layers)
    by_task, scores = _per_task(full, labels, list(prompts.task_names))
    return HeadScores(scores=scores, method=method, metric=metric_name, task_names=list(prompts.task_names),
                      per_task=by_task if per_task else None, per_position=per_position, prompts=describe(prompts),
                      notes=notes, per_prompt=full, labels=labels.clone())


def _check_options(method: str, metric, ablation: str, positions: str, atp_site: str, qk_fix):
    """Refuse options ``method`` cannot take; the per-prompt metric, the metric asked for and its name."""
    if method == "dla":
        if metric not in (None, "logit"):
            raise ConfigError(f"method='dla' attributes the answer's logit; metric must be None or 'logit', got {metric!r}")
        metric = "logit"
    metric = DEFAULT_METRIC[method] if metric is None else metric
    fn, metric_name = metric_fn(metric, method)
    if ablation not in ("mean", "zero"):
        raise ConfigError(f"ablation must be 'mean' or 'zero', got {ablation!r}")
    if positions not in ("all", "query"):
        raise ConfigError(f"positions must be 'all' or 'query', got {positions!r}")
    if atp_site not in ("qkv", "z", "q", "k", "v"):
        raise ConfigError(f"atp_site must be 'qkv', 'z', 'q', 'k' or 'v', got {atp_site!r}")
    if not isinstance(qk_fix, bool):
        raise ConfigError(f"qk_fix must be True or False, got {qk_fix!r}")
    return fn, metric, metric_name


def _corrupted_for(model, prompts, corrupted, seed: int):
    """The given corrupted prompts, checked against ``prompts``; by default ``prompts`` with shuffled labels."""
    from tvlens.validate import check_model_prompts

    if corrupted is None:
        return shuffle_labels(prompts, seed)
    check_model_prompts(model, corrupted, "head_attribution (corrupted)")
    if (corrupted.tokens is None or corrupted.tokens.shape != prompts.tokens.shape
            or not torch.equal(corrupted.query_pos.cpu(), prompts.query_pos.cpu())):
        raise ConfigError("corrupted prompts must have the same token shape and query positions as prompts")
    return corrupted


def _run_method(model, method, P, C, layers, fn, notes, ablation, positions, atp_site, qk_fix, batch_size, progress):
    """Per-prompt head scores ``[n, layer, head]`` of ``method`` and its per-position map (or None); what the
    method measured on the way goes into ``notes``."""
    per_position = None
    if method == "cie":
        vals, base = _cie(model, P, C, layers, fn, batch_size, progress)
        notes["shuffled_metric"] = base
    elif method == "ablation":
        vals, base = _ablation(model, P, layers, fn, ablation, positions, batch_size, progress)
        notes.update(ablation=ablation, positions=positions, unablated_metric=base)
    elif method == "patch":
        vals, base, clean = _patch_sweep(model, P, C, layers, fn, batch_size, progress)
        notes.update(corrupted_metric=base, clean_metric=clean)
    elif method == "atp":
        vals, pos_vals, base = _atp(model, P, C, layers, fn, atp_site, qk_fix, batch_size, progress)
        per_position = pos_vals.mean(0)
        notes.update(atp_site=atp_site, qk_fix=qk_fix, corrupted_metric=base)
    else:
        vals, pos_vals, base = _dla(model, P, layers, batch_size, progress)
        per_position = pos_vals.mean(0)
        notes["answer_logit"] = base
    return vals, per_position


def _all_layers(vals: torch.Tensor, n: int, bk, layers: list[int]) -> torch.Tensor:
    """``vals [n, len(layers), head]`` placed in a ``[n, n_layers, n_heads]`` map, nan at the layers not scored."""
    full = torch.full((n, bk.n_layers, bk.n_heads), float("nan"))
    full[:, layers] = vals.float().cpu()
    return full


def _chunks(n: int, batch_size: int):
    return [slice(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]


def _sweep(model, clean_tokens, run_tokens, P, sl, layers, fn, batch_size, progress, **kw):
    """One engine call on prompts ``sl``: per-prompt metric after patching each head, ``[b, layer, head]``,
    and the unpatched run's per-prompt metric ``[b]``."""
    from tvlens.sweeps import activation_patching

    answers = P.answers[sl]

    def metric(logits):
        return fn(logits, answers)

    b = run_tokens.shape[0]
    res = activation_patching(model, clean_tokens, run_tokens, metric, site="z", by=("layer", "head"), layers=layers,
                              read_positions=prompt_answer_positions(P)[sl], batch_size=max(batch_size, b), progress=progress,
                              per_prompt=True, **kw)
    return res.per_prompt.permute(2, 0, 1), res.corrupted_per_prompt, res


@torch.no_grad()
def _cie(model, P, C, layers, fn, batch_size, progress):
    n = len(P)
    zq = torch.cat([_z_at_query(model, P.tokens[sl], P.query_pos[sl], layers)[0] for sl in _chunks(n, batch_size)])
    T = P.n_tasks
    means = torch.zeros(T, *zq.shape[1:], device=zq.device, dtype=zq.dtype)
    for t in range(T):
        m = P.labels == t
        if bool(m.any()):
            means[t] = zq[m].mean(0)
    vals, bases = [], []
    for sl in _chunks(n, batch_size):
        lab = P.labels[sl]
        src = {L: means[lab, li][:, None] for li, L in enumerate(layers)}  # [b, 1, head, d_head]
        patched, base, _ = _sweep(model, None, C.tokens[sl], P, sl, layers, fn, batch_size, progress,
                                  source=src, patch_positions=P.query_pos[sl])
        vals.append(patched - base[:, None, None])
        bases.append(base)
    return torch.cat(vals), float(torch.cat(bases).mean())


@torch.no_grad()
def _ablation(model, P, layers, fn, ablation, positions, batch_size, progress):
    n = len(P)
    if ablation == "mean":
        total = None
        for sl in _chunks(n, batch_size):
            store: dict[int, torch.Tensor] = {}

            def save(act, hook, _layer, _store=store):
                _store[_layer] = act.sum(0).to(P.tokens.device)

            get_backend(model).run_with_hooks(
                P.tokens[sl], stop_at_layer=max(layers) + 1,
                fwd_hooks=[(f"blocks.{L}.attn.hook_z", functools.partial(save, _layer=L)) for L in layers])
            s = torch.stack([store[L] for L in layers])  # [layer, pos, head, d_head]
            total = s if total is None else total + s
        mean = total / n
        src = {L: mean[li][None] for li, L in enumerate(layers)}
    else:
        zero = torch.zeros(1, device=P.tokens.device)
        src = {L: zero for L in layers}
    vals, bases = [], []
    for sl in _chunks(n, batch_size):
        patched, base, _ = _sweep(model, None, P.tokens[sl], P, sl, layers, fn, batch_size, progress, source=src,
                                  patch_positions=P.query_pos[sl] if positions == "query" else None)
        vals.append(base[:, None, None] - patched)  # the drop: positive = the head helps
        bases.append(base)
    return torch.cat(vals), float(torch.cat(bases).mean())


@torch.no_grad()
def _patch_sweep(model, P, C, layers, fn, batch_size, progress):
    vals, bases, cleans = [], [], []
    for sl in _chunks(len(P), batch_size):
        patched, base, res = _sweep(model, P.tokens[sl], C.tokens[sl], P, sl, layers, fn, batch_size, progress)
        vals.append(patched - base[:, None, None])
        bases.append(base)
        cleans.append(res.clean_metric * (sl.stop - sl.start))
    return torch.cat(vals), float(torch.cat(bases).mean()), float(sum(cleans) / len(P))


def _attn_scale(model, layer: int) -> float:
    cfg = model.cfg
    s = float(getattr(cfg, "attn_scale", -1.0) or -1.0)
    if s <= 0:  # a bridge's config leaves it at -1 (the architecture's default, 1/sqrt(d_head))
        s = float(cfg.d_head) ** 0.5
    if not getattr(cfg, "use_attn_scale", True):
        s = 1.0
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        s *= layer + 1
    return s


def _atp(model, P, C, layers, fn, site, qk_fix, batch_size, progress):
    """AtP: one clean forward, one corrupted forward (with gradient), one backward per prompt chunk."""
    from tqdm.auto import tqdm

    parts = {"qkv": ["q", "k", "v"], "z": []}.get(site, [site])
    kinds = ["z"] + parts
    bk = get_backend(model)
    _check_atp_site(bk, site, parts, qk_fix)
    top = max(layers) + 1
    vals, pos_vals, bases = [], [], []
    it = tqdm(_chunks(len(P), batch_size), desc="atp", disable=not progress, leave=False)
    for sl in it:
        names = [f"blocks.{L}.attn.hook_{k}" for L in layers for k in kinds]
        with torch.no_grad():
            clean: dict[str, torch.Tensor] = {}

            def save_clean(act, hook, _name, _s=clean):
                _s[_name] = act.detach()

            bk.run_with_hooks(P.tokens[sl], stop_at_layer=top,
                              fwd_hooks=[(n, functools.partial(save_clean, _name=n)) for n in names])
        corr: dict[str, torch.Tensor] = {}

        def save(act, hook, _name, _s=corr):
            _s[_name] = act
            return act  # returned, so the tensor saved is the one downstream (a bridge hands hooks a view)

        def leaf(act, hook):  # the graph starts here even when the weights are frozen
            return act.detach().requires_grad_(True)

        extra = []
        fix = qk_fix and ("q" in parts or "k" in parts)
        if fix:
            extra = [f"blocks.{L}.attn.hook_{k}" for L in layers for k in ("pattern", "q", "k")
                     if f"blocks.{L}.attn.hook_{k}" not in names]
        hooks = [("blocks.0.hook_resid_pre", leaf)] + [(n, functools.partial(save, _name=n)) for n in names + extra]
        with torch.enable_grad():
            resid = bk.run_with_hooks(C.tokens[sl], stop_at_layer=bk.n_layers, fwd_hooks=hooks)
            x = at_answer_positions(resid, P.query_pos[sl], P.n_answer)
            sel = bk.unembed(x)
            m = fn(sel, P.answers[sl])
            if not torch.is_tensor(m) or not m.requires_grad:
                raise ConfigError("the metric is not differentiable (its value has no gradient): method='atp' needs "
                                  "a metric computed from the logits with differentiable operations")
            grad_names = names + [n for n in extra if n.endswith("pattern")]
            grads = dict(zip(grad_names, torch.autograd.grad(m.sum(), [corr[n] for n in grad_names],
                                                             allow_unused=True)))
            lost = [n for n in names if n.endswith("hook_z") and grads[n] is None]
            if lost:
                from tvlens.errors import TvlensError

                raise TvlensError(f"atp: no gradient reaches {lost[:2]} on this {bk.kind} model, so its scores "
                                  "would be zeros; this is a bug in the backend, please report it")
        bases.append(m.detach().float().cpu())
        by_layer, by_pos = _atp_estimates(model, layers, site, parts, fix, clean, corr, grads)
        vals.append(by_layer)
        pos_vals.append(by_pos)
    return torch.cat(vals), torch.cat(pos_vals), float(torch.cat(bases).mean())


def _check_atp_site(bk, site: str, parts: list[str], qk_fix: bool) -> None:
    if parts:
        kv = bk.n_key_value_heads
        if kv is not None and kv != bk.n_heads:
            raise ConfigError(f"atp_site={site!r} needs one key/value head per query head; use atp_site='z'")
        if qk_fix and bk.positional_embedding_type == "rotary":
            raise ConfigError("qk_fix recomputes softmax(q k^T) from hook_q/hook_k, which come before the rotary "
                              "embedding in this model; use qk_fix=False or atp_site='z'")


@torch.no_grad()
def _atp_estimates(model, layers, site, parts, fix, clean, corr, grads) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clean - corrupted) x gradient`` per head ``[b, layer, head]`` (summed over ``parts``, the AtP* fix for
    q/k with ``fix``) and per position at ``hook_z`` ``[b, pos, layer, head]``."""
    per_layer, per_pos = [], []
    for L in layers:
        zn = f"blocks.{L}.attn.hook_z"
        gz = _g(grads[zn], corr[zn])
        pos = ((clean[zn] - corr[zn].detach()) * gz).sum(-1)  # [b, pos, head]
        per_pos.append(pos)
        if site == "z":
            per_layer.append(pos.sum(1))
            continue
        total = 0
        for k in parts:
            n_ = f"blocks.{L}.attn.hook_{k}"
            if k == "v" or not fix:
                total = total + ((clean[n_] - corr[n_].detach()) * _g(grads[n_], corr[n_])).sum((1, 3))
        if fix:
            total = total + _qk_fix_terms(model, L, clean, corr, grads, parts)
        per_layer.append(total)
    return torch.stack(per_layer, 1).float().cpu(), torch.stack(per_pos, 2).float().cpu()


def _g(grad, act):
    return torch.zeros_like(act) if grad is None else grad


def _qk_fix_terms(model, L, clean, corr, grads, parts) -> torch.Tensor:
    """AtP*'s q and k terms of block ``L``'s heads ``[b, head]``: the attention pattern recomputed
    exactly with the clean queries (keys) and the corrupted keys (queries), times the gradient with
    respect to the pattern."""
    pre = f"blocks.{L}.attn.hook_"
    q, k = corr[pre + "q"].detach(), corr[pre + "k"].detach()
    pattern = corr[pre + "pattern"].detach()
    g = _g(grads[pre + "pattern"], pattern)
    scale = _attn_scale(model, L)
    # the causal scores from hook_q/hook_k themselves (hook_attn_scores is not the same thing on every
    # backend: -inf or -3.4e38 masks, and TransformerLens 4's native bridge fires it after the softmax)
    n_q, n_k = q.shape[1], k.shape[1]
    causal = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(n_k - n_q + 1)
    scores = (torch.einsum("bqhd,bkhd->bhqk", q, k) / scale).masked_fill(causal, float("-inf"))
    if not torch.allclose(torch.softmax(scores, -1), pattern, atol=1e-4, rtol=1e-3):
        raise ConfigError(f"block {L}'s attention scores are not q.k/scale of hook_q and hook_k (a positional "
                          "scheme or soft cap inside the attention): use qk_fix=False or atp_site='z'")
    out = 0
    if "q" in parts:  # all queries patched: every row's softmax recomputed with the clean query
        dq = clean[pre + "q"] - q
        a_q = torch.nan_to_num(torch.softmax(scores + torch.einsum("bqhd,bkhd->bhqk", dq, k) / scale, -1))
        out = out + ((a_q - pattern) * g).sum((2, 3))
    if "k" in parts:  # all keys patched
        dk = clean[pre + "k"] - k
        a_k = torch.nan_to_num(torch.softmax(scores + torch.einsum("bqhd,bkhd->bhqk", q, dk) / scale, -1))
        out = out + ((a_k - pattern) * g).sum((2, 3))
    return out


@torch.no_grad()
def _dla(model, P, layers, batch_size, progress):
    """Direct logit attribution at the query position, from ``hook_z`` and the values there."""
    from tqdm.auto import tqdm

    bk = get_backend(model)
    norm = getattr(model.cfg, "normalization_type", None)
    vals, pos_vals, logits_out = [], [], []
    W_O = bk.W_O[layers]  # [layer, head, d_head, d_model]
    a_heads = bk.n_heads
    it = tqdm(_chunks(len(P), batch_size), desc="dla", disable=not progress, leave=False)
    for sl in it:
        toks, q = P.tokens[sl], P.query_pos[sl]
        rows = torch.arange(toks.shape[0], device=toks.device)
        store: dict[str, torch.Tensor] = {}

        def at_q(act, hook, _name, _s=store):
            _s[_name] = act[rows.to(act.device), q.to(act.device)].to(toks.device)

        def pat_row(act, hook, _name, _s=store):  # [b, head, q, k] -> the query's row
            _s[_name] = act[rows.to(act.device), :, q.to(act.device)].to(toks.device)

        def keep(act, hook, _name, _s=store):
            _s[_name] = act.to(toks.device)

        hooks = []
        for L in layers:
            hooks += [(n, functools.partial(f, _name=n)) for n, f in ((f"blocks.{L}.attn.hook_z", at_q),
                      (f"blocks.{L}.attn.hook_pattern", pat_row), (f"blocks.{L}.attn.hook_v", keep))]
        if norm is not None:
            hooks.append(("ln_final.hook_scale", functools.partial(at_q, _name="ln_final.hook_scale")))
        logits = bk.run_with_hooks(toks, fwd_hooks=hooks)
        ans = P.answers[sl][:, 0]
        logits_out.append(logits[rows.to(logits.device), q.to(logits.device), ans.to(logits.device)].float().cpu())
        d = bk.W_U[:, ans.to(bk.W_U.device)].T.to(toks.device)  # [b, d_model]
        if norm in ("LN", "RMS"):
            d = d * bk.ln_final_weight.to(d.device)
        if norm in ("LN", "LNPre"):
            d = d - d.mean(-1, keepdim=True)  # the layer norm centres its input
        scale = store["ln_final.hook_scale"].reshape(-1) if norm is not None else torch.ones(len(ans), device=d.device)
        wd = torch.einsum("lhem,bm->blhe", W_O.to(d.device), d) / scale[:, None, None, None]  # [b, layer, head, d_head]
        z = torch.stack([store[f"blocks.{L}.attn.hook_z"] for L in layers], 1)  # [b, layer, head, d_head]
        vals.append((z * wd).sum(-1).float().cpu())
        # by source position: z = sum_s pattern[q, s] v_s
        per_pos = []
        for li, L in enumerate(layers):
            v = store[f"blocks.{L}.attn.hook_v"]  # [b, pos, head, d_head] ([.., kv_head, ..] with grouped queries)
            if v.shape[2] != a_heads:
                v = v.repeat_interleave(a_heads // v.shape[2], dim=2)  # query head h reads key/value head h // group
            a = store[f"blocks.{L}.attn.hook_pattern"]  # [b, head, pos]
            per_pos.append(torch.einsum("bhs,bshe,bhe->bsh", a, v, wd[:, li]))
        pos_vals.append(torch.stack(per_pos, 2).float().cpu())  # [b, pos, layer, head]
    return torch.cat(vals), torch.cat(pos_vals), float(torch.cat(logits_out).mean())


# --------------------------------------------------------------------------- function vectors
@dataclass(repr=False)
class FunctionVectors(TaskVectors):
    """Function vectors (Todd et al.): per task, the sum of the chosen heads' mean outputs at the query.

    A ``TaskVectors`` whose vector is the same at every layer ``0..n_layers-1`` (it can be added to the
    residual stream entering any block), so ``run_patching(model, prompts, fv, mode="add")`` tests at
    which layer adding it makes prompts follow its task. ``heads`` lists the ``(layer, head)`` used.
    """

    heads: list = field(default_factory=list)

    def __repr__(self) -> str:
        return f"FunctionVectors(k={len(self.heads)}, heads={self.heads}, tasks={self.task_names}, d_model={self.d_model})"

    def to_dataframe(self):
        """One row per task: its prompt count and the vector's norm."""
        import pandas as pd

        v = self.vectors[0]
        return pd.DataFrame({"task": self.task_names,
                             "n": [int(c) for c in self.counts] if self.counts is not None else None,
                             "norm": v.norm(dim=-1).tolist()})

    def _repr_html_(self) -> str:
        from tvlens.plotting import figure_fragment, result_html

        heads = ", ".join(f"L{L}H{h}" for L, h in self.heads)
        return result_html(f"<div><b>Function vectors</b> ({len(self.heads)} heads: {html.escape(heads)})"
                           + self.to_dataframe().to_html(index=False, float_format=lambda v: f"{v:.4g}") + "</div>",
                           [figure_fragment(self.plot())])

    def plot(self):
        """The heads per layer, cosine similarity between tasks, norms: ``tvlens.views.function_vectors_figure``."""
        from tvlens.plotting import function_vectors_figure

        return function_vectors_figure(self)

    def _extra_meta(self) -> dict:
        return {"heads": [list(h) for h in self.heads]}

    @classmethod
    def _extra_from_meta(cls, meta: dict) -> dict:
        return {"heads": [tuple(h) for h in meta["heads"]]}


@torch.no_grad()
def function_vector(model, prompts, scores: HeadScores | None = None, k: int = 10, heads=None,
                    batch_size: int | None = 256) -> FunctionVectors:
    """Per task, the sum over the top-``k`` heads of ``scores`` (or the given ``heads``, a list of
    ``(layer, head)``) of the head's mean output at the query position over the task's prompts,
    projected by ``W_O`` (its write to the residual stream; the attention bias ``b_O`` is left out)."""
    from tvlens.accuracy import check_prompts_fit
    from tvlens.encoding import model_fingerprint

    bk = get_backend(model)
    nL, nH = bk.n_layers, bk.n_heads
    if (scores is None) == (heads is None):
        raise ConfigError("give either scores (a HeadScores, whose top-k heads are used) or heads, not both")
    if scores is not None:
        if tuple(scores.scores.shape) != (nL, nH):
            raise ConfigError(f"scores map {tuple(scores.scores.shape)} heads but the model has {nL} layers x {nH} "
                              "heads: these scores come from another model")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= nL * nH:
            raise ConfigError(f"k must be an integer in 1..{nL * nH} (the model's number of heads), got {k!r}")
        heads = [(L, h) for L, h, _ in scores.top(k)]
    else:
        heads = [tuple(h) for h in heads]
        bad = [h for h in heads if len(h) != 2 or not (0 <= int(h[0]) < nL and 0 <= int(h[1]) < nH)]
        if bad or not heads:
            raise ConfigError(f"heads must be (layer, head) pairs with layer in 0..{nL - 1} and head in 0..{nH - 1}; "
                              f"got {bad or heads}")
        heads = [(int(L), int(h)) for L, h in heads]
    from tvlens.validate import check_batch_size

    check_prompts_fit(model, prompts, "function_vector")
    batch_size = check_batch_size(batch_size, where="function_vector") or len(prompts)
    if prompts.is_continuous:
        raise ConfigError("function_vector reads token prompts; these prompts are continuous")
    device = bk.input_device
    P = trim_to_answers(prompts).to(device)
    layers = sorted({L for L, _ in heads})
    zq = torch.cat([_z_at_query(model, P.tokens[sl], P.query_pos[sl], layers)[0]
                    for sl in _chunks(len(P), batch_size)])  # [n, layer, head, d_head]
    T = P.n_tasks
    out = torch.zeros(T, bk.d_model, device=device)
    W_O = bk.W_O
    counts = torch.bincount(P.labels, minlength=T).cpu()
    for t in range(T):
        m = P.labels == t
        if not bool(m.any()):
            continue
        mz = zq[m].mean(0)
        for L, h in heads:
            out[t] += mz[layers.index(L), h] @ W_O[L, h].to(device)
    return FunctionVectors(vectors=out[None].expand(nL, T, -1).clone().cpu(), layers=list(range(nL)),
                           task_names=list(prompts.task_names), counts=counts, fingerprint=model_fingerprint(model),
                           d_model=bk.d_model, family=prompts.family, heads=heads)


__all__ = ["FunctionVectors", "HeadScores", "METHODS", "function_vector", "head_attribution", "shuffle_labels"]
