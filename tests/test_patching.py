"""run_patching: equal to a naive hook-based reference, controls, bad input."""

from __future__ import annotations

import pytest
import torch

import tvlens
from tvlens import tasks
from tvlens.encoding import extract, resid_hook_name
from tvlens.errors import ConfigError
from tvlens.models import build_model
from tvlens.patching import run_patching


def _naive(model, prompts, vectors, layer, source, mode, scale):  # noqa: C901
    """Reference: one full forward per prompt with a hook that patches the query position."""
    s = prompts.task_names.index(source)
    follows = torch.zeros(prompts.n_tasks)
    for i in range(len(prompts)):
        toks = prompts.tokens[i : i + 1].clone()
        q = int(prompts.query_pos[i])
        n_ans = prompts.n_answer
        toks[0, q + 1 : q + 1 + n_ans] = prompts.task_answers[i, s]
        v = vectors.get(source, layer)
        own = vectors.get(int(prompts.labels[i]), layer)

        def hook(act, hook):
            act = act.clone()
            if mode == "replace":
                act[0, q] = v
            elif mode == "add":
                act[0, q] = act[0, q] + scale * v
            else:
                act[0, q] = act[0, q] + scale * (v - own)
            return act

        logits = model.run_with_hooks(toks, fwd_hooks=[(resid_hook_name(layer), hook)])
        pred = logits[0, q : q + n_ans].argmax(-1)
        follows[int(prompts.labels[i])] += float(torch.equal(pred, prompts.task_answers[i, s]))
    return follows / torch.bincount(prompts.labels, minlength=prompts.n_tasks).float()


@pytest.mark.parametrize("family,mode", [("categories", "replace"), ("bitwise", "add"), ("shift", "replace"),
                                         ("bitwise", "swap"), ("categories", "swap")])
def test_run_patching_equals_naive_hook_loop(family, mode):
    fam = tasks.get(family)
    model = build_model(fam, n_layers=2, d_model=32, n_heads=4, seed=2)
    prompts = fam.sample(4, shots=2, seed=3)
    vecs = extract(model, prompts, progress=False).task_vectors()
    res = run_patching(model, prompts, vecs, layers=[0, 1], mode=mode, scale=2.0, batch_size=7, progress=False)
    for layer in (0, 1):
        for source in (fam.task_names[0], fam.task_names[-1]):
            ref = _naive(model, prompts, vecs, layer, source, mode, 2.0)
            got = res.grid(layer)[res.source_names.index(source)]
            assert torch.allclose(got, ref), (layer, source, got, ref)


def test_patching_result_views():
    fam = tasks.get("shift")
    model = build_model(fam, n_layers=2, d_model=32, n_heads=4)
    prompts = fam.sample(3, shots=2, seed=0)
    res = run_patching(model, prompts, extract(model, prompts, progress=False).task_vectors(), progress=False)
    assert res.layers == [0, 1]
    df = res.to_dataframe()
    assert len(df) == 2 * fam.n_tasks * fam.n_tasks
    assert res.plot().data and "Task-vector patching" in res._repr_html_()
    best, why = res.best_layer_choice()  # an untrained model: a patch may change nothing (None, and why)
    assert best in res.layers or (best is None and "changes nothing" in why)


def test_regression_patching_self_vs_cross():
    fam = tasks.get("sparse_regression_small")
    model = build_model(fam, n_layers=2, d_model=32, n_heads=4, shots=9)
    p = fam.sample(4, shots=9, seed=0)
    vecs = extract(model, p, progress=False).task_vectors()
    res = run_patching(model, p, vecs, layers=[1], progress=False)
    assert res.metric == "mse" and res.delta_logprob_source.shape == (1, 4, 4)
    # adding nothing is no intervention: every source gives the unpatched squared error
    noop = run_patching(model, p, vecs, layers=[0, 1], mode="add", scale=0.0, progress=False)
    assert torch.allclose(noop.delta_logprob_source, noop.baseline_own.expand(2, 4, 4), atol=1e-5)


def test_bad_patching_input():
    fam = tasks.get("shift")
    model = build_model(fam, n_layers=2, d_model=32, n_heads=4)
    prompts = fam.sample(3, shots=2, seed=0)
    vecs = extract(model, prompts, progress=False).task_vectors()
    with pytest.raises(ConfigError, match="mode must be"):
        run_patching(model, prompts, vecs, mode="mix")
    with pytest.raises(ConfigError, match="final residual stream"):
        run_patching(model, prompts, vecs, layers=[2])
    with pytest.raises(ConfigError, match="another model"):
        run_patching(build_model(fam, n_layers=2, d_model=32, n_heads=4, seed=9), prompts, vecs)
    with pytest.raises(ConfigError, match="unknown source task"):
        run_patching(model, prompts, vecs, sources=["shift+2"])


