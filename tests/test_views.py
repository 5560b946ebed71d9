"""Views: offline pages (each library once), figures that hold the results' numbers, CircuitsVis
props that hold the real tokens and TransformerLens' attention patterns, the report and its CLI,
and clear errors for bad input. The browser check of the rendered report is test_report_browser.py."""

from __future__ import annotations

import html
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import tvlens
from tvlens import tasks
from tvlens.attribution import HeadScores
from tvlens.cli import main
from tvlens.errors import ConfigError
from tvlens.models import build_model
from tvlens.views import circuits, page, plots
from tvlens.views.report import contrast_pairs, write_report


@pytest.fixture(scope="module")
def small():
    fam = tasks.get("codes")
    model = build_model(fam, n_layers=2, d_model=32, n_heads=4, seed=0)
    prompts = fam.sample(12, shots=3, seed=1)
    return model, prompts


def _scores(n_layers=2, n_heads=4, task_names=("a", "b", "c"), seed=0):
    g = torch.Generator().manual_seed(seed)
    per = torch.randn(len(task_names), n_layers, n_heads, generator=g)
    return HeadScores(scores=per.mean(0), per_task=per, method="test", metric="x", task_names=list(task_names))


def _cv_props(html: str, component: str) -> list[dict]:
    """The props passed to ``CircuitsVis.render(..., CircuitsVis.<component>, props)`` in ``html``."""
    out = []
    for m in re.finditer(r"CircuitsVis\." + component + r", (\{.*?\})\);</script>", html):
        out.append(json.loads(m.group(1)))  # \u003c escapes are valid JSON
    return out


# --------------------------------------------------------------------------- pages
def test_a_page_inlines_each_library_once_and_loads_nothing(small):
    model, prompts = small
    p = page.Page("t")
    for _ in range(2):
        p.add(plots.td_by_layer_figure(tvlens.task_decodability(model, prompts, k=3)))
        p.add(circuits.attention_heads_view(model, prompts, [(0, 1), (1, 2)], prompt=1))
    doc = p.to_html()
    assert doc.count('data-tvlens-lib="plotly"') == 1 and doc.count('data-tvlens-lib="circuitsvis"') == 1
    assert doc.count("plotly.js v") == 1  # plotly.js' banner: the library itself, once
    assert doc.count("window.CircuitsVis = CircuitsVis") == 1
    assert doc.count("CircuitsVis.render(") == 2 and doc.count("Plotly.newPlot(") == 2
    # no external script, stylesheet or CDN anywhere
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", doc)
    assert "unpkg" not in doc
    # outside the two libraries' own code (plotly.js holds default URLs for map tiles and topojson,
    # unused by these figures; the browser test shows that no request leaves the page) no URL at all
    rest = re.sub(r'<script data-tvlens-lib="\w+">.*?</script>', "", doc, flags=re.S)
    assert "://" not in rest and len(rest) < len(doc) - 5_000_000
    # the bundled CircuitsVis: exactly the installed package's file, made safe for inline use
    assert page.circuitsvis_js() in doc and "</script" not in page.circuitsvis_js().lower()


def test_script_json_keeps_markup_as_data():
    evil = ['</script><script>alert(1)</script>', "\"'&<!--", "\u2028"]
    s = page.script_json({"tokens": evil, "x": float("nan"), "t": torch.tensor([1.5])})
    assert "<" not in s and ">" not in s and "&" not in s and "\u2028" not in s
    assert json.loads(s) == {"tokens": evil, "x": None, "t": [1.5]}


def test_notebook_html_sends_each_library_once_per_kernel(small):
    model, prompts = small
    page.reset_notebook_libraries()
    first = tvlens.task_decodability(model, prompts, k=3)._repr_html_()
    second = tvlens.icl_accuracy(model, prompts)._repr_html_()
    assert 'data-tvlens-lib="plotly"' in first and 'data-tvlens-lib="plotly"' not in second
    assert "Plotly.newPlot(" in second and "Task decodability" in first
    view = circuits.colored_tokens_view(["a", "b"], [0.5, -1.0])
    assert 'data-tvlens-lib="circuitsvis"' in view._repr_html_() and 'data-tvlens-lib="plotly"' not in view._repr_html_()
    page.reset_notebook_libraries()


def test_atomic_write_leaves_nothing_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "r.html"
    target.write_text("old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        page.atomic_write_text(target, "new content")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]


def test_an_unwritable_folder_is_a_clear_error_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="out=.*cannot be written"):
        write_report(blocker / "sub", "default")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


