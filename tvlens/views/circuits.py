"""CircuitsVis views, offline: attention patterns on a prompt's real tokens, coloured tokens, and the
interactive circuit view (layer x head score map; choosing a head shows its attention pattern).

Every view is a :class:`tvlens.views.page.Fragment` drawn by the CircuitsVis bundle shipped in the
installed ``circuitsvis`` package (``CircuitsVis.render(id, CircuitsVis.<Component>, props)``); the
page holds one copy of it. Props reach the page as escaped JSON, and CircuitsVis puts tokens in the
page as text, so a token like ``<script>`` is shown, never run.
"""

from __future__ import annotations

import html as _html
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float

from tvlens.errors import ConfigError
from tvlens.views.page import Fragment, esc, new_id, plotly_payload, script_json


# --------------------------------------------------------------------------- inputs
def check_prompt_index(prompts, prompt: int, argument: str = "prompt") -> int:
    n = len(prompts)
    if isinstance(prompt, bool) or not isinstance(prompt, (int, np.integer)) or not -n <= int(prompt) < n:
        raise ConfigError(f"{argument}={prompt!r} does not exist: this PromptSet has prompts 0..{n - 1}")
    return int(prompt) % n


def prompt_tokens(prompts, prompt: int = 0, spaced: bool = False, model: Any = None) -> list[str]:
    """The prompt's tokens as strings (its real tokens for token families; ``x0, x1, ...`` for continuous).
    A PromptSet without a vocabulary (``PromptSet.from_tokens``) is shown with ``model.tokenizer``, or as ids.

    ``spaced`` puts a space before every token but the first, for views that run tokens together
    (tvlens vocabularies are whole words without their spaces)."""
    i = check_prompt_index(prompts, prompt)
    tok = getattr(model, "tokenizer", None)
    if "answer_tokens" in prompts.extra and tok is not None and not getattr(tok, "tvlens_word_tokenizer", False):
        # text prompts of a pretrained model: each token as the text it stands for (" Paris", not "ĠParis")
        toks = [tok.decode([int(t)]) for t in prompts.tokens[i]]  # type: ignore[index]
    else:
        toks = ([f"x{p}" for p in range(prompts.seq_len)] if prompts.is_continuous
                else prompts.str_tokens(i, tokenizer=tok))
    return [(" " + t if spaced and j else t) for j, t in enumerate(toks)]


def _model_shape(model) -> tuple[int, int]:
    from tvlens.backends import get_backend

    bk = get_backend(model)
    return bk.n_layers, bk.n_heads


def normalize_heads(heads: Any, n_layers: int, n_heads: int, k: int = 6, argument: str = "heads") -> list[tuple[int, int]]:
    """``heads`` as (layer, head) pairs: a ``HeadScores`` (its ``top(k)``), ``(layer, head[, score])``
    tuples, or None (every head of every layer)."""
    if heads is None:
        return [(L, h) for L in range(n_layers) for h in range(n_heads)]
    if hasattr(heads, "top") and hasattr(heads, "scores"):
        heads = heads.top(k)
    out = []
    for item in heads:
        try:
            L, h = int(item[0]), int(item[1])
        except (TypeError, ValueError, IndexError) as e:
            raise ConfigError(f"{argument}: expected (layer, head) pairs, got {item!r}") from e
        if not (0 <= L < n_layers and 0 <= h < n_heads):
            raise ConfigError(f"{argument}: head ({L}, {h}) does not exist: this model has layers 0..{n_layers - 1} "
                              f"and heads 0..{n_heads - 1}")
        out.append((L, h))
    if not out:
        raise ConfigError(f"{argument} is empty: name at least one (layer, head)")
    return out


