"""The report in a real browser: headless Chromium (Debian's ``chromium``) with all network blocked.

Every view must draw (plotly figures have their SVG and traces; CircuitsVis views their canvases or
token spans), no console error, no request may leave the page, and a prompt whose tokens hold
``<script>`` and quote characters is shown as text and never run. A screenshot of the page is saved
(``$TVLENS_SCREENSHOT`` or the test's temporary folder).

Chromium comes from Debian (``make test`` installs it: ``apt-get install -y chromium``); this
test installs it the same way when it is missing and it runs as root. Playwright drives it through
``executable_path``; it never downloads a browser.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import tvlens
from tvlens.views import circuits, page, plots
from tvlens.views.report import build_report

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS_TOKENS = ['</script><script>window.__xss=1</script>', '"><svg/onload=window.__xss=2>', "'><img/src=x/onerror=window.__xss=4>",
              "it's \"quoted\" & <b>bold</b>"]


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:  # as CI does (see Makefile)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        path = shutil.which("chromium")
        if path:
            return path
    pytest.fail("headless Chromium is needed: install Debian's package (apt-get install -y chromium; `make test` does)")


@pytest.fixture(autouse=True, scope="module")
def _hostile_task_names_on_purpose():
    """The XSS prompts rename a task to a hostile string: no longer the model's family, deliberately."""
    from tvlens.validate import unchecked

    with unchecked("family"):
        yield


def xss_prompts(prompts):
    """The same prompts with three vocabulary entries (tokens of prompt 0) replaced by markup."""
    vocab = list(prompts.vocab)
    toks = prompts.tokens[0].tolist()
    for tok, evil in zip(dict.fromkeys(toks), XSS_TOKENS):
        vocab[tok] = evil
    names = list(prompts.task_names)
    names[0] = '<script>window.__xss = 3</script>"task'
    return replace(prompts, vocab=vocab, task_names=names)


@pytest.fixture(scope="module")
def report_file(tmp_path_factory):
    from tvlens.cli import _threads

    with _threads(1):  # as `tvlens report` runs it: tiny models, a shared machine
        rep = build_report("default", n_per_task=12, patching_per_task=12, emergence_steps=3, emergence_per_task=11,
                           tsne_max_points=60, top_k=4)
    from tvlens.models import load_model

    m = load_model("default")
    evil = xss_prompts(rep.results["prompts"])
    rep.page.add(circuits.attention_heads_view(m, evil, [(3, 0), (2, 1)], prompt=0), "XSS: attention")
    rep.page.add(circuits.colored_tokens_view(circuits.prompt_tokens(evil, 0), torch.linspace(-1, 1, evil.seq_len)),
                 "XSS: tokens")
    rep.page.add(circuits.circuit_view(rep.results["head_scores"], m, evil, prompt=0, k=4), "XSS: circuit")
    dec = replace(rep.results["decodability"], task_names=evil.task_names)
    rep.page.add(plots.td_heatmap_figure(dec), "XSS: plot labels")
    # the report itself: every view and a summary
    kinds = [sec.fragment.kind for sec in rep.page.sections]
    assert kinds.count("plot") == 11 + 1 and kinds.count("attention") == 1 + 1 and kinds.count("circuit") == 1 + 1
    top = rep.results["head_scores"].top(1)[0]
    assert "patching at answers (replace)" in rep.summary and "patching_answers" in rep.results
    assert "best layer" in rep.summary and "grid means" in rep.summary and f"top heads (dla): L{top[0]}H{top[1]}" in rep.summary
    assert len(rep.results["emergence"].steps) == 3
    path = tmp_path_factory.mktemp("report") / "report.html"
    rep.save(path)
    return path, rep