# --------------------------------------------------------------------------- circuitsvis views
def test_attention_view_holds_the_prompts_tokens_and_transformer_lens_patterns(small):
    model, prompts = small
    heads = [(1, 3), (0, 0)]
    frag = circuits.attention_heads_view(model, prompts, heads, prompt=5)
    (props,) = _cv_props(frag.html, "AttentionHeads")
    assert props["tokens"] == prompts.str_tokens(5)
    assert props["attentionHeadNames"] == ["L1H3", "L0H0"]
    _, cache = model.run_with_cache(prompts.tokens[5:6])
    for j, (L, h) in enumerate(heads):
        ref = cache["pattern", L][0, h].numpy()
        assert np.allclose(np.array(props["attention"][j]), ref, atol=1e-4)
    # a HeadScores gives its top k heads, best first
    s = _scores()
    frag = circuits.attention_heads_view(model, prompts, s, prompt=0, k=3)
    (props,) = _cv_props(frag.html, "AttentionHeads")
    assert props["attentionHeadNames"] == [f"L{L}H{h}" for L, h, _ in s.top(3)]


def test_position_sweep_as_coloured_tokens(small):
    model, prompts = small
    cp = contrast_pairs(prompts, max_pairs=3)
    assert cp is not None
    clean, corrupted, read, a, b, pairs = cp
    # the corrupted prompt keeps the query and takes another task's examples
    for r, (i, j, _, _) in enumerate(pairs):
        assert int(prompts.labels[i]) != int(prompts.labels[j])
        assert torch.equal(corrupted[r, int(read[r]) - 6 :], clean[r, int(read[r]) - 6 :])
        assert not torch.equal(corrupted[r], clean[r])
    rows = torch.arange(len(read))
    sweep = tvlens.activation_patching(model, clean, corrupted, lambda lg: lg[rows, 0, a] - lg[rows, 0, b],
                                       by=("layer", "pos"), read_positions=read, progress=False)
    toks = circuits.prompt_tokens(prompts, pairs[0][0])
    frag = circuits.position_sweep_view(sweep, toks)
    (props,) = _cv_props(frag.html, "ColoredTokensMulti")
    # CircuitsVis sets these tokens with innerHTML: they arrive HTML-escaped ("->" as "-&gt;")
    assert props["tokens"] == [html.escape(t) for t in toks] and "-&gt;" in props["tokens"]
    assert props["labels"] == ["resid_pre layer 0", "resid_pre layer 1"]
    assert np.allclose(np.array(props["values"]), sweep.normalized().T.numpy(), atol=1e-4, equal_nan=True)


def test_circuit_view_carries_every_heads_pattern_and_the_top_heads(small):
    model, prompts = small
    s = _scores()
    frag = circuits.circuit_view(s, model, prompts, prompt=2, k=3)
    assert frag.libs == {"plotly", "circuitsvis"}
    state = json.loads(re.search(r"var S = (\{.*?\});\n", frag.html).group(1))
    _, cache = model.run_with_cache(prompts.tokens[2:3])
    for L in range(2):
        assert np.allclose(np.array(state["patterns"][L]), cache["pattern", L][0].numpy(), atol=1e-4)
    assert [tuple(t[:2]) for t in state["top"]] == [(L, h) for L, h, _ in s.top(3)]
    assert state["tokens"] == prompts.str_tokens(2)
    assert frag.html.count("<button") == 3


def test_bad_view_input_is_refused_with_a_clear_error(small):
    model, prompts = small
    with pytest.raises(ConfigError, match=r"head \(2, 0\) does not exist"):
        circuits.attention_heads_view(model, prompts, [(2, 0)])
    with pytest.raises(ConfigError, match=r"head \(0, 4\) does not exist"):
        circuits.attention_heads_view(model, prompts, [(0, 4)])
    with pytest.raises(ConfigError, match=r"prompt=72 does not exist.*0\.\.71"):
        circuits.attention_heads_view(model, prompts, [(0, 0)], prompt=72)
    with pytest.raises(ConfigError, match="prompt=99 does not exist"):
        circuits.circuit_view(_scores(), model, prompts, prompt=99)
    with pytest.raises(ConfigError, match="scores have shape"):
        circuits.circuit_view(_scores(n_layers=3), model, prompts)

    @dataclass
    class NoTop:
        scores: torch.Tensor

    with pytest.raises(ConfigError, match="needs head scores"):
        circuits.circuit_view(NoTop(torch.zeros(2, 4)), model, prompts)
    with pytest.raises(ConfigError, match="one row per token"):
        circuits.colored_tokens_view(["a", "b"], [1.0, 2.0, 3.0])
    sweep = tvlens.activation_patching(model, prompts.tokens[:2], prompts.tokens[2:4], lambda lg: lg[:, -1, 0],
                                       site="z", by=("layer", "head"), progress=False)
    with pytest.raises(ConfigError, match="by \\('layer', 'pos'\\)"):
        circuits.position_sweep_view(sweep, prompts.str_tokens(0))
    with pytest.raises(ConfigError, match="td_by_layer_figure needs a result with layers, td, task_names"):
        plots.td_by_layer_figure(object())
    with pytest.raises(ConfigError, match="per_task must be"):
        plots.head_scores_figure(HeadScores(scores=torch.zeros(2, 4), per_task=torch.zeros(3, 2, 5), method="m",
                                            metric="x", task_names=["a", "b", "c"]))
    with pytest.raises(ConfigError, match="emergence_figure needs"):
        plots.emergence_figure(object())