@torch.no_grad()
def attention_patterns(model, prompts, prompt: int = 0) -> Float[torch.Tensor, "layer head dest src"]:
    """Every head's attention pattern on one prompt (the whole sequence, answer included)."""
    from tvlens.validate import check_model_prompts

    check_model_prompts(model, prompts, "attention_patterns")
    i = check_prompt_index(prompts, prompt)
    n_layers, _ = _model_shape(model)
    names = {f"blocks.{L}.attn.hook_pattern" for L in range(n_layers)}
    store: dict[str, torch.Tensor] = {}

    def make(n):
        def keep(act, hook):
            store[n] = act[0].float().cpu()
        return keep

    from tvlens.backends import get_backend

    bk = get_backend(model)
    x = prompts.subset([i]).to(bk.input_device).model_input
    if prompts.seq_len > bk.n_ctx:
        raise ConfigError(f"the prompt is {prompts.seq_len} positions long but the model's context is {bk.n_ctx}")
    bk.run_with_hooks(x, fwd_hooks=[(n, make(n)) for n in names])
    return torch.stack([store[f"blocks.{L}.attn.hook_pattern"] for L in range(n_layers)])


# CircuitsVis puts the tokens of these components into the page with innerHTML (React's
# dangerouslySetInnerHTML, after turning whitespace into &nbsp;), so they get HTML-escaped here;
# AttentionHeads and AttentionPattern draw tokens on a canvas (chart.js) as plain text and get them as they are.
_INNER_HTML_TOKENS = {"ColoredTokens", "ColoredTokensMulti"}


def _cv_render(component: str, props: dict, div: str) -> str:
    if component in _INNER_HTML_TOKENS and "tokens" in props:
        props = {**props, "tokens": [_html.escape(str(t), quote=True) for t in props["tokens"]]}
    return f"CircuitsVis.render({script_json(div)}, CircuitsVis.{component}, {script_json(props)});"


def _cv_fragment(component: str, props: dict, title: str, kind: str, caption: str = "") -> Fragment:
    div = new_id("tvl-cv")
    cap = f'<p class="tvlens-note">{esc(caption)}</p>' if caption else ""
    body = (f'<div class="tvlens-view tvlens-cv-view" data-view="{esc(kind)}">{cap}'
            f'<div id="{div}" class="tvlens-circuitsvis" data-component="{esc(component)}"></div>'
            f"<script>{_cv_render(component, props, div)}</script></div>")
    return Fragment(html=body, libs=frozenset({"circuitsvis"}), title=title, kind=kind)


# --------------------------------------------------------------------------- views
def attention_heads_view(model, prompts, heads: Any = None, prompt: int = 0, k: int = 6) -> Fragment:
    """The attention patterns of chosen heads on one prompt, with its tokens (CircuitsVis ``AttentionHeads``).

    ``heads``: a ``HeadScores`` (its top ``k`` heads), a list of ``(layer, head[, score])``, or None
    (all heads).
    """
    n_layers, n_heads = _model_shape(model)
    pairs = normalize_heads(heads, n_layers, n_heads, k=k)
    i = check_prompt_index(prompts, prompt)
    tokens = prompt_tokens(prompts, i, model=model)
    pat = attention_patterns(model, prompts, i)
    att = torch.stack([pat[L, h] for L, h in pairs])  # [heads, dest, src]
    if "answer_len" in prompts.extra:  # text prompts are right-padded: show the prompt up to its answer's end
        end = int(prompts.query_pos[i]) + int(prompts.extra["answer_len"][i]) + 1
        tokens, att = tokens[:end], att[:, :end, :end]
    names = [f"L{L}H{h}" for L, h in pairs]
    task = prompts.task_names[int(prompts.labels[i])]
    return _cv_fragment("AttentionHeads", {"attention": att.numpy().round(4), "tokens": tokens,
                                           "attentionHeadNames": names, "maskUpperTri": True},
                        title=f"Attention of {', '.join(names)} on prompt {i} (task {task})", kind="attention",
                        caption=f"Prompt {i}, task {task}. Choose a head to enlarge it; rows are destination tokens.")