def test_report_renders_offline_in_chromium(report_file, tmp_path):
    from playwright.sync_api import sync_playwright

    path, rep = report_file
    exe = chromium_path()
    requests, blocked, errors = [], [], []
    shot = Path(os.environ.get("TVLENS_SCREENSHOT", tmp_path / "report.png"))
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(tempfile.mkdtemp(prefix="tvlens-chromium-"), executable_path=exe,
                                                    headless=True, args=CHROMIUM_ARGS,
                                                    viewport={"width": 1280, "height": 900})
        try:
            def route(r):
                url = r.request.url
                requests.append(url)
                if url.startswith(("file:", "data:", "blob:")):
                    r.continue_()
                else:
                    blocked.append(url)
                    r.abort()

            ctx.route("**/*", route)
            pg = ctx.new_page()
            pg.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
            pg.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            pg.on("request", lambda r: requests.append(r.url))
            pg.goto(path.as_uri())
            # every plot has drawn its SVG and every CircuitsVis box has content
            pg.wait_for_function("""() =>
                [...document.querySelectorAll('.tvlens-plotly')].every(d => d.querySelector('svg.main-svg')) &&
                [...document.querySelectorAll('.tvlens-circuitsvis')].every(d => d.children.length > 0)""",
                                 timeout=60_000)
            pg.wait_for_timeout(500)
            state = pg.evaluate(r"""() => {
              const blank = c => { const b = document.createElement('canvas'); b.width = c.width; b.height = c.height;
                                   return c.toDataURL() === b.toDataURL(); };
              const plots = [...document.querySelectorAll('.tvlens-plotly')].map(d => ({
                 traces: (d._fullData || []).length,
                 drawn: d.querySelectorAll('.cartesianlayer .trace, .heatmaplayer image, .cartesianlayer image').length,
                 w: d.getBoundingClientRect().width, h: d.getBoundingClientRect().height}));
              const cv = [...document.querySelectorAll('.tvlens-circuitsvis')].map(d => ({
                 component: d.dataset.component,
                 canvases: d.querySelectorAll('canvas').length,
                 drawnCanvases: [...d.querySelectorAll('canvas')].filter(c => c.width > 0 && !blank(c)).length,
                 text: d.innerText}));
              return {plots, cv, xss: window.__xss === undefined ? null : window.__xss,
                      injected: document.querySelectorAll(
                          'img[onerror], svg[onload], .tvlens-circuitsvis b, .tvlens-circuitsvis script').length,
                      bodyText: document.body.innerText,
                      svgText: [...document.querySelectorAll('svg text')].map(t => t.textContent).join('\n')};
            }""")
            # the interactive circuit view: a top-head button and a click on the score map
            root = pg.locator(".tvlens-circuit").first
            first_shown = root.get_attribute("data-shown")
            buttons = root.locator("button[data-layer]")
            second = buttons.nth(1)
            want = f"L{second.get_attribute('data-layer')}H{second.get_attribute('data-head')}"
            second.click()
            pg.wait_for_timeout(300)
            after_button = root.get_attribute("data-shown")
            pattern_drawn = pg.evaluate("""el => { const c = el.querySelector('[data-component="AttentionPattern"] canvas');
                return !!c && c.width > 0; }""", root.element_handle())
            # a real mouse click on the score map's cell of layer 1, head 2 (layers run top to bottom)
            box = root.locator(".tvlens-plotly .nsewdrag").first.bounding_box()
            pg.mouse.click(box["x"] + box["width"] * 2.5 / 4, box["y"] + box["height"] * 1.5 / 4)
            pg.wait_for_timeout(300)
            after_click = root.get_attribute("data-shown")
            label = root.locator("b[id]").first.inner_text()
            pg.screenshot(path=str(shot), full_page=True)
        finally:
            ctx.close()

    assert not blocked, f"requests left the page: {blocked}"
    assert all(u.startswith(("file:", "data:", "blob:")) for u in requests), requests
    assert not errors, errors
    n_plots = sum(1 for s in rep.page.sections if "plotly" in s.fragment.libs)
    assert len(state["plots"]) == n_plots >= 12
    for p in state["plots"]:
        assert p["traces"] > 0 and p["drawn"] > 0 and p["w"] > 100 and p["h"] > 100, p
    comps = [c["component"] for c in state["cv"]]
    # + 2 circuit graphs (on both TransformerLens lines: tvlens gives the boot_native bridges of TL 4.x their
    # q/k/v input fork)
    assert "edge_scores" in rep.results
    graphs = 2
    assert comps.count("AttentionHeads") == 2 and comps.count("AttentionPattern") == 2 + graphs
    assert comps.count("ColoredTokensMulti") == 1 and comps.count("ColoredTokens") == 1
    for c in state["cv"]:
        if c["component"].startswith("Attention"):
            assert c["canvases"] > 0 and c["drawnCanvases"] > 0, c
        else:
            assert len(c["text"]) > 20, c
    # the summary is on the page
    assert "best layer" in state["bodyText"] and "top heads" in state["bodyText"]
    # markup in tokens and labels is text: shown, never run, never turned into elements
    assert state["xss"] is None and state["injected"] == 0
    shown = state["bodyText"].replace("\xa0", " ")  # CircuitsVis shows spaces as &nbsp;
    for tok in XSS_TOKENS:
        assert tok in shown, tok
    assert '<script>window.__xss = 3</script>"task' in state["svgText"]
    # choosing a head shows its pattern
    assert first_shown and after_button == want != first_shown and pattern_drawn
    assert after_click == "L1H2" and label.startswith("Attention pattern of L1H2")
    assert shot.stat().st_size > 10_000
    page.reset_notebook_libraries()


