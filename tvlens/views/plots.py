"""Plotly figures for every tvlens result. Each function returns a ``plotly.graph_objects.Figure``;
results' ``.plot()`` call these, and :mod:`tvlens.views.page` draws them offline (plotly.js inline).

A view refuses (``ConfigError``) a result that lacks what it draws, naming what is missing.
"""

from __future__ import annotations

import html
from typing import Any, Mapping, Sequence

import numpy as np

from tvlens.errors import ConfigError

SEQUENTIAL = "Viridis"
DIVERGING = "RdBu"


def _need(obj: Any, attrs: Sequence[str], view: str) -> None:
    missing = [a for a in attrs if getattr(obj, a, None) is None]
    if missing:
        raise ConfigError(f"{view} needs a result with {', '.join(attrs)}; {type(obj).__name__} has no {', '.join(missing)}")


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=float)


def label(text: Any) -> str:
    """Text for plotly labels: plotly reads a few HTML tags in labels, so escape the rest."""
    return html.escape(str(text), quote=False)


def _go():
    import plotly.graph_objects as go

    return go


def _err(est, lo, hi) -> dict | None:
    """Asymmetric plotly error bars from a CI (None when there is none)."""
    if lo is None or hi is None:
        return None
    e, lo, hi = _np(est), _np(lo), _np(hi)
    return dict(type="data", symmetric=False, array=np.clip(hi - e, 0, None).tolist(),
                arrayminus=np.clip(e - lo, 0, None).tolist(), thickness=1.2, width=3)


def _band(fig, x, lo, hi, name: str, color: str | None = None, **where) -> None:
    """A filled CI band between ``lo`` and ``hi`` over ``x`` (drawn first so lines stay on top)."""
    if lo is None or hi is None:
        return
    x = list(x)
    lo, hi = _np(lo).tolist(), _np(hi).tolist()
    fig.add_scatter(x=x + x[::-1], y=hi + lo[::-1], fill="toself", mode="lines", line=dict(width=0),
                    fillcolor=color or "rgba(99,110,250,0.18)", name=name, hoverinfo="skip", showlegend=True, **where)


def _ci_pct(res) -> str:
    info = getattr(res, "ci_info", None) or {}
    return f"{round(100 * info.get('ci', 0.95))}% CI"


# --------------------------------------------------------------------------- accuracy
def accuracy_figure(acc) -> Any:
    """Per-task ICL accuracy (or MSE, next to least squares) as bars."""
    _need(acc, ["task_names", "metric", "per_prompt", "labels"], "accuracy_figure")
    df = acc.to_dataframe()
    go = _go()
    lo, hi = f"{acc.metric}_lo", f"{acc.metric}_hi"
    err = _err(df[acc.metric], df[lo], df[hi]) if lo in df else None
    fig = go.Figure(go.Bar(x=[label(t) for t in df["task"]], y=df[acc.metric], name="model", error_y=err))
    if "least_squares_mse" in df:
        fig.add_bar(x=[label(t) for t in df["task"]], y=df["least_squares_mse"], name="least squares")
    if "basis_aware_mse" in df:
        fig.add_bar(x=[label(t) for t in df["task"]], y=df["basis_aware_mse"], name="basis-aware least squares")
    scoring = (getattr(acc, "notes", None) or {}).get("scoring")
    how = f", {label(str(scoring).replace('_', ' '))} scoring" if scoring else ""
    bars = f"; bars: {_ci_pct(acc)} over prompts" if err is not None else ""
    fig.update_layout(title=f"ICL {acc.metric} per task ({acc.shots}-shot{how}{bars})", yaxis_title=acc.metric,
                      xaxis_title="task")
    if acc.metric == "accuracy":
        fig.update_yaxes(range=[0, 1.02])
    return fig