def colored_tokens_view(tokens: Sequence[str], values, labels: Sequence[str] | None = None, title: str = "",
                        caption: str = "") -> Fragment:
    """Per-token values on the tokens (``values [seq]``, or ``[seq, K]`` with ``labels``: a choice of K)."""
    tokens = [str(t) for t in tokens]
    v = values.detach().cpu().float().numpy() if hasattr(values, "detach") else np.asarray(values, dtype=float)
    if v.ndim not in (1, 2) or v.shape[0] != len(tokens):
        raise ConfigError(f"colored_tokens_view: values must have one row per token ({len(tokens)} tokens), got shape "
                          f"{v.shape}")
    if v.ndim == 1:
        lim = float(np.nanmax(np.abs(v))) if v.size else 1.0
        return _cv_fragment("ColoredTokens", {"tokens": tokens, "values": v.round(5), "minValue": -lim, "maxValue": lim},
                            title=title, kind="tokens", caption=caption)
    labels = list(labels) if labels is not None else [str(j) for j in range(v.shape[1])]
    if len(labels) != v.shape[1]:
        raise ConfigError(f"colored_tokens_view: {v.shape[1]} value columns but {len(labels)} labels")
    return _cv_fragment("ColoredTokensMulti", {"tokens": tokens, "values": v.round(5), "labels": labels},
                        title=title, kind="tokens", caption=caption)


def position_sweep_view(sweep, tokens: Sequence[str], normalized: bool = True, title: str = "") -> Fragment:
    """A ``SweepResult`` by ``("layer", "pos")`` as coloured tokens, one choice per layer."""
    if getattr(sweep, "values", None) is None or tuple(getattr(sweep, "axes", ())) != ("layer", "pos"):
        raise ConfigError(f"position_sweep_view needs a SweepResult by ('layer', 'pos'); got axes "
                          f"{getattr(sweep, 'axes', None)!r}")
    v = sweep.normalized() if normalized else sweep.values
    if v.shape[1] != len(tokens):
        raise ConfigError(f"position_sweep_view: the sweep has {v.shape[1]} positions but {len(tokens)} tokens were given")
    layers = (sweep.notes or {}).get("layers", list(range(v.shape[0])))
    what = "(patched - corrupted) / (clean - corrupted)" if normalized else "the metric"
    return colored_tokens_view(tokens, v.T, labels=[f"{sweep.site} layer {L}" for L in layers],
                               title=title or f"Activation patching of {sweep.site} by position",
                               caption=f"Colour: {what} after patching the clean {sweep.site} at that token and layer. "
                                       "Choose a layer; hover a token for every layer's value.")