def _open_offline(html_path, fn):
    """Open ``html_path`` in headless Chromium with every non-local request blocked; ``fn(page)`` -> result."""
    from playwright.sync_api import sync_playwright

    blocked, errors = [], []
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(tempfile.mkdtemp(prefix="tvlens-chromium-"),
                                                    executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS,
                                                    viewport={"width": 1280, "height": 900})
        try:
            def route(r):
                if r.request.url.startswith(("file:", "data:", "blob:")):
                    r.continue_()
                else:
                    blocked.append(r.request.url)
                    r.abort()

            ctx.route("**/*", route)
            pg = ctx.new_page()
            pg.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
            pg.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            pg.goto(Path(html_path).as_uri())
            out = fn(pg)
        finally:
            ctx.close()
    return out, blocked, errors


def test_circuit_graph_in_chromium(tmp_path):
    """The circuit graph draws offline, its slider changes the number of drawn edges, a click on a head node
    shows that head's attention, and hostile token and task strings stay text."""
    from tvlens.circuits import edge_attribution
    from tvlens.models import load_model
    from tvlens.views.circuit_graph import circuit_graph_view

    m = load_model("default")  # a HookedTransformer on TL 3.9, a boot_native bridge on 4.x: edges on both
    p = tvlens.tasks.get("codes").sample(1, shots=4, seed=3)
    scores = edge_attribution(m, p, method="eap", ci=True, progress=False)
    evil = xss_prompts(p)
    pg_ = page.Page("circuit graph")
    pg_.add(circuit_graph_view(scores, m, evil, prompt=0, k=10), "graph")
    pg_.add(circuit_graph_view(scores, m, evil, prompt=0, k=5), "a second graph: one library copy")
    path = pg_.save(tmp_path / "graph.html")
    text = path.read_text()
    assert text.count('data-tvlens-lib="circuitsvis"') == 1 and "unpkg" not in text.split("</head>")[1]

    def drive(pg):
        pg.wait_for_function("() => [...document.querySelectorAll('.tvlens-graph-attn')].every(d => d.children.length)",
                             timeout=60_000)
        root = pg.locator(".tvlens-circuit-graph").first
        before = int(root.get_attribute("data-drawn-edges"))
        paths = root.locator("path.tvlens-edge").count()
        slider = root.locator("input.tvlens-k")
        slider.fill("40")
        pg.wait_for_timeout(200)
        after = int(root.get_attribute("data-drawn-edges"))
        hover = root.locator("path.tvlens-edge title").first.text_content()
        first_shown = root.get_attribute("data-shown")
        target = "L2H1" if first_shown != "L2H1" else "L3H0"
        root.locator(f'g.tvlens-node[data-node="{target}"]').click()
        pg.wait_for_timeout(300)
        shown = root.get_attribute("data-shown")
        canvas = pg.evaluate("""el => { const c = el.querySelector('.tvlens-graph-attn canvas');
            return !!c && c.width > 0; }""", root.element_handle())
        label = root.locator(".tvlens-graph-attn-label").inner_text()
        pg.screenshot(path=str(Path(os.environ.get("TVLENS_SCREENSHOT_GRAPH", tmp_path / "graph.png"))), full_page=True)
        return dict(before=before, paths=paths, after=after, hover=hover, target=target, shown=shown, canvas=canvas,
                    label=label, xss=pg.evaluate("() => window.__xss === undefined ? null : window.__xss"),
                    injected=pg.evaluate("() => document.querySelectorAll('img[onerror], svg[onload], .tvlens-note b').length"),
                    body=pg.evaluate("() => document.body.innerText"))

    st, blocked, errors = _open_offline(path, drive)
    assert not blocked and not errors, (blocked, errors)
    assert st["before"] == st["paths"] == 10 and st["after"] == 40
    assert "\u2192" in st["hover"] and "[" in st["hover"]  # score and its interval
    assert st["shown"] == st["target"] and st["canvas"] and st["label"].startswith(f"Attention pattern of {st['target']}")
    assert st["xss"] is None and st["injected"] == 0
    task = evil.task_names[int(evil.labels[0])]
    assert "<script>" in task and task in st["body"]  # the hostile task name is shown as text