# --------------------------------------------------------------------------- figures
def test_figures_hold_the_results_numbers(small):
    model, prompts = small
    enc = tvlens.extract(model, prompts, progress=False)
    dec = tvlens.task_decodability(enc, k=3)
    fig = plots.td_heatmap_figure(dec)
    assert np.allclose(np.array(fig.data[0].z), dec.per_task.T.numpy())
    fig = plots.td_by_layer_figure(dec)
    assert np.allclose(fig.data[0].y, dec.td.numpy()) and len(fig.data) == 1 + len(dec.task_names)
    # one line per checkpoint
    em = tvlens.emergence([(0, build_model(tasks.get("codes"), n_layers=2, d_model=32, n_heads=4, seed=1)), (5, model)],
                          "codes", n_per_task=12, shots=3, k=3, progress=False)
    fig = plots.td_by_layer_figure(em)
    assert [t.name for t in fig.data] == ["step 0", "step 5"] and np.allclose(fig.data[1].y, em.td[1].numpy())
    assert len(plots.emergence_figure(em).data) == len(em.task_names) + len(em.layers)
    # scatter: one trace per task; PCA coordinates as scikit-learn's
    from sklearn.decomposition import PCA

    fig = plots.encodings_scatter_figure(enc, 2, "pca")
    assert len(fig.data) == len(enc.task_names) and sum(len(t.x) for t in fig.data) == len(prompts)
    ref = PCA(2, random_state=0).fit_transform(enc.at(2).numpy())
    m0 = (enc.labels == 0).numpy()
    assert np.allclose(np.array(fig.data[0].x), ref[m0, 0], atol=1e-4)
    # patching grids: one heatmap per layer holding follows_source[l]
    res = tvlens.run_patching(model, prompts, enc.task_vectors(), layers=[0, 1], mode="add", progress=False)
    fig = plots.patching_grids_figure(res)
    assert len(fig.data) == 2 and np.allclose(np.array(fig.data[1].z), res.follows_source[1].numpy())
    # head scores: the overall map then one panel per task
    s = _scores()
    fig = plots.head_scores_figure(s)
    assert len(fig.data) == 4 and np.allclose(np.array(fig.data[2].z), s.per_task[1].numpy())
    # results' plot() are these figures
    assert res.plot().layout.title.text == plots.patching_figure(res).layout.title.text
    assert enc.plot(2).layout.title.text.startswith("PCA")