def test_shipped_categories_model_follows_the_patched_task():
    """Conditional decoding on the shipped categories model: swapping in task A's vector after block 0."""
    model = tvlens.load_model("categories")
    fam = tvlens.model_info(model).task_family()
    prompts = fam.sample(50, shots=4, seed=777)
    vecs = extract(model, prompts, progress=False).task_vectors()
    res = run_patching(model, prompts, vecs, mode="swap", progress=False)
    best = res.best_layer(min_control=0.9)
    li = res.layers.index(best)
    assert float(res.control[li]) >= 0.9 and float(res.flip_rate[li]) >= 0.8, res.layer_profile()
    # replacing the whole residual erases the query's information: the control breaks
    rep = run_patching(model, prompts, vecs, mode="replace", layers=[best], progress=False)
    assert float(rep.control[0]) < 0.9


def test_rule_agreement_is_the_flip_floor():
    fam = tasks.get("bitwise")
    model = build_model(fam, n_layers=1, d_model=16, n_heads=2)
    p = fam.sample(20, shots=1, seed=1, tasks=["and", "or", "xor"])
    res = run_patching(model, p, extract(model, p, progress=False).task_vectors(), layers=[0], progress=False)
    a, o = res.source_names.index("and"), res.target_names.index("or")
    and_ans, or_ans = p.task_answers[:, 0], p.task_answers[:, 1]
    ref = (and_ans == or_ans).all(-1)[p.labels == o].float().mean()
    assert float(res.rule_agreement[a, o]) == pytest.approx(float(ref))
    assert torch.allclose(torch.diagonal(res.rule_agreement[:3, :3]), torch.ones(3))
    assert 0 <= res.flip_floor < 0.5


def test_task_vectors_make_zero_shot_prompts_follow_the_task():
    """Hendel et al.'s test: a zero-shot prompt (only the query) plus task A's vector answers by A's rule."""
    model = tvlens.load_model("categories")
    fam = tvlens.model_info(model).task_family()
    vecs = extract(model, fam.sample(50, shots=4, seed=1), progress=False).task_vectors()
    zero = fam.sample(50, shots=0, seed=2)
    assert tvlens.icl_accuracy(model, zero).mean < 0.3  # without the vector: about chance (1/6)
    res = run_patching(model, zero, vecs, mode="add", progress=False)
    real = [i for i, t in enumerate(res.source_names) if t != "null"]
    follows = res.follows_source[:, real][:, :, real].mean((1, 2))  # every (source, target) pair counts
    assert float(follows.max()) >= 0.75, follows


@pytest.mark.parametrize("mode", ["replace", "swap"])
def test_patching_at_answers_equals_naive_hook_loop(mode):
    """Vectors read at the examples' answer tokens are patched at every one of them."""
    from tvlens.encoding import representation_mask

    fam = tasks.get("codes")
    model = build_model(fam, n_layers=2, d_model=32, n_heads=4, seed=4)
    prompts = fam.sample(3, shots=2, seed=5)
    vecs = extract(model, prompts, progress=False, at="answers").task_vectors()
    assert vecs.read_at == "answers"
    res = run_patching(model, prompts, vecs, layers=[1], mode=mode, batch_size=5, progress=False)
    assert res.read_at == "answers"
    mask = representation_mask(prompts, "answers")
    layer, source = 1, fam.task_names[2]
    s = prompts.task_names.index(source)
    ref = torch.zeros(prompts.n_tasks)
    for i in range(len(prompts)):
        pos = mask[i].nonzero()[:, 0]
        q = int(prompts.query_pos[i])
        v, own = vecs.get(source, layer), vecs.get(int(prompts.labels[i]), layer)

        def hook(act, hook):
            act = act.clone()
            act[0, pos] = v if mode == "replace" else act[0, pos] + (v - own)
            return act

        logits = model.run_with_hooks(prompts.tokens[i : i + 1], fwd_hooks=[(resid_hook_name(layer), hook)])
        ref[int(prompts.labels[i])] += float(int(logits[0, q].argmax()) == int(prompts.task_answers[i, s, 0]))
    ref /= torch.bincount(prompts.labels, minlength=prompts.n_tasks).float()
    assert torch.allclose(res.grid(layer)[res.source_names.index(source)], ref)