# --------------------------------------------------------------------------- task decodability
def td_by_layer_figure(source, layer_title: str = "layer (0 = embedding)") -> Any:
    """TD against layer.

    ``source``: a ``DecodabilityResult`` (all tasks, and each task's TD thinner), an
    ``EmergenceResult`` (one line per checkpoint, coloured by training step), or a mapping
    ``{label: DecodabilityResult}`` (one line per entry, e.g. per checkpoint).
    """
    go = _go()
    fig = go.Figure()
    if hasattr(source, "steps") and hasattr(source, "td"):  # EmergenceResult
        _need(source, ["steps", "layers", "td"], "td_by_layer_figure")
        td = _np(source.td)
        if td.shape != (len(source.steps), len(source.layers)):
            raise ConfigError(f"td_by_layer_figure: td has shape {td.shape}, expected (steps, layers) = "
                              f"({len(source.steps)}, {len(source.layers)})")
        steps = list(source.steps)
        import plotly.colors as pc

        cols = pc.sample_colorscale(SEQUENTIAL, [i / max(1, len(steps) - 1) for i in range(len(steps))])
        for i, s in enumerate(steps):
            fig.add_scatter(x=list(source.layers), y=td[i].tolist(), mode="lines+markers", name=f"step {s}",
                            line=dict(color=cols[i], width=3 if i == len(steps) - 1 else 1.5))
        chance = 1.0 / len(source.task_names) if getattr(source, "task_names", None) else None
        title = "Task decodability by layer, one line per checkpoint"
    elif isinstance(source, Mapping):
        if not source:
            raise ConfigError("td_by_layer_figure: the mapping of results is empty")
        chance = None
        for name, res in source.items():
            _need(res, ["layers", "td"], "td_by_layer_figure")
            fig.add_scatter(x=list(res.layers), y=_np(res.td).tolist(), mode="lines+markers", name=label(name))
            chance = getattr(res, "chance", chance)
        title = "Task decodability by layer"
    else:
        _need(source, ["layers", "td", "task_names"], "td_by_layer_figure")
        tci = getattr(source, "td_ci", None)
        fig.add_scatter(x=list(source.layers), y=_np(source.td).tolist(), mode="lines+markers",
                        name="TD (all tasks)" + (f", {_ci_pct(source)}" if tci is not None else ""), line=dict(width=4),
                        error_y=_err(source.td, tci[0], tci[1]) if tci is not None else None)
        if getattr(source, "per_task", None) is not None:
            pt = _np(source.per_task)
            for j, t in enumerate(source.task_names):
                fig.add_scatter(x=list(source.layers), y=pt[:, j].tolist(), mode="lines", name=label(t), opacity=0.6)
        nm = getattr(source, "null_mean", None)
        if nm is not None:  # after the lines, so trace 0 stays the TD line
            q = (getattr(source, "ci_info", None) or {}).get("q", 0.95)
            _band(fig, source.layers, nm, source.null_quantile, f"shuffled-label null (mean to q{round(100 * q)})",
                  "rgba(128,128,128,0.25)")
        chance = source.chance
        title = "Task decodability by layer"
    if chance is not None:
        fig.add_hline(y=chance, line_dash="dot", annotation_text="chance")
    fig.update_layout(title=title, xaxis_title=layer_title, yaxis_title="leave-one-out kNN accuracy",
                      yaxis_range=[0, 1.02])
    fig.update_xaxes(dtick=1)
    return fig


