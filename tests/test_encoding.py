"""Extraction, task vectors and task decodability (TD), checked against references we did not write."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tvlens
from tvlens import tasks
from tvlens.encoding import TaskVectors, extract, knn_loo_predict, resid_hook_name, task_decodability
from tvlens.errors import ConfigError
from tvlens.models import build_model


@pytest.fixture(scope="module")
def small():
    fam = tasks.get("categories")
    model = build_model(fam, n_layers=2, d_model=32, n_heads=4, seed=0)
    prompts = fam.sample(12, shots=3, seed=1)
    return model, prompts


def test_extract_equals_full_run_with_cache(small):
    model, prompts = small
    enc = extract(model, prompts, batch_size=5, progress=False)
    assert enc.acts.shape == (len(prompts), 3, 32)
    _, cache = model.run_with_cache(prompts.tokens)
    rows = torch.arange(len(prompts))
    for i, layer in enumerate(enc.layers):
        ref = cache[resid_hook_name(layer)][rows, prompts.query_pos]
        assert torch.allclose(enc.acts[:, i], ref, atol=1e-5)
    # layer 0 is the embedding, the last layer the final residual stream
    assert torch.allclose(enc.at(0), (cache["hook_embed"] + cache["hook_pos_embed"])[rows, prompts.query_pos])


def test_extract_on_regression_model():
    fam = tasks.get("sparse_regression_small")
    model = build_model(fam, n_layers=2, d_model=32, n_heads=4, shots=9)
    p = fam.sample(4, shots=9, seed=0)
    enc = extract(model, p, layers=[1, 2], progress=False)
    _, cache = model.run_with_cache(p.inputs)
    assert torch.allclose(enc.at(2), cache["blocks.1.hook_resid_post"][:, -2], atol=1e-5)


def brute_force_loo_knn(X, y, k):
    """Reference: for each point, sort all others by distance, vote, ties to the lowest label."""
    X = np.asarray(X, dtype=np.float64)
    preds = []
    for i in range(len(X)):
        d = np.sqrt(((X - X[i]) ** 2).sum(1))
        others = [j for j in np.argsort(d, kind="stable") if j != i][:k]
        votes = np.bincount(np.asarray(y)[others], minlength=int(max(y)) + 1)
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


def test_loo_knn_matches_brute_force_and_scikit_learn():
    from sklearn.model_selection import LeaveOneOut, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 30)
    X = rng.normal(size=(120, 6)) + 0.8 * np.eye(6)[y]  # overlapping clusters: many non-trivial votes
    ours = knn_loo_predict(torch.tensor(X), torch.tensor(y), k=10, tie_break="lowest").numpy()
    assert np.array_equal(ours, brute_force_loo_knn(X, y, 10))
    sk = cross_val_predict(KNeighborsClassifier(n_neighbors=10, algorithm="brute"), X, y, cv=LeaveOneOut())
    assert np.array_equal(ours, sk)
    assert 0.3 < (ours == y).mean() < 0.95  # a case where leave-one-out matters


def test_naive_fit_predict_is_not_leave_one_out():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 5))
    y = rng.integers(0, 2, 200)  # labels independent of X: true TD is chance
    naive = (KNeighborsClassifier(n_neighbors=1).fit(X, y).predict(X) == y).mean()
    loo = (knn_loo_predict(torch.tensor(X), torch.tensor(y), k=1).numpy() == y).mean()
    assert naive == 1.0
    assert abs(loo - 0.5) < 0.12


def test_tie_breaks_are_deterministic():
    X = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0], [11.0]])
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    a = knn_loo_predict(X, y, k=2, tie_break="random", seed=3)
    assert torch.equal(a, knn_loo_predict(X, y, k=2, tie_break="random", seed=3))
    # point 1 (x=1): neighbours x=0 (label 0) and x=2 (label 0) -> 0; point 2: x=1 (1), x=3 (1) -> 1
    n = knn_loo_predict(X, y, k=2, tie_break="nearest")
    assert n[1] == 0 and n[2] == 1
    # point 0 (x=0): neighbours x=1 (label 1) then x=2 (label 0): a tie; nearest goes to 1, lowest to 0
    assert n[0] == 1 and knn_loo_predict(X, y, k=2, tie_break="lowest")[0] == 0


def test_task_decodability_result(small):
    model, prompts = small
    res = task_decodability(model, prompts, k=3)
    assert res.td.shape == (3,) and res.per_task.shape == (3, prompts.n_tasks)
    assert res.best_layer in res.layers
    enc = extract(model, prompts, progress=False)
    pred = knn_loo_predict(enc.at(2), enc.labels, k=3)  # the default tie-break, as scikit-learn
    assert res.at(2) == pytest.approx(float((pred == enc.labels).float().mean()))
    assert torch.allclose(res.confusion.sum(-1), torch.ones(3, prompts.n_tasks))
    df = res.to_dataframe()
    assert list(df["layer"]) == [0, 1, 2] and "td[color]" in df
    assert "Task decodability" in res._repr_html_()
    assert res.plot().data  # a plotly figure with traces


def test_task_vectors_are_means_and_round_trip(small, tmp_path):
    model, prompts = small
    enc = extract(model, prompts, progress=False)
    tv = enc.task_vectors()
    t = 2
    assert torch.allclose(tv.get(t, 1), enc.at(1)[prompts.labels == t].mean(0))
    tv.save(tmp_path / "tv")
    back = TaskVectors.load(tmp_path / "tv")
    assert torch.equal(back.vectors, tv.vectors) and back.task_names == tv.task_names
    back.check_model(model)
    other = build_model("categories", n_layers=2, d_model=32, n_heads=4, seed=1)
    with pytest.raises(ConfigError, match="another model"):
        back.check_model(other)
    wide = build_model("categories", n_layers=2, d_model=64, n_heads=4)
    with pytest.raises(ConfigError, match="d_model=32 but the model has d_model=64"):
        back.check_model(wide)


def test_projections(small):
    model, prompts = small
    enc = extract(model, prompts, progress=False)
    df = enc.project(1, "pca")
    assert list(df.columns) == ["pca1", "pca2", "task"] and len(df) == len(prompts)
    assert len(enc.project(1, "tsne")) == len(prompts)
    with pytest.raises(ConfigError, match="unknown projection"):
        enc.project(1, "lda")


def test_bad_input(small):
    model, prompts = small
    with pytest.raises(ConfigError, match="smaller than the number of prompts of every task"):
        task_decodability(model, prompts, k=12)
    with pytest.raises(ConfigError, match="at least two tasks"):
        task_decodability(model, prompts.by_task("color"), k=3)
    with pytest.raises(ConfigError, match="layer 3 is out of range"):
        extract(model, prompts, layers=[3])
    with pytest.raises(ConfigError, match="vocabulary has"):
        extract(model, tasks.get("shift", n_letters=52).sample(4, shots=0, seed=0))
    with pytest.raises(ConfigError, match="empty"):
        extract(model, prompts.subset([]))
    reg = build_model("sparse_regression_small", n_layers=1, d_model=16, n_heads=2, shots=3)
    with pytest.raises(ConfigError, match="input dimension 17"):
        extract(reg, tasks.get("sparse_regression").sample(1, shots=3, seed=0))


def test_emergence_on_a_short_run_and_track_encoding(tmp_path):
    from tvlens.cli import main

    rc = main(["train", "--family", "shift", "--out", str(tmp_path), "--steps", "8", "--batch-size", "12",
               "--n-layers", "2", "--d-model", "32", "--n-heads", "4", "--eval-every", "4",
               "--eval-n-per-task", "4", "--n-checkpoints", "4", "--no-progress", "--track-encoding"])
    assert rc == 0
    log = tvlens.read_log(tmp_path)
    assert all(len(r["td"]) == 3 and 0 <= min(r["td"]) and max(r["td"]) <= 1 for r in log)
    em = tvlens.emergence(tmp_path, n_per_task=12, k=3, progress=False)
    assert em.steps == [s for s, _ in tvlens.list_checkpoints(tmp_path)]
    assert em.td.shape == (len(em.steps), 3) and em.per_task_metric.shape == (len(em.steps), 6)
    # the same prompts at every step: the TD at a step equals task_decodability on that checkpoint
    fam = tvlens.tasks.get("shift")
    p = fam.sample(12, shots=4, seed=12345)
    ref = task_decodability(tvlens.load_model(tmp_path, step=em.steps[-1]), p, k=3)
    assert torch.allclose(em.td[-1], ref.td)
    assert -1 <= em.spearman() <= 1 or np.isnan(em.spearman())
    df = em.to_dataframe()
    assert list(df["step"]) == em.steps
    assert em.plot().data and "Emergence" in em._repr_html_()


def test_extract_of_the_embedding_layer_alone_equals_its_column_of_a_full_extraction():
    """Layer 0 is read by a hook at the start of block 0: extracting it alone must still run that block."""
    fam = tasks.get("categories")
    model = build_model(fam, n_layers=2, d_model=32, n_heads=4, seed=3)
    p = fam.sample(3, shots=2, seed=0)
    full = extract(model, p, progress=False)
    for layer in (0, 1, 2):
        alone = extract(model, p, layers=[layer], progress=False)
        assert torch.equal(alone.acts[:, 0], full.acts[:, full.layers.index(layer)])


def test_chance_counts_the_tasks_that_have_prompts(small):
    model, _ = small
    fam = tasks.get("categories")
    sub = fam.sample(8, shots=3, seed=2, tasks=[0, 1])  # two of the family's tasks
    assert len(sub.task_names) > 2
    res = task_decodability(model, sub, k=3)
    assert res.chance == pytest.approx(0.5)
    assert task_decodability(model, fam.sample(8, shots=3, seed=2), k=3).chance == pytest.approx(1 / len(fam.task_names))