def circuit_view(scores, model, prompts, prompt: int = 0, k: int = 8, title: str = "") -> Fragment:
    """The interactive circuit view: the layer x head score map (plotly); clicking a head (or a button
    of the top-``k`` list) shows that head's attention pattern on the prompt (CircuitsVis)."""
    import plotly.graph_objects as go

    for a in ("scores", "top"):
        if getattr(scores, a, None) is None:
            raise ConfigError(f"circuit_view needs head scores with `scores [n_layers, n_heads]` and `top(k)`; "
                              f"{type(scores).__name__} has no {a}")
    n_layers, n_heads = _model_shape(model)
    s = scores.scores.detach().cpu().float().numpy() if hasattr(scores.scores, "detach") else np.asarray(scores.scores)
    if s.shape != (n_layers, n_heads):
        raise ConfigError(f"circuit_view: scores have shape {s.shape} but the model has {n_layers} layers x {n_heads} heads")
    i = check_prompt_index(prompts, prompt)
    top = [(int(L), int(h), float(v)) for L, h, v in scores.top(min(k, n_layers * n_heads))]
    normalize_heads(top, n_layers, n_heads, argument="scores.top(k)")
    tokens = prompt_tokens(prompts, i, model=model)
    pat = attention_patterns(model, prompts, i).numpy().round(4)  # [layer, head, dest, src]
    lim = float(np.nanmax(np.abs(s))) or 1.0
    fig = go.Figure(go.Heatmap(z=s, x=[f"H{h}" for h in range(n_heads)], y=[f"L{L}" for L in range(n_layers)],
                               zmin=-lim, zmax=lim, colorscale="RdBu", colorbar=dict(title="score"),
                               hovertemplate="%{y}%{x}: %{z:.4f}<br>click to show its attention<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title_text="layer")
    fig.update_xaxes(title_text="head")
    method = getattr(scores, "method", "")
    fig.update_layout(title=f"Head scores ({method}): click a head", height=340, width=460,
                      margin=dict(l=60, r=20, t=50, b=50))
    data, layout = plotly_payload(fig)
    root, plot_div, pat_div, head_label = new_id("tvl-circuit"), new_id("tvl-plot"), new_id("tvl-cvbox"), new_id("tvl-lbl")
    task = prompts.task_names[int(prompts.labels[i])]
    buttons = "".join(
        f'<button type="button" data-layer="{L}" data-head="{h}">L{L}H{h} {v:+.4f}</button>' for L, h, v in top)
    state = {"patterns": pat, "tokens": tokens, "scores": s, "top": top, "plot": plot_div, "box": pat_div,
             "label": head_label, "root": root}
    js = f"""(function(){{
var S = {script_json(state)};
var root = document.getElementById(S.root);
function show(L, H) {{
  var box = document.getElementById(S.box);
  box.innerHTML = "";
  var d = document.createElement("div");
  d.id = S.box + "-" + L + "-" + H + "-" + Date.now();
  box.appendChild(d);
  CircuitsVis.render(d.id, CircuitsVis.AttentionPattern,
    {{tokens: S.tokens, attention: S.patterns[L][H], maskUpperTri: true, showAxisLabels: true}});
  document.getElementById(S.label).textContent = "Attention pattern of L" + L + "H" + H + " (score " +
    (S.scores[L][H] === null ? "n/a" : S.scores[L][H].toFixed(4)) + ")";
  root.setAttribute("data-shown", "L" + L + "H" + H);
  root.querySelectorAll("button[data-layer]").forEach(function(b) {{
    b.classList.toggle("tvlens-active", +b.dataset.layer === L && +b.dataset.head === H);
  }});
}}
root.querySelectorAll("button[data-layer]").forEach(function(b) {{
  b.addEventListener("click", function() {{ show(+b.dataset.layer, +b.dataset.head); }});
}});
Plotly.newPlot(S.plot, {data}, {script_json(layout)}, {{displaylogo: false}}).then(function(gd) {{
  gd.on("plotly_click", function(ev) {{
    var p = ev.points[0];
    show(parseInt(String(p.y).slice(1)), parseInt(String(p.x).slice(1)));
  }});
}});
if (S.top.length) show(S.top[0][0], S.top[0][1]); else show(0, 0);
}})();"""
    body = (f'<div id="{root}" class="tvlens-view tvlens-circuit" data-view="circuit">'
            f'<p class="tvlens-note">Prompt {i} (task {esc(task)}). Click a head in the map, or one of the top heads, '
            f"to show its attention pattern on this prompt.</p>"
            f'<div style="display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start">'
            f'<div><div id="{plot_div}" class="plotly-graph-div tvlens-plotly"></div>'
            f'<div class="tvlens-heads"><b>Top heads</b><br>{buttons}</div></div>'
            f'<div style="min-width:420px"><b id="{head_label}"></b>'
            f'<div id="{pat_div}" class="tvlens-circuitsvis" data-component="AttentionPattern"></div></div></div>'
            f"<script>{js}</script></div>")
    return Fragment(html=body, libs=frozenset({"plotly", "circuitsvis"}),
                    title=title or f"Circuit view: head scores ({method}) and attention on prompt {i}", kind="circuit")


__all__ = [
    "attention_heads_view",
    "attention_patterns",
    "circuit_view",
    "colored_tokens_view",
    "normalize_heads",
    "position_sweep_view",
    "prompt_tokens",
]
