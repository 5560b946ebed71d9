"""The interactive circuit graph: an ``EdgeScores`` drawn as a graph, offline.

Nodes (embedding, every head, every MLP, the logits) sit by layer, bottom to top; each edge is a line from
its sender to its receiver, its width the edge's ``|score|`` and its colour the sign (blue: patching the
edge restores the clean metric, red: the opposite); edges into a head's query, key and value are drawn solid,
dashed and dotted. A slider keeps the top-k edges (by ``|score|``); hovering an edge shows its score and, where
the scores carry one, its confidence interval. With the model and prompts, clicking a head shows its
attention pattern on the prompt, with the prompt's real tokens (CircuitsVis' ``AttentionPattern``, from the
bundle inside the installed package).

The graph is inline SVG drawn by the small script below (no library); only the attention pattern needs
CircuitsVis, which a page inlines once (``tvlens.views.page``). Every string reaches the page as escaped JSON
and is put into the document with ``textContent``, never as HTML.
"""

from __future__ import annotations

from tvlens.errors import ConfigError
from tvlens.views.page import Fragment, esc, new_id, script_json

_JS = r"""(function(){
var S = __STATE__;
var root = document.getElementById(S.root);
var svg = root.querySelector("svg.tvlens-graph");
var NS = "http://www.w3.org/2000/svg";
var slider = root.querySelector("input.tvlens-k");
var kLabel = root.querySelector(".tvlens-k-value");
var W = S.width, H = S.height;
var pos = {};
var rows = S.rows;  // rows[i] = list of node names, bottom (embed) to top (logits)
rows.forEach(function(row, i) {
  var y = H - 30 - i * (H - 60) / (rows.length - 1);
  row.forEach(function(n, j) { pos[n] = [40 + (j + 0.5) * (W - 80) / row.length, y]; });
});
function el(name, attrs) {
  var e = document.createElementNS(NS, name);
  for (var a in attrs) e.setAttribute(a, attrs[a]);
  return e;
}
var gEdges = el("g", {"class": "tvlens-edges"}); svg.appendChild(gEdges);
var gNodes = el("g", {"class": "tvlens-nodes"}); svg.appendChild(gNodes);
var maxAbs = 0;
S.edges.forEach(function(e) { if (e.score !== null) maxAbs = Math.max(maxAbs, Math.abs(e.score)); });
if (!maxAbs) maxAbs = 1;
function fmt(v) { return v === null ? "n/a" : (Math.abs(v) >= 0.01 ? v.toFixed(3) : v.toExponential(2)); }
function draw(k) {
  while (gEdges.firstChild) gEdges.removeChild(gEdges.firstChild);
  var shown = S.order.slice(0, k);
  shown.forEach(function(i) {
    var e = S.edges[i];
    var a = pos[e.sender], b = pos[e.head || e.receiver];
    if (!a || !b) return;
    var mx = (a[0] + b[0]) / 2 + (e.kind === "k" ? 14 : e.kind === "v" ? -14 : 0);
    var line = el("path", {"d": "M" + a[0] + "," + a[1] + " Q" + mx + "," + ((a[1] + b[1]) / 2) + " " + b[0] + "," + b[1],
      "fill": "none", "stroke": e.score >= 0 ? "#2166ac" : "#b2182b",
      "stroke-width": (0.6 + 5 * Math.abs(e.score) / maxAbs).toFixed(2), "stroke-opacity": 0.75,
      "stroke-dasharray": e.kind === "k" ? "6,3" : e.kind === "v" ? "2,3" : "none", "class": "tvlens-edge",
      "data-sender": e.sender, "data-receiver": e.receiver});
    var t = el("title", {});
    t.textContent = e.sender + " \u2192 " + e.receiver + ": " + fmt(e.score) +
      (e.ci ? "  [" + fmt(e.ci[0]) + ", " + fmt(e.ci[1]) + "]" : "");
    line.appendChild(t);
    gEdges.appendChild(line);
  });
  root.setAttribute("data-drawn-edges", String(gEdges.childNodes.length));
  kLabel.textContent = k + " of " + S.edges.length + " edges";
}
S.nodes.forEach(function(n) {
  var p = pos[n.name]; if (!p) return;
  var g = el("g", {"class": "tvlens-node", "data-node": n.name, "transform": "translate(" + p[0] + "," + p[1] + ")"});
  var shape = n.kind === "head" ? el("circle", {"r": 13}) : el("rect", {"x": -24, "y": -11, "width": 48, "height": 22, "rx": 4});
  shape.setAttribute("fill", n.kind === "head" ? "#f0f4f8" : n.kind === "mlp" ? "#fff3c4" : "#e3f8ff");
  shape.setAttribute("stroke", "#52606d");
  g.appendChild(shape);
  var label = el("text", {"text-anchor": "middle", "dy": "4", "font-size": "9", "font-family": "ui-monospace, monospace"});
  label.textContent = n.name;
  g.appendChild(label);
  var t = el("title", {});
  t.textContent = n.name + (n.score === null || n.score === undefined ? "" : ": node score " + fmt(n.score)) +
    (n.kind === "head" && S.patterns ? " (click: attention)" : "");
  g.appendChild(t);
  if (n.kind === "head" && S.patterns) {
    g.style.cursor = "pointer";
    g.addEventListener("click", function() { show(n.layer, n.head); });
  }
  gNodes.appendChild(g);
});
function show(L, Hh) {
  var box = root.querySelector(".tvlens-graph-attn");
  box.innerHTML = "";
  var d = document.createElement("div");
  d.id = S.root + "-attn-" + L + "-" + Hh + "-" + Date.now();
  box.appendChild(d);
  CircuitsVis.render(d.id, CircuitsVis.AttentionPattern,
    {tokens: S.tokens, attention: S.patterns[L][Hh], maskUpperTri: true, showAxisLabels: true});
  root.querySelector(".tvlens-graph-attn-label").textContent = "Attention pattern of L" + L + "H" + Hh + " on the prompt";
  root.setAttribute("data-shown", "L" + L + "H" + Hh);
}
slider.addEventListener("input", function() { draw(+slider.value); });
draw(+slider.value);
if (S.patterns) show(S.first[0], S.first[1]);
})();"""


