"""The basis-aware estimator (sparse_regression) against numpy references and known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tvlens import tasks
from tvlens.errors import ConfigError
from tvlens.tasks.sparse_regression import basis_aware_baseline, basis_aware_predictions, basis_fits


def _numpy_arrays(p):
    inp = p.inputs.double().numpy()
    D = inp.shape[-1] - 1
    return inp[:, 0:-2:2, :D], inp[:, 1:-2:2, D], inp[:, -2, :D], p.answers[:, 0].double().numpy()


@pytest.mark.parametrize("D,r,shots", [(8, 2, 5), (16, 4, 9), (4, 1, 3), (8, 2, 1)])
def test_best_fit_matches_a_brute_force_numpy_reference(D, r, shots):
    p = tasks.get("sparse_regression", D=D, r=r, n_bases=4).sample(6, shots=shots, seed=3)
    X, y, xq, ans = _numpy_arrays(p)
    pred, rss = basis_fits(p)
    best = basis_aware_predictions(p)
    for i in range(len(p)):
        ref_pred, ref_rss = [], []
        for b in range(4):
            cols = list(range(b * r, (b + 1) * r))
            w, *_ = np.linalg.lstsq(X[i][:, cols], y[i], rcond=None)  # minimum norm when underdetermined
            ref_pred.append(xq[i, cols] @ w)
            ref_rss.append(float(((X[i][:, cols] @ w - y[i]) ** 2).sum()))
        np.testing.assert_allclose(pred[i].numpy(), ref_pred, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(rss[i].numpy(), ref_rss, rtol=1e-6, atol=1e-8)
        if shots > r:  # residuals differ: the best-fitting basis is the argmin
            assert float(best[i]) == pytest.approx(ref_pred[int(np.argmin(ref_rss))], rel=1e-6, abs=1e-8)
    err = basis_aware_baseline(p)
    assert torch.allclose(err.double(), (best - torch.as_tensor(ans)) ** 2, rtol=1e-5, atol=1e-7)


def test_bayes_matches_a_numpy_posterior_mean():
    fam = tasks.get("sparse_regression", D=8, r=2, n_bases=4, noise_std=0.1)
    p = fam.sample(3, shots=4, seed=5)
    X, y, xq, _ = _numpy_arrays(p)
    got = basis_aware_predictions(p, method="bayes").numpy()
    s2 = 0.01
    for i in range(len(p)):
        logml, means = [], []
        for b in range(4):
            Xb = X[i][:, 2 * b : 2 * b + 2]
            C = Xb @ Xb.T + s2 * np.eye(len(y[i]))
            logml.append(-0.5 * y[i] @ np.linalg.solve(C, y[i]) - 0.5 * np.linalg.slogdet(C)[1])
            means.append(xq[i, 2 * b : 2 * b + 2] @ np.linalg.solve(Xb.T @ Xb + s2 * np.eye(2), Xb.T @ y[i]))
        post = np.exp(np.array(logml) - max(logml))
        post /= post.sum()
        assert got[i] == pytest.approx(float(post @ np.array(means)), rel=1e-6, abs=1e-9)


def test_known_answer_without_noise_the_basis_aware_estimator_is_exact_and_dense_is_not():
    fam = tasks.get("sparse_regression", D=16, r=4, n_bases=4, noise_std=0.0)
    p = fam.sample(20, shots=7, seed=0)  # 7 examples: r=4 < 7 < D=16
    assert float(basis_aware_baseline(p).max()) < 1e-8  # only the true basis fits exactly
    pred, rss = basis_fits(p)
    assert torch.equal(rss.argmin(1), p.labels)
    assert float(tasks.least_squares_baseline(p).mean()) > 0.1  # dense least squares is underdetermined
    # the restricted fit on the true basis recovers w exactly: its prediction is the answer
    assert torch.allclose(pred[torch.arange(len(p)), p.labels], p.answers[:, 0].double(), atol=1e-6)
    assert float(basis_aware_baseline(p, method="bayes").max()) < 1e-4


def test_no_examples_predicts_zero_and_ties_pick_the_lowest_basis():
    fam = tasks.get("sparse_regression", D=4, r=1, n_bases=4, noise_std=0.0)
    p0 = fam.sample(2, shots=0, seed=0)
    assert torch.equal(basis_aware_predictions(p0), torch.zeros(len(p0), dtype=torch.float64))
    p1 = fam.sample(2, shots=1, seed=0)  # one example: every rank-1 basis fits it exactly
    pred, _ = basis_fits(p1)
    assert torch.allclose(basis_aware_predictions(p1), pred[:, 0])


def test_accuracy_reports_the_basis_aware_baseline():
    import tvlens
    from tvlens.models import build_model

    fam = tasks.get("sparse_regression_small")
    model = build_model(fam, n_layers=1, d_model=16, n_heads=2, shots=5)
    p = fam.sample(4, shots=5, seed=0)
    acc = tvlens.icl_accuracy(model, p)
    assert torch.allclose(acc.basis_baseline, basis_aware_baseline(p))
    assert "basis_aware_mse" in acc.to_dataframe()


def test_bad_baseline_input():
    with pytest.raises(ConfigError, match="method must be"):
        basis_aware_predictions(tasks.get("sparse_regression_small").sample(1, shots=3, seed=0), method="lasso")
    with pytest.raises(ConfigError, match="continuous"):
        basis_fits(tasks.get("shift").sample(1, shots=2, seed=0))
    with pytest.raises(ConfigError, match="PromptSet"):
        basis_fits("prompts")


# --------------------------------------------------------------------------- regression_patching (Fig. 7)
def _small_model_and_prompts(shots=5):
    from tvlens.models import build_model

    fam = tasks.get("sparse_regression", D=8, r=2, n_bases=4)
    model = build_model(fam, n_layers=2, d_model=32, n_heads=4, shots=shots, seed=1)
    return model, fam.sample(5, shots=shots, seed=0), fam.sample(5, shots=shots, seed=1)


def test_regression_patching_matches_a_hook_reference():
    import tvlens

    model, p, p_vec = _small_model_and_prompts()
    vecs = tvlens.extract(model, p_vec, progress=False).task_vectors()
    res = tvlens.regression_patching(model, p, vecs, layers=[1], mode="replace")
    fits, _ = basis_fits(p)
    q = p.query_pos
    for a, name in enumerate(p.task_names):
        v = vecs.get(name, 1)

        def hook(act, hook, v=v):
            act = act.clone()
            act[torch.arange(len(q)), q] = v
            return act

        with torch.no_grad():
            out = model.run_with_hooks(p.inputs, fwd_hooks=[("blocks.1.hook_resid_pre", hook)])
        pred = out[torch.arange(len(q)), q, 0].double()
        for b in range(4):
            m = p.labels == b
            ref = float(((pred[m] - fits[m, a]) ** 2).mean())
            assert float(res.mse_to_source[0, a, b]) == pytest.approx(ref, rel=1e-4, abs=1e-7)
            ref_ans = float(((pred[m] - p.answers[m, 0].double()) ** 2).mean())
            assert float(res.mse_answer[0, a, b]) == pytest.approx(ref_ans, rel=1e-4, abs=1e-7)
    # the floor: toward_source of predicting 0 everywhere, from its definition
    for a in range(4):
        for b in range(4):
            m = p.labels == b
            if a == b:
                assert bool(res.zero_floor[a, b].isnan())
                continue
            gap = res.base_to_source[a, b] - res.base_to_own[b]
            ref = (res.base_to_source[a, b] - float((fits[m, a] ** 2).mean())) / gap
            assert float(res.zero_floor[a, b]) == pytest.approx(float(ref), rel=1e-6)
    df = res.to_dataframe()
    assert len(df) == 16 and {"toward_source", "mse_to_source"} <= set(df.columns)
    assert res.plot().data and "Regression task-vector patching" in res._repr_html_()
    assert res.best_layer() == 1


def test_regression_patching_without_intervention_moves_nothing():
    import tvlens

    model, p, p_vec = _small_model_and_prompts()
    vecs = tvlens.extract(model, p_vec, progress=False).task_vectors()
    res = tvlens.regression_patching(model, p, vecs, layers=[0, 1], mode="add", scale=0.0)
    assert torch.allclose(res.mse_to_source, res.base_to_source.expand(2, 4, 4), atol=1e-6)
    off = ~torch.eye(4, dtype=torch.bool)
    assert torch.allclose(res.toward_source[:, off], torch.zeros(2, 12, dtype=torch.float64), atol=1e-5)
    assert bool(torch.diagonal(res.toward_source, dim1=1, dim2=2).isnan().all())
    assert torch.allclose(res.cross_toward_source, torch.zeros(2, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(res.control, torch.zeros(2, dtype=torch.float64), atol=1e-5)
    # the unpatched model's distance to its own basis's solution is the diagonal of base_to_source
    assert torch.allclose(torch.diagonal(res.base_to_source), res.base_to_own)


def test_bad_regression_patching_input():
    import tvlens

    model, p, p_vec = _small_model_and_prompts()
    vecs = tvlens.extract(model, p_vec, progress=False).task_vectors()
    with pytest.raises(ConfigError, match="mode must be"):
        tvlens.regression_patching(model, p, vecs, mode="mix")
    with pytest.raises(ConfigError, match="scale must be a finite"):
        tvlens.regression_patching(model, p, vecs, scale=float("nan"))
    with pytest.raises(ConfigError, match="final residual stream"):
        tvlens.regression_patching(model, p, vecs, layers=[2])
    with pytest.raises(ConfigError, match="TaskVectors"):
        tvlens.regression_patching(model, p, {"basis0": torch.zeros(32)})
    with pytest.raises(ConfigError, match="batch_size"):
        tvlens.regression_patching(model, p, vecs, batch_size=0)


# --------------------------------------------------------------------------- TrainConfig knobs for the study
def test_train_config_betas_and_constant_schedule():
    import json
    from pathlib import Path

    from tvlens.train import TrainConfig, _lr_lambda, train

    cfg = TrainConfig(family={"name": "sparse_regression", "D": 4, "r": 1, "n_bases": 4}, shots=3, steps=3,
                      batch_size=8, n_layers=1, d_model=16, n_heads=2, eval_every=3, eval_n_per_task=4, warmup=1,
                      adam_betas=[0.9, 0.9999], lr_schedule="constant")
    assert cfg.adam_betas == (0.9, 0.9999)
    f = _lr_lambda(cfg)
    assert f(0) == pytest.approx(0.5) and f(1) == 1.0 and f(2) == 1.0
    assert TrainConfig().adam_betas == (0.9, 0.98) and TrainConfig().lr_schedule == "cosine"  # unchanged defaults
    _, hist = train(cfg, progress=False)
    assert hist[-1]["basis_aware_mse"] < hist[-1]["least_squares_mse"]  # 3 shots in D=4: only basis-aware is determined
    paper = TrainConfig(**json.loads((Path(__file__).parent.parent / "configs/sparse_regression_paper.json").read_text()))
    assert paper.adam_betas == (0.9, 0.9999) and paper.family["D"] == 16 and paper.shots == 19
    for bad in ([0.9], [0.9, 1.0], ["a", 0.9], [0.9, float("nan")]):
        with pytest.raises(ConfigError, match="adam_betas"):
            TrainConfig(adam_betas=bad)
    with pytest.raises(ConfigError, match="lr_schedule"):
        TrainConfig(lr_schedule="exponential")  # "linear" exists since issue 18


def test_a_run_written_before_the_new_fields_still_resumes(tmp_path):
    import json

    from tvlens.train import TrainConfig, train

    cfg = TrainConfig(family={"name": "sparse_regression", "D": 4, "r": 1, "n_bases": 4}, shots=3, steps=4,
                      batch_size=8, n_layers=1, d_model=16, n_heads=2, eval_every=2, eval_n_per_task=2)
    train(cfg, tmp_path, progress=False, stop_after=2)
    saved = json.loads((tmp_path / "train_config.json").read_text())
    del saved["adam_betas"], saved["lr_schedule"]  # as an older tvlens wrote it
    (tmp_path / "train_config.json").write_text(json.dumps(saved))
    _, hist = train(cfg, tmp_path, progress=False)
    assert hist[-1]["step"] == 4