def test_extract_at_answers_is_the_mean_over_example_answers():
    fam = tasks.get("categories")
    model = build_model(fam, n_layers=2, d_model=32, n_heads=4, seed=1)
    p = fam.sample(2, shots=3, seed=0)
    enc = extract(model, p, progress=False, at="answers", batch_size=5)
    _, cache = model.run_with_cache(p.tokens)
    for i in range(len(p)):
        q = int(p.query_pos[i])
        pos = [j for j in range(1, q) if bool(p.train_mask[i, j - 1])]
        assert len(pos) == 3  # one single-token answer per example
        for li, layer in enumerate(enc.layers):
            ref = cache[resid_hook_name(layer)][i, pos].mean(0)
            assert torch.allclose(enc.acts[i, li], ref, atol=1e-5)
    with pytest.raises(ConfigError, match="shots >= 1"):
        extract(model, fam.sample(2, shots=0, seed=0), progress=False, at="answers")
    with pytest.raises(ConfigError, match="at must be one of"):
        extract(model, p, progress=False, at="arrow")
    zero = fam.sample(2, shots=0, seed=0)
    with pytest.raises(ConfigError, match="shots >= 1"):
        run_patching(model, zero, enc.task_vectors(), progress=False)


def test_shipped_default_model_keeps_its_task_at_the_examples_answers():
    """The default (codes) model decodes the task at the query position (TD ~1) but does not read it
    there: patching the query changes nothing. Its task lives at the examples' answer tokens, where
    replacing it with task A's vector after block 0 makes the answer follow A."""
    model = tvlens.load_model("default")
    fam = tvlens.model_info(model).task_family()
    prompts, src = fam.sample(40, shots=4, seed=7), fam.sample(60, shots=4, seed=1)
    at_query = run_patching(model, prompts, extract(model, src, progress=False).task_vectors(), mode="swap",
                            progress=False)
    assert float(at_query.flip_rate.max()) < 0.2 and float(at_query.control.min()) >= 0.9, at_query.layer_profile()
    res = run_patching(model, prompts, extract(model, src, progress=False, at="answers").task_vectors(),
                       mode="replace", progress=False)
    li = res.layers.index(res.best_layer(min_control=0.9))
    assert float(res.control[li]) >= 0.9 and float(res.flip_rate[li]) >= 0.8, res.layer_profile()


def _result(control: float, unpatched: float, flip: float) -> "tvlens.PatchingResult":
    """A 2-task result at one layer: own-task control, unpatched accuracy and flip rate as given."""
    from tvlens.patching import PatchingResult

    fs = torch.tensor([[[control, flip], [flip, control]]])
    return PatchingResult(layers=[3], source_names=["a", "b"], target_names=["a", "b"], mode="swap", scale=1.0,
                          follows_source=fs, follows_own=1 - fs, delta_logprob_source=torch.zeros_like(fs),
                          baseline_own=torch.tensor([unpatched, unpatched]), baseline_source=torch.zeros(2, 2))


def test_own_task_control_is_judged_against_the_unpatched_accuracy():
    # a small model answers 60% unpatched: a control of 0.55 keeps what it does (it cannot reach 0.9)
    layer, why = _result(control=0.55, unpatched=0.6, flip=0.4).best_layer_choice()
    assert layer == 3 and "control holds" in why and "unpatched accuracy 0.600" in why and "disturbs" not in why
    # the same control where the model answers everything unpatched: the patch disturbs its own task
    layer, why = _result(control=0.55, unpatched=1.0, flip=0.4).best_layer_choice()
    assert layer == 3 and "disturbs" in why and ">= 0.900: min_control 0.9" in why
    # far below the unpatched accuracy: disturbed, and the message gives both numbers
    _, why = _result(control=0.3, unpatched=0.6, flip=0.4).best_layer_choice()
    assert "disturbs" in why and "here 0.300" in why and "unpatched accuracy 0.600 minus 0.1" in why
    assert "unpatched accuracy 0.600" in repr(_result(control=0.55, unpatched=0.6, flip=0.4))
    with pytest.raises(ConfigError, match="max_control_drop"):
        _result(0.5, 0.6, 0.4).best_layer_choice(max_control_drop=float("nan"))