def test_function_vectors_td_accuracy_and_finetune_figures(small):
    model, prompts = small
    page.reset_notebook_libraries()
    # function vectors: heads per layer, cosine similarity between tasks, norms
    fv = tvlens.function_vector(model, prompts, heads=[(1, 2), (0, 1), (1, 0)])
    fig = fv.plot()
    assert list(fig.data[0].y) == [1, 2] and list(fig.data[0].text) == ["H1", "H2, H0"]
    v = fv.vectors[0]
    cos = torch.nn.functional.cosine_similarity(v[:, None], v[None], dim=-1)
    assert np.allclose(np.array(fig.data[1].z), cos.numpy(), atol=1e-5)
    assert np.allclose(fig.data[2].y, v.norm(dim=-1).numpy(), atol=1e-5)
    assert fig.layout.title.text == plots.function_vectors_figure(fv).layout.title.text
    doc = fv._repr_html_()
    assert "L1H2, L0H1, L1H0" in doc and "Plotly.newPlot(" in doc and 'data-tvlens-lib="plotly"' in doc
    # TD vs accuracy: the points and each family's fit line
    res = tvlens.td_vs_accuracy(model, "codes", shots=(2, 3), n_per_task=6, k=3, progress=False)
    fig = res.plot()
    assert list(fig.data[0].x) == [r["td"] for r in res.rows] and list(fig.data[0].y) == [r["accuracy"] for r in res.rows]
    fit = res.fits["codes"]
    if np.isfinite(fit["slope"]):
        assert len(fig.data) == 2 and "R²" in fig.data[1].name
        assert np.allclose(fig.data[1].y, fit["slope"] * np.array(fig.data[1].x) + fit["intercept"])
    # with two families: one fit each and the dashed fit over all points
    from tvlens.llm import TDAccuracyResult, linear_fit

    rows = res.rows + [{**r, "family": "flipped", "accuracy": 1 - r["accuracy"], "td": r["td"] / 2} for r in res.rows]
    two = TDAccuracyResult(rows=rows, fits={"all": linear_fit([r["td"] for r in rows], [r["accuracy"] for r in rows]),
                                            **{f: linear_fit([r["td"] for r in rows if r["family"] == f],
                                                             [r["accuracy"] for r in rows if r["family"] == f])
                                               for f in ("codes", "flipped")}}, scoring="whole answer")
    names = [t.name for t in plots.td_accuracy_figure(two).data]
    assert names[0] == "codes" and "flipped" in names
    assert sum(n.startswith("all, R²") for n in names) == (1 if np.isfinite(two.fits["all"]["slope"]) else 0)
    assert "TD vs ICL accuracy" in res._repr_html_() and "Plotly.newPlot(" in res._repr_html_()
    # finetuning arms: before/after bars of TD and accuracy, and each arm's loss
    arms = {name: tvlens.finetune(model, "codes", layers=layers, steps=3, batch_size=8, shots=3, n_eval_per_task=4,
                                  k=3, progress=False) for name, layers in (("first", "first:1"), ("last", "last:1"))}
    fig = plots.finetune_figure(arms)
    a, b = arms["first"], arms["last"]
    assert list(fig.data[0].x) == ["first", "last"]
    assert list(fig.data[0].y) == [a.td_before.best_td, b.td_before.best_td]
    assert list(fig.data[1].y) == [a.acc_before.mean, b.acc_before.mean]
    assert list(fig.data[2].y) == [a.td_after.best_td, b.td_after.best_td]
    assert list(fig.data[3].y) == [a.acc_after.mean, b.acc_after.mean]
    assert list(fig.data[4].y) == a.losses and list(fig.data[5].y) == b.losses
    assert list(a.plot().data[0].x) == ["blocks 0"] and list(plots.finetune_figure([a, b]).data[0].x) == ["blocks 0",
                                                                                                          "blocks 1"]
    assert "FinetuneResult" in a._repr_html_() and "Plotly.newPlot(" in a._repr_html_()
    for fn, match in ((plots.function_vectors_figure, "function_vectors_figure needs"),
                      (plots.td_accuracy_figure, "td_accuracy_figure needs"), (plots.finetune_figure, "finetune_figure")):
        with pytest.raises(ConfigError, match=match):
            fn(object())
    with pytest.raises(ConfigError, match="no results"):
        plots.finetune_figure({})
    page.reset_notebook_libraries()


def test_labels_with_markup_are_escaped_for_plotly():
    assert plots.label("<b>x</b>") == "&lt;b&gt;x&lt;/b&gt;"


# --------------------------------------------------------------------------- report and CLI
def test_report_command_writes_one_file_and_refuses_an_unwritable_folder(tmp_path, capsys):
    out = tmp_path / "reports"
    assert main(["report", "--model", "default", "--family", "codes", "--out", str(out), "--n-per-task", "12",
                 "--no-tsne", "--no-emergence", "--patching-per-task", "11"]) == 0
    printed = capsys.readouterr().out
    (f,) = list(out.iterdir())
    assert f.suffix == ".html" and str(f) in printed and "top heads" in printed
    bad = tmp_path / "file"
    bad.write_text("")
    assert main(["report", "--model", "default", "--out", str(bad / "x")]) == 2
    assert "cannot be written" in capsys.readouterr().err
    assert main(["report", "--model", "default", "--prompt", "1000", "--out", str(out), "--n-per-task", "12",
                 "--overwrite"]) == 2
    assert "prompt=1000 does not exist" in capsys.readouterr().err
    assert len(list(out.iterdir())) == 1  # nothing half-written


def test_report_on_a_regression_model_says_what_it_leaves_out():
    from tvlens.views.report import build_report

    fam = tasks.get("sparse_regression_small")
    model = build_model(fam, n_layers=2, d_model=16, n_heads=2, shots=5, seed=0)
    rep = build_report(model, fam, n_per_task=11, shots=5, tsne=False)
    assert "MSE grid means" in rep.summary and "ICL mse" in rep.summary
    assert any("continuous" in n for n in rep.notes) and any("position sweep" in n for n in rep.notes)
    kinds = [s.fragment.kind for s in rep.page.sections]
    assert kinds.count("attention") == 1 and "circuit" not in kinds  # every head's attention, no scores
    assert "x0" in rep.to_html()  # continuous inputs are labelled by position


def test_report_notes_a_family_the_model_was_not_trained_on(tmp_path, capsys):
    assert main(["report", "--model", "default", "--family", "categories", "--out", str(tmp_path), "--n-per-task", "11",
                 "--no-tsne", "--no-emergence"]) == 0
    assert "note: the model was trained on Codes" in capsys.readouterr().out