def td_heatmap_figure(dec) -> Any:
    """Per-task TD: task x layer heatmap (0..1)."""
    _need(dec, ["layers", "task_names", "per_task"], "td_heatmap_figure")
    z = _np(dec.per_task).T  # [task, layer]
    go = _go()
    hover = dict(hovertemplate="task %{y}, layer %{x}: TD %{z:.3f}<extra></extra>")
    ci = getattr(dec, "per_task_ci", None)
    if ci is not None:
        c = _np(ci)  # [2, layer, task]
        hover = dict(customdata=np.stack([c[0].T, c[1].T], -1),
                     hovertemplate=f"task %{{y}}, layer %{{x}}: TD %{{z:.3f}} [%{{customdata[0]:.3f}}, "
                                   f"%{{customdata[1]:.3f}}] ({_ci_pct(dec)})<extra></extra>")
    fig = go.Figure(go.Heatmap(z=z, x=[str(L) for L in dec.layers], y=[label(t) for t in dec.task_names], zmin=0,
                               zmax=1, colorscale=SEQUENTIAL, colorbar=dict(title="TD"),
                               text=np.round(z, 2), texttemplate="%{text}", **hover))
    fig.update_layout(title="Task decodability per task and layer", xaxis_title="layer", yaxis_title="task")
    return fig


def encodings_scatter_figure(enc, layer: int | None = None, method: str = "pca", seed: int = 0) -> Any:
    """A 2-D projection (``pca``, ``tsne``, ``umap``) of the query representations at ``layer``, coloured by task."""
    _need(enc, ["acts", "layers", "labels", "task_names"], "encodings_scatter_figure")
    layer = enc.layers[-1] if layer is None else layer
    if layer not in enc.layers:
        raise ConfigError(f"layer={layer!r}: these encodings hold layers {enc.layers}")
    df = enc.project(layer, method, 2, seed)
    go = _go()
    fig = go.Figure()
    cols = df.columns[:2]
    for t in enc.task_names:
        sub = df[df["task"] == t]
        fig.add_scatter(x=sub[cols[0]], y=sub[cols[1]], mode="markers", name=label(t), marker=dict(size=6, opacity=0.8))
    fig.update_layout(title=f"{method.upper()} of the query representation at layer {layer}, coloured by task",
                      xaxis_title=cols[0], yaxis_title=cols[1])
    return fig


# --------------------------------------------------------------------------- patching
def patching_grids_figure(res, what: str = "follows_source", layers: Sequence[int] | None = None) -> Any:
    """Source x target grids of a ``PatchingResult``, one panel per layer."""
    _need(res, ["layers", "source_names", "target_names", what], "patching_grids_figure")
    from plotly.subplots import make_subplots

    layers = list(res.layers if layers is None else layers)
    bad = [L for L in layers if L not in res.layers]
    if bad:
        raise ConfigError(f"layers={bad}: this patching result holds layers {res.layers}")
    grid = _np(getattr(res, what))
    if grid.ndim != 3:
        raise ConfigError(f"patching_grids_figure: {what} must be [layer, source, target], got shape {grid.shape}")
    fig = make_subplots(rows=1, cols=len(layers), subplot_titles=[f"layer {L}" for L in layers],
                        horizontal_spacing=0.03 if len(layers) > 3 else 0.08, shared_yaxes=True)
    rate = what.startswith("follows")
    zmin, zmax = (0.0, 1.0) if rate else (float(np.nanmin(grid)), float(np.nanmax(grid)))
    if hasattr(res, "_ensure_ci"):
        res._ensure_ci()
    gci = getattr(res, "grid_ci", None)
    # grid_ci is the CI of follows_source (token tasks) or of the MSE grid (regression)
    own = gci is not None and (what == "follows_source" or (what == "delta_logprob_source" and res.metric == "mse"))
    for c, L in enumerate(layers):
        li = res.layers.index(L)
        z = grid[li]
        hover = dict(hovertemplate=f"layer {L}<br>source %{{y}} into target %{{x}}: %{{z:.3f}}<extra></extra>")
        if own:
            g = _np(gci)[:, li]
            hover = dict(customdata=np.stack([g[0], g[1]], -1),
                         hovertemplate=f"layer {L}<br>source %{{y}} into target %{{x}}: %{{z:.3f}} "
                                       f"[%{{customdata[0]:.3f}}, %{{customdata[1]:.3f}}] ({_ci_pct(res)})<extra></extra>")
        fig.add_heatmap(z=z, x=[label(t) for t in res.target_names], y=[label(s) for s in res.source_names],
                        zmin=zmin, zmax=zmax, colorscale=SEQUENTIAL if rate else DIVERGING, showscale=c == len(layers) - 1,
                        **hover, row=1, col=c + 1)
        fig.update_xaxes(title_text="target task", row=1, col=c + 1, tickangle=45)
    fig.update_yaxes(title_text="source task (patched vector)", row=1, col=1)
    mode = getattr(res, "mode", "")
    name = "MSE against the prompt's own target" if getattr(res, "metric", "") == "mse" and what == "delta_logprob_source" \
        else what.replace("_", " ")
    fig.update_layout(title=f"Task-vector patching ({mode}): {name}, per layer", height=380)
    return fig