def _rows(graph) -> list[list[str]]:
    rows = [["embed"]]
    for layer in range(graph.n_layers):
        rows.append([f"L{layer}H{h}" for h in range(graph.n_heads)])
        if graph.mlps:
            rows.append([f"MLP{layer}"])
    return rows + [["logits"]]


def _first_head(scores) -> list[int]:
    """The head of the best-scoring edge that touches a head (sender or receiver), else L0H0."""
    from tvlens.circuits import Graph

    graph = scores.graph
    for i in scores.order(by_abs=True):
        s, r = scores.edges[i]
        for kind, layer, h in (Graph.sender_layer(s), Graph.receiver_layer(r)):
            if h is not None:
                return [layer, h if kind == "head" else graph.query_heads(r)[0]]
    return [0, 0]


def circuit_graph_view(scores, model=None, prompts=None, prompt: int = 0, k: int = 20, title: str = "",
                       head_scores=None, width: int = 760, height: int | None = None) -> Fragment:
    """An ``EdgeScores`` as an interactive graph (see the module docstring); ``k``: edges shown at first (the
    slider goes from 1 to all). ``model`` and ``prompts`` (both or neither): clicking a head shows its
    attention on prompt ``prompt``. ``head_scores``: a ``HeadScores`` whose map labels the head nodes."""
    from tvlens.circuits import EdgeScores, Graph

    if not isinstance(scores, EdgeScores):
        raise ConfigError(f"scores: expected an EdgeScores (tvlens.circuits.edge_attribution), got {type(scores).__name__}")
    n = len(scores.edges)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ConfigError(f"k must be an integer in 1..{n} (the number of scored edges), got {k!r}")
    if (model is None) != (prompts is None):
        raise ConfigError("give both model and prompts (to show a clicked head's attention), or neither")
    graph = scores.graph
    edges = []
    ci = scores.ci
    for i, (s, r) in enumerate(scores.edges):
        kind, layer, h = Graph.receiver_layer(r)
        if h is not None:  # under grouped-query attention a key/value receiver is drawn at its group's first head
            h = graph.query_heads(r)[0]
        edges.append({"sender": s, "receiver": r, "kind": kind, "head": f"L{layer}H{h}" if h is not None else None,
                      "score": float(scores.scores[i]),
                      "ci": [float(ci[0, i]), float(ci[1, i])] if ci is not None else None})
    nodes = []
    hs = None
    if head_scores is not None:
        hs = head_scores.scores
        if tuple(hs.shape) != (graph.n_layers, graph.n_heads):
            raise ConfigError(f"head_scores: a {graph.n_layers} x {graph.n_heads} map expected, got {tuple(hs.shape)}")
    for row in _rows(graph):
        for name in row:
            kind, layer, h = Graph.sender_layer(name) if name != "logits" else ("logits", graph.n_layers, None)
            nodes.append({"name": name, "kind": kind, "layer": layer, "head": h,
                          "score": float(hs[layer, h]) if hs is not None and kind == "head" else None})
    state = {"root": new_id("tvl-graph"), "edges": edges, "order": scores.order(by_abs=True), "nodes": nodes,
             "rows": _rows(graph), "width": width, "height": height or (90 + 60 * (len(_rows(graph)) - 1)),
             "patterns": None, "tokens": None, "first": _first_head(scores)}
    caption = ""
    libs: frozenset[str] = frozenset()
    if model is not None:
        from tvlens.views.circuits import attention_patterns, check_prompt_index, prompt_tokens

        i = check_prompt_index(prompts, prompt)
        state["patterns"] = attention_patterns(model, prompts, i).numpy().round(4)
        state["tokens"] = prompt_tokens(prompts, i)
        task = prompts.task_names[int(prompts.labels[i])]
        caption = f" Click a head to show its attention pattern on prompt {i} (task {task})."
        libs = frozenset({"circuitsvis"})
    root = state["root"]
    head = (f"{scores.method} edge scores, metric {scores.metric}. Blue: patching the edge moves the metric towards "
            "the clean run; red: away. Width: |score|. Into a head: solid = query, dashed = key, dotted = value. "
            "Hover an edge for its score" + (" and 95% interval" if ci is not None else "") + "." + caption)
    body = (f'<div id="{esc(root)}" class="tvlens-view tvlens-circuit-graph" data-view="circuit-graph">'
            f'<p class="tvlens-note">{esc(head)}</p>'
            f'<label>top edges: <input class="tvlens-k" type="range" min="1" max="{n}" value="{k}" step="1"> '
            f'<span class="tvlens-k-value"></span></label>'
            f'<div style="display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start">'
            f'<svg class="tvlens-graph" width="{int(width)}" height="{int(state["height"])}" '
            f'xmlns="http://www.w3.org/2000/svg" role="img"></svg>'
            f'<div style="min-width:380px"><b class="tvlens-graph-attn-label"></b>'
            f'<div class="tvlens-graph-attn tvlens-circuitsvis" data-component="AttentionPattern"></div></div></div>'
            f"<script>{_JS.replace('__STATE__', script_json(state))}</script></div>")
    return Fragment(html=body, libs=libs, title=title or f"Circuit graph ({scores.method}, {n} edges)",
                    kind="circuit-graph")


__all__ = ["circuit_graph_view"]
