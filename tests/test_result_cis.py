"""Every result carries a seeded bootstrap CI over prompts: in .to_dataframe(), in .plot(), in save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tvlens
from tvlens import stats, tasks
from tvlens.errors import ConfigError
from tvlens.models import build_model


@pytest.fixture(scope="module")
def bitwise():
    model = tvlens.load_model("bitwise")
    prompts = tvlens.model_info(model).task_family().sample(12, shots=4, seed=5)
    return model, prompts


@pytest.fixture(scope="module")
def patched(bitwise):
    model, prompts = bitwise
    enc = tvlens.extract(model, prompts, progress=False)
    return enc, tvlens.run_patching(model, prompts, enc.task_vectors(), layers=[0, 1], mode="swap", progress=False)


def _brackets(est, lo, hi, tol=1e-6):
    est, lo, hi = (np.asarray(x, dtype=float) for x in (est, lo, hi))
    ok = np.isnan(est) | ((lo <= est + tol) & (est <= hi + tol))
    return bool(ok.all())


def test_accuracy_ci(bitwise):
    model, prompts = bitwise
    acc = tvlens.icl_accuracy(model, prompts)
    df = acc.to_dataframe()
    assert {"accuracy_lo", "accuracy_hi"} <= set(df)
    assert _brackets(df["accuracy"], df["accuracy_lo"], df["accuracy_hi"])
    assert acc.mean_ci[0] <= acc.mean <= acc.mean_ci[1]
    # by hand: task 0's CI is the stratified bootstrap of its prompts' 0/1 correctness
    m = (acc.labels == 0).numpy()
    iv = stats.per_group_ci(acc.per_prompt.numpy(), acc.labels.numpy(), len(acc.task_names), seed=0)
    assert float(acc.per_task_ci[0, 0]) == pytest.approx(iv.lo[0]) and acc.per_prompt.numpy()[m].mean() == iv.estimate[0]
    fig = acc.plot()
    assert fig.data[0].error_y.array is not None
    with pytest.raises(ConfigError, match="n_boot"):
        acc.with_ci(n_boot=0)


def test_patching_ci(patched):
    _, res = patched
    # the per-prompt outcomes reproduce the grid
    lab = res.labels
    for t in range(len(res.target_names)):
        assert torch.allclose(res.per_prompt_source[..., lab == t].float().mean(-1), res.follows_source[..., t])
        assert torch.allclose(res.per_prompt_own[..., lab == t].float().mean(-1), res.follows_own[..., t])
    prof = res.layer_profile()
    for col in ("flip_rate_lo", "flip_rate_hi", "control_lo", "control_hi"):
        assert col in prof
    assert _brackets(prof["flip_rate"], prof["flip_rate_lo"], prof["flip_rate_hi"])
    assert _brackets(prof["own_task_control"], prof["control_lo"], prof["control_hi"])
    df = res.to_dataframe()
    assert _brackets(df["follows_source"], df["follows_source_lo"], df["follows_source_hi"])
    assert "[" in repr(res)
    a = res.flip_rate_ci.clone()
    assert torch.equal(res.with_ci(seed=0).flip_rate_ci, a)  # seeded
    assert not torch.equal(res.with_ci(seed=1).flip_rate_ci, a) or bool((a[0] == a[1]).all())
    fig = tvlens.views.patching_profile_figure(res)
    assert fig.data[0].error_y.array is not None and fig.data[1].error_y.arrayminus is not None  # CI bars


def test_head_scores_ci_and_round_trip(bitwise, tmp_path):
    model, prompts = bitwise
    hs = tvlens.head_attribution(model, prompts, method="dla", progress=False)
    df = hs.to_dataframe()
    assert {"score_lo", "score_hi"} <= set(df)
    assert _brackets(df["score"], df["score_lo"], df["score_hi"])
    hs.save(tmp_path / "hs")
    back = tvlens.HeadScores.load(tmp_path / "hs")
    assert torch.equal(back.scores_ci, hs.scores_ci) and torch.equal(back.per_prompt, hs.per_prompt)
    assert back.ci_info == hs.ci_info


def test_sweep_ci_is_opt_in_and_over_prompts(bitwise):
    model, prompts = bitwise
    toks = prompts.tokens[:6]
    corrupted = prompts.tokens[6:12]
    read = prompts.query_pos[:6]
    ans = prompts.answers[:6, 0]
    rows = torch.arange(6)

    def metric(logits):
        return logits[rows, 0].log_softmax(-1)[rows, ans]

    plain = tvlens.activation_patching(model, toks, corrupted, metric, by=("layer",), read_positions=read,
                                       progress=False)
    assert plain.values_ci is None and "metric_lo" not in plain.to_dataframe()
    sw = tvlens.activation_patching(model, toks, corrupted, metric, by=("layer",), read_positions=read,
                                    progress=False, ci=0.9, n_boot=500, ci_seed=2)
    assert torch.allclose(sw.values, plain.values)
    assert sw.values_ci.shape == (2, *sw.values.shape)
    assert _brackets(sw.values, sw.values_ci[0], sw.values_ci[1])
    assert sw.ci_info == {"ci": 0.9, "n_boot": 500, "seed": 2}
    assert {"metric_lo", "metric_hi"} <= set(sw.to_dataframe())
    with pytest.raises(ConfigError, match="per_prompt"):
        plain.with_ci()
    with pytest.raises(ConfigError, match="ci"):
        tvlens.activation_patching(model, toks, corrupted, metric, by=("layer",), read_positions=read,
                                   progress=False, ci=95)


def test_emergence_spearman_ci():
    fam = tasks.get("codes")
    models = [(s, build_model(fam, n_layers=2, d_model=32, n_heads=4, seed=s)) for s in range(4)]
    em = tvlens.emergence(models, fam, n_per_task=12, k=3, progress=False)
    df = em.to_dataframe()
    assert {"mean_accuracy_lo", "mean_accuracy_hi", "td[L1]_lo", "td[L1]_hi"} <= set(df)
    assert _brackets(df["mean_accuracy"], df["mean_accuracy_lo"], df["mean_accuracy_hi"])
    assert em.td_correct.shape == (4, len(em.layers), len(em.labels))
    assert "Spearman" in repr(em) and em.spearman_ci is not None


def test_td_vs_accuracy_r2_ci():
    from tvlens.llm import add_r2_ci, linear_fit

    rng = np.random.default_rng(0)
    rows = [{"family": "f", "td": float(x), "accuracy": float(x + rng.normal(scale=0.1))} for x in rng.random(12)]
    fits = {"all": linear_fit([r["td"] for r in rows], [r["accuracy"] for r in rows])}
    add_r2_ci(fits, rows)
    f = fits["all"]
    assert f["r2_lo"] <= f["r2"] <= f["r2_hi"]


def test_report_summary_quotes_cis(bitwise, patched):
    from tvlens.views.report import summarize

    model, prompts = bitwise
    fam = tvlens.model_info(model).task_family()
    acc = tvlens.icl_accuracy(model, prompts)
    enc, patch = patched
    dec = tvlens.task_decodability(enc, k=5, null=200)
    hs = tvlens.head_attribution(model, prompts, method="dla", progress=False)
    rows = dict(summarize("bitwise", fam, acc, dec, patch, hs))
    assert "[" in rows["ICL accuracy"] and "shuffled-label null" in rows["task decodability"]
    assert rows["task decodability"].count("[") >= 1 and "p " in rows["task decodability"]
    row = rows["patching at the query (swap)"]
    if "best layer: none" in row:  # no layer where the swap does anything: its reason, no CI to quote
        assert "changes nothing" in row or "no layer" in row
    else:
        assert row.count("[") == 2  # flip rate and control, each with its CI
    assert "[" in rows["top heads (dla)"] and "bootstrap" in rows["uncertainty"]
    fig = tvlens.views.td_by_layer_figure(dec)
    assert fig.data[0].error_y.array is not None  # TD's CI as bars on the TD line
    assert sum(getattr(t, "fill", None) == "toself" for t in fig.data) == 1  # the null band