def patching_profile_figure(res) -> Any:
    """Flip rate (other tasks' prompts following the patched task) and own-task control per layer."""
    _need(res, ["layers", "flip_rate", "control"], "patching_profile_figure")
    go = _go()
    fig = go.Figure()
    if hasattr(res, "_ensure_ci"):
        res._ensure_ci()
    fci, cci = getattr(res, "flip_rate_ci", None), getattr(res, "control_ci", None)
    fig.add_scatter(x=list(res.layers), y=_np(res.flip_rate).tolist(), mode="lines+markers", name="flip rate (other tasks)",
                    error_y=_err(res.flip_rate, fci[0], fci[1]) if fci is not None else None)
    fig.add_scatter(x=list(res.layers), y=_np(res.control).tolist(), mode="lines+markers", name="own-task control",
                    error_y=_err(res.control, cci[0], cci[1]) if cci is not None else None)
    if fci is not None:
        fig.update_layout(annotations=[dict(text=f"bars: {_ci_pct(res)}, bootstrap over prompts", xref="paper",
                                            yref="paper", x=0, y=-0.18, showarrow=False)])
    floor = getattr(res, "flip_floor", float("nan"))
    if floor == floor:  # not NaN
        fig.add_hline(y=floor, line_dash="dot", annotation_text="rule-agreement floor")
    fig.update_layout(title=f"Task-vector patching ({getattr(res, 'mode', '')}) by layer", xaxis_title="layer",
                      yaxis_title="fraction of prompts", yaxis_range=[0, 1.02])
    fig.update_xaxes(dtick=1)
    return fig


def patching_figure(res, layer: int | None = None) -> Any:
    """``PatchingResult.plot()``: the grid at one layer (default: the best) next to the layer profile."""
    _need(res, ["layers", "source_names", "target_names", "follows_source"], "patching_figure")
    from plotly.subplots import make_subplots

    layer = res.best_layer() if layer is None else layer
    if layer is None:  # no layer where the patch does anything: show the first
        layer = res.layers[0]
    if layer not in res.layers:
        raise ConfigError(f"layer={layer!r}: this patching result holds layers {res.layers}")
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"follows source rule, layer {layer}", "per layer"))
    fig.add_heatmap(z=_np(res.grid(layer)), x=[label(t) for t in res.target_names], y=[label(s) for s in res.source_names],
                    zmin=0, zmax=1, colorscale=SEQUENTIAL, row=1, col=1)
    if hasattr(res, "_ensure_ci"):
        res._ensure_ci()
    fci, cci = getattr(res, "flip_rate_ci", None), getattr(res, "control_ci", None)
    fig.add_scatter(x=res.layers, y=_np(res.flip_rate).tolist(), name="flip rate (other tasks)", row=1, col=2,
                    error_y=_err(res.flip_rate, *(fci if fci is not None else (None, None))))
    fig.add_scatter(x=res.layers, y=_np(res.control).tolist(), name="own-task control", row=1, col=2,
                    error_y=_err(res.control, *(cci if cci is not None else (None, None))))
    fig.update_xaxes(title_text="target task", row=1, col=1)
    fig.update_yaxes(title_text="source task (patched vector)", row=1, col=1)
    fig.update_xaxes(title_text="layer", row=1, col=2)
    fig.update_layout(title=f"Task-vector patching ({res.mode})")
    return fig


