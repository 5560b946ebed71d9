"""Task families: their rules, reproducibility, PromptSet operations and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tvlens
from tvlens import tasks
from tvlens.errors import ConfigError, UnknownNameError


def _bits_to_int(bits):
    return int("".join(str(int(b)) for b in bits), 2)


def test_registry_lists_and_builds_every_family():
    names = tasks.list()
    assert {"bitwise", "categories", "shift", "sparse_regression"} <= set(names)
    for n in names:
        fam = tasks.get(n)
        p = fam.sample(2, shots=3, seed=1)
        assert len(p) == 2 * fam.n_tasks
        assert p.labels.tolist() == sorted(p.labels.tolist())  # task-major order
        assert tasks.from_config(fam.config()).config() == fam.config()


@pytest.mark.parametrize("op,fn", [
    ("and", lambda a, b: a & b), ("or", lambda a, b: a | b), ("xor", lambda a, b: a ^ b),
    ("nand", lambda a, b: ~(a & b) & 31), ("nor", lambda a, b: ~(a | b) & 31), ("xnor", lambda a, b: ~(a ^ b) & 31),
])
def test_bitwise_rules_match_python_operators(op, fn):
    fam = tasks.get("bitwise")
    p = fam.sample(50, shots=4, seed=3, tasks=[op])
    toks = p.str_tokens
    for i in range(len(p)):
        s = toks(i)
        q = int(p.query_pos[i])
        a = _bits_to_int(s[q - 11 : q - 6])
        b = _bits_to_int(s[q - 5 : q])
        assert s[q - 6] == "," and s[q] == "->"
        ans = _bits_to_int([p.vocab[t] for t in p.answers[i]])
        assert ans == fn(a, b), (op, a, b, ans)
        # the examples follow the same rule
        for start in range(0, q - 11, 18):
            ea, eb = _bits_to_int(s[start : start + 5]), _bits_to_int(s[start + 6 : start + 11])
            assert _bits_to_int(s[start + 12 : start + 17]) == fn(ea, eb)


def test_bitwise_task_answers_hold_every_rule():
    fam = tasks.get("bitwise")
    p = fam.sample(10, shots=2, seed=0)
    for i in range(len(p)):
        assert torch.equal(p.task_answers[i, p.labels[i]], p.answers[i])
    xor, xnor = fam.task_names.index("xor"), fam.task_names.index("xnor")
    assert torch.equal(p.task_answers[:, xor], 1 - p.task_answers[:, xnor])


def test_bitwise_null_answers_random_and_optional():
    fam = tasks.get("bitwise")
    assert fam.task_names[-1] == "null"
    p = fam.sample(200, shots=0, seed=0, tasks=["null"])
    frac = p.answers.float().mean().item()
    assert 0.4 < frac < 0.6
    assert "null" not in tasks.get("bitwise", null=False).task_names


def test_categories_answer_is_the_inputs_token_of_the_category():
    fam = tasks.get("categories")
    p = fam.sample(30, shots=4, seed=2)
    for i in range(len(p)):
        s = p.str_tokens(i)
        q = int(p.query_pos[i])
        query_words = s[q - 6 : q]
        task = p.task_names[int(p.labels[i])]
        ans = p.vocab[int(p.answers[i, 0])]
        assert ans in query_words
        # one token of every category, in some order
        cats = [next(c for c, ws in zip(fam.categories, fam.words) if w in ws) for w in query_words]
        assert sorted(cats) == sorted(fam.categories)
        if task != "null":
            assert ans in fam.words[fam.categories.index(task)]


def test_shift_rule_shared_answers_and_no_copying():
    fam = tasks.get("shift")
    p = fam.sample(60, shots=6, seed=5)
    letters = fam.letters
    answer_sets = []
    for i in range(len(p)):
        s = p.str_tokens(i)
        q = int(p.query_pos[i])
        k = fam.offsets[int(p.labels[i])]
        xq = s[q - 1]
        assert p.vocab[int(p.answers[i, 0])] == letters[(letters.index(xq) + k) % fam.p]
        context = s[: q - 1]
        assert xq not in context  # the query letter is never in its own context
        for j in range(0, q - 1, 4):  # x -> y ;
            assert letters.index(s[j + 2]) == (letters.index(s[j]) + k) % fam.p
        answer_sets.append(int(p.labels[i]))
    # every task answers from the same letter set: no answer token reveals the task
    by_task = [set(p.answers[p.labels == t, 0].tolist()) for t in range(fam.n_tasks)]
    assert all(len(b) > 15 for b in by_task)
    assert set.intersection(*by_task)


def test_sparse_regression_rule_and_bases():
    fam = tasks.get("sparse_regression", noise_std=0.0)
    p = fam.sample(5, shots=19, seed=0)
    assert p.inputs.shape == (20, 40, 17)
    w = p.extra["w"]
    for i in range(len(p)):
        b = int(p.labels[i])
        support = (w[i] != 0).nonzero().flatten().tolist()
        assert support == list(range(4 * b, 4 * b + 4))
        x = p.inputs[i, 0::2, :16]
        y = p.inputs[i, 1::2, 16]
        assert torch.allclose(x @ w[i], y, atol=1e-5)
    assert torch.allclose(p.answers[:, 0], p.inputs[:, -1, 16])
    assert p.train_mask[0].tolist() == [True, False] * 20


def test_least_squares_baseline_is_exact_without_noise():
    fam = tasks.get("sparse_regression", noise_std=0.0)
    p = fam.sample(4, shots=19, seed=1)
    assert tasks.least_squares_baseline(p).max() < 1e-6


def test_same_seed_same_prompts_other_seed_other_prompts():
    for name in ["bitwise", "categories", "shift", "sparse_regression"]:
        fam = tasks.get(name)
        a, b, c = (fam.sample(8, shots=4, seed=s) for s in (7, 7, 8))
        assert torch.equal(a.model_input, b.model_input)
        assert torch.equal(a.answers, b.answers)
        assert not torch.equal(a.model_input, c.model_input)


def test_promptset_split_subset_concat_to_and_save(tmp_path):
    fam = tasks.get("shift")
    p = fam.sample(10, shots=4, seed=0)
    parts = p.split_by_task()
    assert list(parts) == fam.task_names
    assert all(len(v) == 10 and bool((v.labels == i).all()) for i, v in enumerate(parts.values()))
    back = tvlens.PromptSet.concat(list(parts.values()))
    assert torch.equal(back.tokens, p.tokens)
    sub = p.subset([3, 1])
    assert torch.equal(sub.tokens, p.tokens[[3, 1]])
    assert torch.equal(p[p.labels == 2].tokens, parts["shift+6"].tokens)
    assert (p[:5] + p[5:]).tokens.equal(p.tokens)
    assert p.to("cpu").tokens.device.type == "cpu"
    p.save(tmp_path / "ps")
    q = tvlens.PromptSet.load(tmp_path / "ps")
    assert torch.equal(q.tokens, p.tokens) and q.task_names == p.task_names and q.vocab == p.vocab
    assert "shift+1" in p._repr_html_()


def test_concat_refuses_mismatched_sets():
    a = tasks.get("shift").sample(2, shots=4, seed=0)
    with pytest.raises(ConfigError, match="shapes differ"):
        tvlens.PromptSet.concat([a, tasks.get("shift").sample(2, shots=3, seed=0)])
    with pytest.raises(ConfigError, match="same family"):
        tvlens.PromptSet.concat([a, tasks.get("categories").sample(2, shots=4, seed=0)])
    with pytest.raises(ConfigError, match="at least one"):
        tvlens.PromptSet.concat([])


@pytest.mark.parametrize("name,params,match", [
    ("bitwise", {"n_bits": 0}, "n_bits must be >= 1"),
    ("bitwise", {"ops": ("and", "mod")}, "unknown ops"),
    ("categories", {"n_categories": 1}, "n_categories must be >= 2"),
    ("shift", {"offsets": (1, 27)}, "distinct and nonzero"),
    ("shift", {"offsets": (0, 2)}, "distinct and nonzero"),
    ("sparse_regression", {"D": 16, "r": 5}, "must divide D"),
    ("sparse_regression", {"D": 16, "r": 4, "n_bases": 5}, "do not fit"),
])
def test_impossible_family_parameters(name, params, match):
    with pytest.raises(ConfigError, match=match):
        tasks.get(name, **params)


def test_bad_sample_arguments():
    fam = tasks.get("shift")
    with pytest.raises(ConfigError, match="shots must be >= 0"):
        fam.sample(2, shots=-1)
    with pytest.raises(ConfigError, match="n_per_task must be >= 1"):
        fam.sample(0)
    with pytest.raises(ConfigError, match="at most 24"):
        fam.sample(2, shots=25)
    with pytest.raises(UnknownNameError, match="known: .*shift\\+1"):
        fam.sample(2, tasks=["shift+2"])
    with pytest.raises(UnknownNameError, match="known families: .*bitwise"):
        tasks.get("bitwize")


def test_zero_shot_prompts_are_just_the_query():
    p = tasks.get("shift").sample(3, shots=0, seed=0)
    assert p.tokens.shape[1] == 3 and int(p.query_pos[0]) == 1
    assert np.all(p.train_mask.sum(1).numpy() == 1)


def test_codes_rule_shared_answers_and_no_copying():
    fam = tasks.get("codes")
    p = fam.sample(40, shots=4, seed=11)
    for i in range(len(p)):
        s = p.str_tokens(i)
        q = int(p.query_pos[i])
        task = p.task_names[int(p.labels[i])]
        query_words = s[q - 6 : q]
        word = next(w for w in query_words if w in fam.words[fam.categories.index(task)])
        assert p.vocab[int(p.answers[i, 0])] == str(fam.code_of(word))
        context = s[: q - 6]
        assert not set(query_words) & set(context)  # the query's words never appear in its context
        for j in range(0, q - 6, 9):  # 6 words -> code ;
            ex_words, code = s[j : j + 6], s[j + 7]
            assert len({fam.code_of(w) for w in ex_words}) == 6  # distinct codes within an input
            ex_word = next(w for w in ex_words if w in fam.words[fam.categories.index(task)])
            assert code == str(fam.code_of(ex_word))
    by_task = [set(p.answers[p.labels == t, 0].tolist()) for t in range(fam.n_tasks)]
    assert all(b == by_task[0] for b in by_task)  # every task answers from the same code set


def test_codes_curriculum_reveals_only_in_training_prompts():
    fam = tasks.get("codes", reveal=1.0)
    train = fam.sample_train(5, shots=3, seed=0)
    evalp = fam.sample(5, shots=3, seed=0)
    code_ids = {fam.code_token(k) for k in range(fam.K)}
    def ex_answers(ps):  # the examples' answers (trained positions other than the query's)
        m = ps.train_mask.clone()
        m[torch.arange(len(ps)), ps.query_pos] = False
        return {int(t) for t in ps.targets[m]}

    assert not ex_answers(train) & code_ids  # every example answers with the word itself
    assert {int(t) for t in evalp.targets[evalp.train_mask]} <= code_ids
    with pytest.raises(ConfigError, match="reveal must be"):
        tasks.get("codes", reveal=1.5)
    with pytest.raises(ConfigError, match="n_codes=3 must be >= n_categories=6"):
        tasks.get("codes", n_codes=3)


@pytest.mark.parametrize("name", ["position", "lookup"])
def test_position_and_lookup_rules(name):
    fam = tasks.get(name)
    p = fam.sample(20, shots=3, seed=4)
    for i in range(len(p)):
        s = p.str_tokens(i)
        q = int(p.query_pos[i])
        t = int(p.labels[i])
        ans = p.vocab[int(p.answers[i, 0])]
        if name == "position":
            assert ans == s[q - 5 + t]
            assert not set(s[q - 5 : q]) & set(s[: q - 5])
        else:
            table = s[q - 2 * fam.K : q]
            assert ans == table[table.index(fam.keys[t]) + 1]


def test_shift_marked_query_puts_the_query_at_its_own_token():
    fam = tasks.get("shift", marked_query=True)
    p = fam.sample(5, shots=3, seed=0)
    arrow = fam.vocab.index("->")
    for i in range(len(p)):
        q = int(p.query_pos[i])
        toks = p.str_tokens(i)
        assert toks[q].endswith("?") and toks[q - 1] == ";" and int(p.tokens[i, q]) != arrow
        x = fam.letters.index(toks[q][:-1])
        t = int(p.labels[i])
        assert toks[q + 1] == fam.letters[(x + fam.offsets[t]) % fam.p]
        assert bool(p.train_mask[i, q]) and int(p.targets[i, q]) == int(p.tokens[i, q + 1])
    assert (p.tokens[:, : int(p.query_pos[0])] < fam.p + 2).all()  # marked tokens only at the query
    with pytest.raises(ConfigError, match="marked_query"):
        tasks.get("shift", marked_query="yes")
