"""Bootstrap CIs, the shuffled-label null and TD's tie-break, checked on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tvlens import stats
from tvlens.encoding import TaskEncodings, knn_loo_predict, task_decodability
from tvlens.errors import ConfigError, TvlensError


def test_bootstrap_ci_covers_a_known_mean_about_95_percent_of_the_time():
    """Bernoulli per-prompt correctness with known p: the 95% percentile CI of the mean should cover p
    in ~95% of independent data sets. 400 data sets: the coverage estimate's standard error is ~0.011,
    and the percentile interval is known to run slightly under nominal at small n, so the band is
    0.915-0.98 (3 standard errors below, ~3 above). Fixed seeds: the numbers never change."""
    p, n, reps = 0.3, 100, 400
    rng = np.random.default_rng(2026)
    hits = 0
    for r in range(reps):
        x = (rng.random(n) < p).astype(float)
        iv = stats.mean_ci(x, seed=r)
        hits += bool(iv.lo <= p <= iv.hi)
    coverage = hits / reps
    assert 0.915 <= coverage <= 0.98, coverage  # measured: 0.945


def test_stratified_per_task_ci_coverage():
    """Per-task means (stratified by task, as TD and accuracy per task): 3 tasks x 200 data sets."""
    ps = np.array([0.2, 0.5, 0.8])
    n_t, reps = 60, 200
    lab = np.repeat(np.arange(3), n_t)
    rng = np.random.default_rng(7)
    hits, hits_all = np.zeros(3), 0
    for r in range(reps):
        x = (rng.random(len(lab)) < ps[lab]).astype(float)
        iv = stats.per_group_ci(x, lab, 3, seed=r)
        hits += (iv.lo <= ps) & (ps <= iv.hi)
        ov = stats.mean_ci(x, lab, seed=r)
        hits_all += bool(ov.lo <= ps.mean() <= ov.hi)
    cov = hits.sum() / (3 * reps)  # 600 intervals: standard error ~0.009
    assert 0.92 <= cov <= 0.98, cov  # measured: 0.950 (overall mean: 0.960)
    assert 0.90 <= hits_all / reps <= 0.99, hits_all / reps


def test_mean_ci_agrees_with_scipy_bootstrap():
    from scipy.stats import bootstrap

    x = (np.random.default_rng(0).random(200) < 0.4).astype(float)
    ours = stats.mean_ci(x, n_boot=4000, seed=1)
    ref = bootstrap((x,), np.mean, n_resamples=4000, method="percentile", random_state=1).confidence_interval
    assert abs(ours.lo - ref.low) <= 0.015 and abs(ours.hi - ref.high) <= 0.015
    assert ours.lo < x.mean() < ours.hi


def test_cis_are_seeded_and_knobs_validated():
    x = np.random.default_rng(0).random(50)
    a, b = stats.mean_ci(x, seed=3), stats.mean_ci(x, seed=3)
    assert a.lo == b.lo and a.hi == b.hi
    assert stats.mean_ci(x, seed=4).lo != a.lo
    narrow = stats.mean_ci(x, ci=0.5, seed=3)
    assert a.lo < narrow.lo < narrow.hi < a.hi
    for bad in (0, -1, 2.5, True, "100"):
        with pytest.raises(ConfigError, match="n_boot"):
            stats.mean_ci(x, n_boot=bad)
    for bad in (0, 1, 1.5, -0.1, "0.95", True):
        with pytest.raises(ConfigError, match="ci"):
            stats.mean_ci(x, ci=bad)
    for bad in (-1, 1.5, "0", None):
        with pytest.raises(ConfigError, match="seed"):
            stats.mean_ci(x, seed=bad)
    assert issubclass(ConfigError, TvlensError)


def test_stratified_counts_keep_each_task_size():
    lab = np.repeat([0, 1, 2], [5, 10, 20])
    W = stats.bootstrap_counts(len(lab), 50, 0, lab)
    for t, m in ((0, 5), (1, 10), (2, 20)):
        assert np.all(W[:, lab == t].sum(1) == m)
    # a group with no prompts is NaN, never 0
    gm = stats.group_means_boot(np.ones(len(lab)), lab, 4, W)
    assert np.all(gm[..., :3] == 1) and np.all(np.isnan(gm[..., 3]))


# --------------------------------------------------------------------------- TD tie-break
def _noisy(seed=0, n_per=40, T=4, d=8, signal=0.5):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(T), n_per)
    X = rng.normal(size=(len(y), d)) + signal * np.eye(d)[y]
    return X, y


def _tied_votes(X, y, k):
    Xt = torch.tensor(X)
    d = torch.cdist(Xt, Xt)
    d.fill_diagonal_(float("inf"))
    nn = torch.sort(d, dim=1, stable=True).indices[:, :k].numpy()
    v = np.stack([np.bincount(y[r], minlength=int(y.max()) + 1) for r in nn])
    return int(((v == v.max(1, keepdims=True)).sum(1) > 1).sum())


def test_default_tie_break_equals_scikit_learn_loo_knn_with_many_ties():
    from sklearn.model_selection import LeaveOneOut, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    for seed in range(3):
        X, y = _noisy(seed)
        assert _tied_votes(X, y, 10) >= 30  # of 160 votes: the tie-break decides many of them
        sk = cross_val_predict(KNeighborsClassifier(10), X, y, cv=LeaveOneOut())
        assert np.array_equal(knn_loo_predict(torch.tensor(X), torch.tensor(y), k=10).numpy(), sk)
        enc = TaskEncodings(acts=torch.tensor(X, dtype=torch.float32)[:, None], layers=[0], labels=torch.tensor(y),
                            task_names=[f"t{i}" for i in range(4)])
        res = task_decodability(enc, k=10)
        assert res.tie_break == "lowest"
        assert res.td[0].item() == pytest.approx((sk == y).mean())
        nearest = task_decodability(enc, k=10, tie_break="nearest").td[0].item()
        assert nearest != pytest.approx((sk == y).mean())  # the other rule gives another number here


def test_tie_break_is_validated():
    X, y = _noisy()
    enc = TaskEncodings(acts=torch.tensor(X, dtype=torch.float32)[:, None], layers=[0], labels=torch.tensor(y),
                        task_names=list("abcd"))
    with pytest.raises(ConfigError, match="tie_break"):
        task_decodability(enc, tie_break="first")
    with pytest.raises(ConfigError, match="n_boot"):
        task_decodability(enc, n_boot=0)
    with pytest.raises(ConfigError, match="null"):
        task_decodability(enc, null=-5)


# --------------------------------------------------------------------------- TD CIs and the null
def _enc(signal, seed=0, n_per=40, T=4, d=8):
    X, y = _noisy(seed, n_per, T, d, signal)
    X2 = np.stack([np.random.default_rng(seed + 100).normal(size=X.shape), X], 1)  # layer 0: noise; layer 1: signal
    return TaskEncodings(acts=torch.tensor(X2, dtype=torch.float32), layers=[0, 1], labels=torch.tensor(y),
                         task_names=[f"t{i}" for i in range(T)])


def test_td_ci_and_shuffled_label_null():
    enc = _enc(signal=2.5)
    res = task_decodability(enc, k=10, null=300)
    lo, hi = res.td_ci
    assert torch.all(lo <= res.td) and torch.all(res.td <= hi)
    assert float(res.td[1]) > 0.9 and float(lo[1]) > 0.8
    # the null sits at chance (4 tasks): mean ~0.25, and the real layer's TD is far above it
    assert abs(float(res.null_mean[1]) - 0.25) < 0.05 and abs(float(res.null_mean[0]) - 0.25) < 0.05
    assert float(res.p_value[1]) == pytest.approx(1 / 301)
    # layer 0 is noise: TD within the null's spread, p not small
    assert float(res.p_value[0]) > 0.05 and float(res.td[0]) <= float(res.null_quantile[0]) + 0.05
    assert torch.all(res.per_task_ci[0] <= res.per_task + 1e-6) and torch.all(res.per_task <= res.per_task_ci[1] + 1e-6)
    df = res.to_dataframe()
    for col in ("td_lo", "td_hi", "null_mean", "null_q95", "p_value", "td[t0]_lo", "td[t0]_hi"):
        assert col in df
    assert "CI" in repr(res) and "null" in repr(res)


def test_null_p_values_are_roughly_uniform_without_signal():
    ps = []
    for seed in range(20):
        res = task_decodability(_enc(signal=0.0, seed=seed, n_per=25), k=5, ci=None, null=99)
        ps.append(float(res.p_value[1]))
    ps = np.array(ps)
    assert 0.2 < ps.mean() < 0.8 and (ps < 0.05).sum() <= 4


def test_td_null_matches_a_brute_force_permutation():
    enc = _enc(signal=0.8, n_per=15)
    res = task_decodability(enc, k=5, null=20, ci_seed=3)
    rng = np.random.default_rng(3)
    y = enc.labels.numpy()
    brute = []
    for _ in range(20):
        yp = rng.permutation(y)
        pred = knn_loo_predict(enc.at(1), torch.tensor(yp), k=5).numpy()
        brute.append((pred == yp).mean())
    assert float(res.null_mean[1]) == pytest.approx(np.mean(brute), abs=1e-6)


def test_decodability_result_round_trips_with_cis(tmp_path):
    res = task_decodability(_enc(signal=1.0), k=10, null=50)
    res.save(tmp_path / "td")
    back = type(res).load(tmp_path / "td")
    for name in ("td", "td_ci", "per_task_ci", "null_mean", "null_quantile", "p_value", "neighbors", "labels"):
        assert torch.equal(getattr(back, name), getattr(res, name)), name
    assert torch.equal(back.correct, res.correct) and back.correct.dtype == torch.bool
    assert back.ci_info == res.ci_info and back.tie_break == "lowest"
    # CIs recomputed from what was saved are the same numbers
    again = type(res).load(tmp_path / "td").with_ci(**{k: res.ci_info[k] for k in ("ci", "n_boot", "seed")})
    assert torch.equal(again.td_ci, res.td_ci)


# --------------------------------------------------------------------------- correlations
def test_spearman_and_r2_cis():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = x + rng.normal(scale=0.7, size=40)
    sp = stats.spearman_ci(x, y, seed=0)
    assert float(sp.estimate) == pytest.approx(spearmanr(x, y).statistic)
    assert 0 < sp.lo < sp.estimate < sp.hi < 1
    r2 = stats.r2_ci(x, y)
    assert float(r2.estimate) == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2)
    assert 0 <= r2.lo < r2.estimate < r2.hi <= 1
    # too few points: the estimate, and NaN bounds rather than a fake interval
    tiny = stats.r2_ci([0, 1], [0, 2])
    assert np.isnan(tiny.lo) and np.isnan(tiny.hi)
    assert np.isnan(stats.spearman_rows(np.ones(5), np.arange(5.0)))  # constant series: undefined, NaN


def test_identical_representations_get_no_p_value():
    """Every prompt at one point: the tie rule (a seeded random draw among equidistant prompts, issue 19), not
    decodability, picks the neighbours; its null would call a chance-level TD significant. The p-value is NaN,
    with a note."""
    y = np.repeat(np.arange(6), 10)
    enc = TaskEncodings(acts=torch.zeros(60, 1, 4), layers=[0], labels=torch.tensor(y), task_names=list("abcdef"))
    res = task_decodability(enc, k=5, null=100)
    assert res.td[0].item() < 0.35 and res.notes["boundary_ties"][0] == 1.0 and "ties" in res.notes  # near chance
    assert np.isnan(float(res.p_value[0])) and "tie rule" in res.notes["no_p_value"]