def sweep_figure(sweep) -> Any:
    """An activation-patching sweep: layer x (position | head) heatmap, normalised when possible."""
    _need(sweep, ["values", "axes", "site"], "sweep_figure")
    go = _go()
    v = _np(sweep.values)
    vci = getattr(sweep, "values_ci", None)
    if v.ndim == 1:
        err = _err(v, vci[0], vci[1]) if vci is not None else None
        return go.Figure(go.Bar(y=v.tolist(), x=list(range(len(v))), error_y=err))
    z = v if v.ndim == 2 else v.mean(axis=tuple(range(2, v.ndim)))
    layers = (getattr(sweep, "notes", {}) or {}).get("layers", list(range(z.shape[0])))
    extra = {}
    if vci is not None and v.ndim == 2:  # the CI in each cell's hover text
        lo, hi = _np(vci[0]), _np(vci[1])
        extra = dict(customdata=np.stack([lo, hi], -1),
                     hovertemplate=f"%{{y}}, %{{x}}: %{{z:.4f}} [%{{customdata[0]:.4f}}, %{{customdata[1]:.4f}}] "
                                   f"({_ci_pct(sweep)})<extra></extra>")
    fig = go.Figure(go.Heatmap(z=z, y=[str(L) for L in layers], colorscale=DIVERGING, zmid=sweep.corrupted_metric,
                               colorbar=dict(title="metric"), **extra))
    fig.update_layout(title=f"Activation patching of {sweep.site} by {', '.join(sweep.axes)} (clean "
                            f"{sweep.clean_metric:.3f}, corrupted {sweep.corrupted_metric:.3f})",
                      yaxis_title=sweep.axes[0], xaxis_title=sweep.axes[1])
    return fig


# --------------------------------------------------------------------------- heads
def head_scores_figure(scores, per_task: bool = True, max_tasks: int = 12) -> Any:
    """Layer x head heatmaps of a ``HeadScores``: the overall score, then one panel per task."""
    _need(scores, ["scores"], "head_scores_figure")
    from plotly.subplots import make_subplots

    s = _np(scores.scores)
    if s.ndim != 2:
        raise ConfigError(f"head_scores_figure: scores must be [n_layers, n_heads], got shape {s.shape}")
    if hasattr(scores, "_ensure_ci"):
        scores._ensure_ci()
    sci, tci = getattr(scores, "scores_ci", None), getattr(scores, "per_task_ci", None)
    cis = [None if sci is None else _np(sci)]
    panels = [("all tasks", s)]
    pt = getattr(scores, "per_task", None)
    if per_task and pt is not None:
        pt = _np(pt)
        names = list(getattr(scores, "task_names", None) or [f"task {i}" for i in range(pt.shape[0])])
        if pt.ndim != 3 or pt.shape[1:] != s.shape or len(names) != pt.shape[0]:
            raise ConfigError(f"head_scores_figure: per_task must be [n_tasks, {s.shape[0]}, {s.shape[1]}] with one "
                              f"task name each; got shape {pt.shape} and {len(names)} names")
        panels += [(label(n), pt[i]) for i, n in enumerate(names[:max_tasks])]
        cis += [None if tci is None else _np(tci)[:, i] for i in range(len(names[:max_tasks]))]
    lim = float(np.nanmax(np.abs(np.concatenate([p.ravel() for _, p in panels])))) or 1.0
    cols = min(len(panels), 4)
    rows = (len(panels) + cols - 1) // cols
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[t for t, _ in panels], horizontal_spacing=0.05,
                        vertical_spacing=0.12)
    for i, (t, z) in enumerate(panels):
        c = cis[i] if i < len(cis) else None
        hover = dict(hovertemplate=f"{t}: %{{y}}%{{x}} score %{{z:.4f}}<extra></extra>")
        if c is not None:  # the CI in each head's hover text
            hover = dict(customdata=np.stack([c[0], c[1]], -1),
                         hovertemplate=f"{t}: %{{y}}%{{x}} score %{{z:.4f}} [%{{customdata[0]:.4f}}, "
                                       f"%{{customdata[1]:.4f}}] ({_ci_pct(scores)})<extra></extra>")
        fig.add_heatmap(z=z, x=[f"H{h}" for h in range(z.shape[1])], y=[f"L{L}" for L in range(z.shape[0])],
                        zmin=-lim, zmax=lim, colorscale=DIVERGING, showscale=i == 0, **hover,
                        row=i // cols + 1, col=i % cols + 1)
    for r in range(1, rows + 1):
        for c in range(1, cols + 1):
            fig.update_yaxes(autorange="reversed", row=r, col=c)
    method = ", ".join(label(x) for x in (getattr(scores, "method", ""), getattr(scores, "metric", "")) if x)
    fig.update_layout(title=f"Head scores ({method}): layer x head, overall and per task",
                      height=260 * rows + 80)
    return fig


# --------------------------------------------------------------------------- emergence
def emergence_figure(em) -> Any:
    """Per-task ICL metric and TD per layer against training step (log axis; step 0 drawn at 0.5)."""
    _need(em, ["steps", "task_names", "per_task_metric", "layers", "td"], "emergence_figure")
    from plotly.subplots import make_subplots

    m, td = _np(em.per_task_metric), _np(em.td)
    if m.shape != (len(em.steps), len(em.task_names)) or td.shape != (len(em.steps), len(em.layers)):
        raise ConfigError(f"emergence_figure: per_task_metric {m.shape} and td {td.shape} must be (steps, tasks) and "
                          f"(steps, layers) for {len(em.steps)} steps")
    x = [max(s, 0.5) for s in em.steps]
    if hasattr(em, "_ensure_ci"):
        em._ensure_ci()
    mci, tci = getattr(em, "per_task_metric_ci", None), getattr(em, "td_ci", None)
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"ICL {em.metric} per task", "TD per layer"))
    for j, t in enumerate(em.task_names):
        err = _err(m[:, j], _np(mci)[0][:, j], _np(mci)[1][:, j]) if mci is not None else None
        fig.add_scatter(x=x, y=m[:, j].tolist(), name=label(t), mode="lines+markers", error_y=err, row=1, col=1)
    best = em.best_layer
    for j, L in enumerate(em.layers):
        err = _err(td[:, j], _np(tci)[0][:, j], _np(tci)[1][:, j]) if tci is not None and L == best else None
        fig.add_scatter(x=x, y=td[:, j].tolist(), name=f"TD layer {L}", mode="lines+markers", error_y=err,
                        line=dict(dash="dot" if L != best else "solid", width=3 if L == best else 1.5), row=1, col=2)
    fig.update_xaxes(type="log", title_text="training step")
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    sp = getattr(em, "spearman_ci", None)
    rho = f" (Spearman {em.spearman():.2f} [{sp[0]:.2f}, {sp[1]:.2f}], {_ci_pct(em)})" if sp is not None else ""
    fig.update_layout(title=f"Task encoding emerges with in-context accuracy{rho}")
    return fig


# --------------------------------------------------------------------------- function vectors
def function_vectors_figure(fv) -> Any:
    """A ``FunctionVectors``: the chosen heads per layer, cosine similarity between the tasks' vectors,
    and each task's vector norm."""
    _need(fv, ["vectors", "layers", "task_names", "heads"], "function_vectors_figure")
    from plotly.subplots import make_subplots

    v = _np(fv.vectors)
    if v.ndim != 3 or v.shape[1] != len(fv.task_names):
        raise ConfigError(f"function_vectors_figure: vectors must be [layer, task, d_model] with one task name each; "
                          f"got shape {v.shape} and {len(fv.task_names)} names")
    vec = v[0]  # the same vector at every layer
    norm = np.linalg.norm(vec, axis=-1)
    cos = (vec @ vec.T) / np.maximum(norm[:, None] * norm[None], 1e-12)
    n_layers = max([len(fv.layers), *[int(L) + 1 for L, _ in fv.heads]])
    per_layer = [[f"H{h}" for L, h in fv.heads if int(L) == layer] for layer in range(n_layers)]
    names = [label(t) for t in fv.task_names]
    fig = make_subplots(rows=1, cols=3, column_widths=[0.3, 0.4, 0.3], horizontal_spacing=0.1,
                        subplot_titles=(f"the {len(fv.heads)} heads, per layer", "cosine similarity between tasks",
                                        "norm per task"))
    fig.add_bar(x=list(range(n_layers)), y=[len(h) for h in per_layer], text=[", ".join(h) for h in per_layer],
                name="heads", showlegend=False, hovertemplate="layer %{x}: %{text}<extra></extra>", row=1, col=1)
    fig.add_heatmap(z=cos, x=names, y=names, zmin=-1, zmax=1, colorscale=DIVERGING, colorbar=dict(title="cos", x=0.66),
                    hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>", row=1, col=2)
    fig.add_bar(x=names, y=norm.tolist(), name="norm", showlegend=False, row=1, col=3)
    fig.update_xaxes(title_text="layer", dtick=1, row=1, col=1)
    fig.update_yaxes(title_text="heads", row=1, col=1)
    fig.update_yaxes(autorange="reversed", row=1, col=2)
    fig.update_layout(title=f"Function vectors: sum of {len(fv.heads)} heads' mean outputs at the query")
    return fig


# --------------------------------------------------------------------------- language-model studies
def _r2(fit: Mapping) -> str:
    ci = f" [{fit['r2_lo']:.2f}, {fit['r2_hi']:.2f}]" if "r2_lo" in fit and np.isfinite(fit["r2_lo"]) else ""
    return f"{fit['r2']:.3f}{ci}"


def td_accuracy_figure(res) -> Any:
    """A ``TDAccuracyResult``: ICL accuracy against TD, one point per (family, shots, task), the
    linear fit of each family (and over all points when there are several families)."""
    _need(res, ["rows", "fits"], "td_accuracy_figure")
    if not res.rows:
        raise ConfigError("td_accuracy_figure: the result holds no points (rows is empty)")
    go = _go()
    fig = go.Figure()
    fams = list(dict.fromkeys(r["family"] for r in res.rows))
    import plotly.colors as pc

    cols = pc.qualitative.Plotly
    for i, fam in enumerate(fams):
        pts = [r for r in res.rows if r["family"] == fam]
        x, y = [r["td"] for r in pts], [r["accuracy"] for r in pts]
        ex = _err(x, [r["td_lo"] for r in pts], [r["td_hi"] for r in pts]) if all("td_lo" in r for r in pts) else None
        ey = (_err(y, [r["accuracy_lo"] for r in pts], [r["accuracy_hi"] for r in pts])
              if all("accuracy_lo" in r for r in pts) else None)
        fig.add_scatter(x=x, y=y, mode="markers", name=label(fam), marker=dict(size=9, color=cols[i % len(cols)]),
                        error_x=ex, error_y=ey,
                        text=[label(f"{r['task']}, {r['shots']}-shot") for r in pts],
                        hovertemplate="%{text}: TD %{x:.3f}, accuracy %{y:.3f}<extra></extra>")
        fit = res.fits.get(fam)
        if fit and np.isfinite(fit["slope"]):
            xs = np.array([min(x), max(x)])
            fig.add_scatter(x=xs.tolist(), y=(fit["slope"] * xs + fit["intercept"]).tolist(), mode="lines",
                            line=dict(color=cols[i % len(cols)]), name=f"{label(fam)} fit, R²={_r2(fit)}")
    fit = res.fits.get("all")
    if len(fams) > 1 and fit and np.isfinite(fit["slope"]):
        td = [r["td"] for r in res.rows]
        xs = np.array([min(td), max(td)])
        fig.add_scatter(x=xs.tolist(), y=(fit["slope"] * xs + fit["intercept"]).tolist(), mode="lines",
                        line=dict(dash="dash", color="black"), name=f"all, R²={_r2(fit)}")
    scoring = label(getattr(res, "scoring", ""))
    fig.update_layout(title="ICL accuracy vs task decodability (per task and shot count)",
                      xaxis_title="TD at the best layer", yaxis_title=f"ICL accuracy (exact match, {scoring})",
                      xaxis_range=[-0.02, 1.02], yaxis_range=[-0.02, 1.02])
    return fig


def _arms(results) -> list[tuple[str, Any]]:
    if isinstance(results, Mapping):
        arms = [(str(k), v) for k, v in results.items()]
    elif hasattr(results, "td_before"):
        arms = [("", results)]
    else:
        try:
            arms = [("", r) for r in results]
        except TypeError:
            raise ConfigError(f"finetune_figure needs a FinetuneResult, a list of them or a mapping "
                              f"{{arm: FinetuneResult}}; got {type(results).__name__}") from None
    if not arms:
        raise ConfigError("finetune_figure: no results to draw")
    out = []
    for name, r in arms:
        _need(r, ["blocks", "acc_before", "acc_after", "td_before", "td_after", "losses"], "finetune_figure")
        if not name:
            name = f"blocks {', '.join(map(str, r.blocks))}" + (f" (LoRA r={r.lora_rank})" if r.lora_rank else "")
        out.append((name, r))
    return out


def finetune_figure(results) -> Any:
    """Finetuning arms (a ``FinetuneResult``, a list, or ``{arm: FinetuneResult}``, e.g. first vs last
    half): TD at the best layer and mean ICL accuracy before and after, as bars per arm, and each arm's
    training loss."""
    arms = _arms(results)
    from plotly.subplots import make_subplots

    names = [label(n) for n, _ in arms]
    fig = make_subplots(rows=1, cols=3, subplot_titles=("TD at the best layer", "ICL accuracy (mean, no null)",
                                                        "training loss"))
    for when, color in (("before", "#9aa5b1"), ("after", "#2680c2")):
        td = [getattr(r, f"td_{when}").best_td for _, r in arms]
        acc = [getattr(r, f"acc_{when}").mean for _, r in arms]
        fig.add_bar(x=names, y=td, name=when, legendgroup=when, marker_color=color, row=1, col=1,
                    text=[f"{v:.2f}" for v in td], textposition="outside")
        fig.add_bar(x=names, y=acc, name=when, legendgroup=when, marker_color=color, showlegend=False, row=1, col=2,
                    text=[f"{v:.2f}" for v in acc], textposition="outside")
    for n, r in arms:
        fig.add_scatter(y=list(r.losses), x=list(range(1, len(r.losses) + 1)), mode="lines", name=f"loss, {label(n)}",
                        row=1, col=3)
    fig.update_yaxes(range=[0, 1.1], row=1, col=1)
    fig.update_yaxes(range=[0, 1.1], row=1, col=2)
    fig.update_xaxes(title_text="step", row=1, col=3)
    fam = ", ".join(dict.fromkeys(label(r.family) for _, r in arms))
    steps = ", ".join(dict.fromkeys(str(r.steps) for _, r in arms))
    fig.update_layout(title=f"Finetuning chosen blocks on {fam} ({steps} steps): before and after", barmode="group")
    return fig


__all__ = [
    "accuracy_figure",
    "emergence_figure",
    "encodings_scatter_figure",
    "finetune_figure",
    "function_vectors_figure",
    "head_scores_figure",
    "patching_figure",
    "patching_grids_figure",
    "patching_profile_figure",
    "sweep_figure",
    "td_accuracy_figure",
    "td_by_layer_figure",
    "td_heatmap_figure",
]
