"""The language-model study path: text families -> tokenization -> accuracy -> TD -> fit -> finetune,
on a small GPT-2 built locally (weights and tokenizer in a tmp folder) and on the shipped models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_text_tasks import lexicon_words, make_tokenizer

import tvlens
from tvlens.errors import ConfigError, OfflineWeightsError
from tvlens.finetune import resolve_blocks
from tvlens.llm import greedy_generate, linear_fit, teacher_forced_exact_match, text_accuracy
from tvlens.train import answer_loss


def _save_tiny_gpt2(folder, n_layer: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    words = lexicon_words()
    tok = make_tokenizer(words)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(words), n_positions=128, n_ctx=128, n_embd=32, n_layer=n_layer, n_head=4,
                     bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    return _save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="module")
def gpt2(gpt2_folder):
    return tvlens.load_model(gpt2_folder)




# --------------------------------------------------------------------------- offline loading
def test_load_model_by_name_from_the_local_hugging_face_cache(gpt2_folder, gpt2, tmp_path, monkeypatch):
    """``load_model("gpt2")`` with HF_HUB_OFFLINE=1 reads the weights from the local cache, never the hub."""
    import shutil

    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    snap = cache / "models--gpt2" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (cache / "models--gpt2" / "refs").mkdir()
    (cache / "models--gpt2" / "refs" / "main").write_text("0" * 40)
    for f in gpt2_folder.iterdir():
        shutil.copy(f, snap / f.name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    model = tvlens.load_model("gpt2")
    ids = torch.tensor([[0, 5, 9, 2]])
    assert torch.allclose(model(ids).log_softmax(-1), gpt2(ids).log_softmax(-1), atol=1e-5)
    assert model.tokenizer is not None
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(OfflineWeightsError, match="offline"):
        tvlens.load_model("gpt2")


# --------------------------------------------------------------------------- the whole path
def test_text_family_through_every_analysis(gpt2):
    fam = tvlens.tasks.get("pos")
    p = fam.sample(6, shots=2, seed=0, tokenizer=gpt2.tokenizer)
    assert p.seq_len <= gpt2.cfg.n_ctx
    # single-token answers: first-token scoring is exact match, and icl_accuracy agrees
    acc = text_accuracy(gpt2, p)
    assert torch.equal(acc.per_prompt, tvlens.icl_accuracy(gpt2, p).per_prompt)
    assert acc.notes["scoring"] == "first_token"
    # extract at the query position equals a full run_with_cache (right padding cannot leak backwards)
    enc = tvlens.extract(gpt2, p, progress=False)
    _, cache = gpt2.run_with_cache(p.tokens)
    rows = torch.arange(len(p))
    assert torch.allclose(enc.at(2), cache["blocks.1.hook_resid_post"][rows, p.query_pos], atol=1e-5)
    td = tvlens.task_decodability(enc, k=3)
    assert td.td.shape == (3,)
    # task-vector patching runs unchanged (pos records every task's answer on the query)
    res = tvlens.run_patching(gpt2, p, enc.task_vectors([1]), layers=[1], progress=False)
    assert res.flip_rate.shape == (1,)


def test_td_vs_accuracy_rows_and_fit(gpt2):
    res = tvlens.td_vs_accuracy(gpt2, ["pos", "lexical"], shots=(1, 2), n_per_task=6, k=3, progress=False)
    df = res.to_dataframe()
    assert len(df) == 2 * 6 + 2 * 5  # null left out: pos' 6 tags, lexical's 5 tasks, two shot counts
    assert "null" not in set(df["task"])
    # each point is what the analyses give on the same prompts
    p = tvlens.tasks.get("lexical").sample(6, shots=2, seed=0, tokenizer=gpt2.tokenizer)
    acc = text_accuracy(gpt2, p)
    td = tvlens.task_decodability(tvlens.extract(gpt2, p, progress=False), k=3)
    sel = df[(df.family == "lexical") & (df.shots == 2)]
    assert (sel["layer"] == td.best_layer).all()
    for _, r in sel.iterrows():
        assert r["accuracy"] == acc.per_task[r["task"]]
        assert r["td"] == pytest.approx(float(td.per_task[td.layers.index(td.best_layer), p.task_names.index(r["task"])]))
    assert res.fits["all"]["n"] == len(df) and res.fits["pos"]["n"] == 12
    assert "TD vs ICL accuracy" in res._repr_html_() and res.plot().data


def test_linear_fit_matches_scikit_learn():
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, 30)
    y = 0.7 * x + rng.normal(0, 0.2, 30)
    fit = linear_fit(x, y)
    lr = LinearRegression().fit(x[:, None], y)
    assert fit["slope"] == pytest.approx(lr.coef_[0]) and fit["intercept"] == pytest.approx(lr.intercept_)
    assert fit["r2"] == pytest.approx(r2_score(y, lr.predict(x[:, None])))
    assert 0.3 < fit["r2"] < 1
    assert np.isnan(linear_fit([0.5, 0.5, 0.5], [0, 1, 0])["r2"])  # constant TD: no line


def test_greedy_generation_of_multi_token_answers(gpt2):
    fam = tvlens.tasks.get("bitwise_text")  # 5-digit answers: 5 tokens with this tokenizer
    p = fam.sample(1, shots=2, seed=0, tokenizer=gpt2.tokenizer, scoring="greedy")
    gen = greedy_generate(gpt2, p)
    assert gen.shape == (len(p), 5)
    with torch.no_grad():  # a naive loop, one prompt and one token at a time
        for i in range(len(p)):
            x = p.tokens[i, : int(p.query_pos[i]) + 1].tolist()
            for j in range(5):
                nxt = int(gpt2(torch.tensor([x]))[0, -1].argmax())
                assert nxt == int(gen[i, j])
                x.append(nxt)
    # make half the prompts' answers the model's own greedy output: those must score 1
    q = p.subset(torch.arange(len(p)))
    keep = torch.arange(len(p)) % 2 == 0
    q.extra["answer_tokens"] = torch.where(keep[:, None], gen, q.extra["answer_tokens"])
    pos = q.query_pos[:, None] + 1 + torch.arange(5)[None]
    q.tokens.scatter_(1, pos, q.extra["answer_tokens"])
    q.answers = q.extra["answer_tokens"][:, :1].clone()
    greedy = text_accuracy(gpt2, q, scoring="greedy")
    assert greedy.notes["scoring"] == "greedy"
    assert bool((greedy.per_prompt[keep] == 1).all())
    assert torch.equal(greedy.per_prompt.bool(), teacher_forced_exact_match(gpt2, q))
    with torch.no_grad():  # the whole answer's log-probability, from full forward passes
        ref = [sum(float(gpt2(q.tokens[i : i + 1]).log_softmax(-1)[0, int(q.query_pos[i]) + j,
                                                                   q.extra["answer_tokens"][i, j]]) for j in range(5))
               for i in range(len(q))]
    assert torch.allclose(greedy.logprob, torch.tensor(ref), atol=1e-4)
    first = text_accuracy(gpt2, q, scoring="first_token")
    assert bool((first.per_prompt >= greedy.per_prompt).all())  # a right first token is necessary
    icl = tvlens.icl_accuracy(gpt2, q)  # the prompts chose greedy scoring: icl_accuracy keeps it
    assert icl.notes["scoring"] == "greedy" and torch.equal(icl.per_prompt, greedy.per_prompt)


def test_every_scorer_honours_the_prompts_scoring(gpt2):
    """Prompts sampled with scoring="greedy" are never silently scored by their first token."""
    from dataclasses import replace

    fam = tvlens.tasks.get("bitwise_text")
    p = fam.sample(2, shots=2, seed=3, tokenizer=gpt2.tokenizer, scoring="greedy")
    gen = greedy_generate(gpt2, p)
    # every answer: the model's own first token, then digits it does not generate
    q = p.subset(torch.arange(len(p)))
    q.extra["answer_tokens"] = torch.cat([gen[:, :1], torch.where(gen[:, 1:] == 6, 7, 6)], 1)  # ids of "0", "1"
    q.tokens.scatter_(1, q.query_pos[:, None] + 1 + torch.arange(5)[None], q.extra["answer_tokens"])
    q.answers = gen[:, :1].clone()
    assert bool((text_accuracy(gpt2, q, scoring="first_token").per_prompt == 1).all())
    acc = tvlens.icl_accuracy(gpt2, q)
    assert acc.notes["scoring"] == "greedy" and bool((acc.per_prompt == 0).all())
    first = tvlens.icl_accuracy(gpt2, replace(q, params={**q.params, "scoring": "first_token"}))
    assert first.notes["scoring"] == "first_token" and bool((first.per_prompt == 1).all())
    assert "greedy" in acc.plot().layout.title.text
    # run_patching scores first tokens only: it refuses these prompts, and takes them sampled for it
    vec = tvlens.extract(gpt2, q, progress=False).task_vectors([1])
    with pytest.raises(ConfigError, match="run_patching scores an answer by its first token.*scoring='greedy'.*"
                                          "14 of 14 answers span several tokens.*text_accuracy"):
        tvlens.run_patching(gpt2, q, vec, layers=[1], progress=False)
    tvlens.run_patching(gpt2, replace(q, params={**q.params, "scoring": "first_token"}), vec, layers=[1],
                        progress=False)
    # td_vs_accuracy scores greedily what it samples greedily: its points are icl_accuracy's
    res = tvlens.td_vs_accuracy(gpt2, fam, shots=(2,), n_per_task=4, k=3, scoring="greedy", seed=5, progress=False)
    ref = tvlens.icl_accuracy(gpt2, fam.sample(4, shots=2, seed=5, tokenizer=gpt2.tokenizer, scoring="greedy"))
    assert res.scoring == "greedy" and ref.notes["scoring"] == "greedy"
    assert {r["task"]: r["accuracy"] for r in res.rows} == {t: v for t, v in ref.per_task.items() if t != "null"}


def test_td_vs_accuracy_on_the_shipped_bitwise_model():
    model = tvlens.load_model("bitwise", step=1347)
    res = tvlens.td_vs_accuracy(model, "bitwise", shots=(1, 4), n_per_task=12, k=5, progress=False)
    df = res.to_dataframe()
    assert len(df) == 2 * 6 and df["accuracy"].std() > 0.05 and df["td"].std() > 0.02
    from sklearn.metrics import r2_score

    f = res.fits["bitwise"]
    assert f["r2"] == pytest.approx(r2_score(df["accuracy"], f["slope"] * df["td"] + f["intercept"]))
    assert f["slope"] > 0  # more decodable tasks are answered better
    assert "R²" in repr(res)


def test_finetune_trains_only_the_chosen_blocks():
    model = tvlens.load_model("bitwise", step=605)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = tvlens.finetune(model, "bitwise", layers="first_half", steps=10, batch_size=16, n_eval_per_task=11,
                          progress=False)
    assert res.blocks == [0, 1]
    for k, v in model.state_dict().items():  # the given model is untouched
        assert torch.equal(v, before[k]), k
    after = res.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("blocks.0.", "blocks.1.")) for k in changed)
    assert any(k.startswith("blocks.1.mlp") for k in changed)
    ev = res_eval(res)  # the held-out prompts: their answer loss went down
    with torch.no_grad():
        assert float(answer_loss(res.model, ev)) < float(answer_loss(model, ev))
    assert res.acc_before.mean == pytest.approx(tvlens.icl_accuracy(model, ev).mean)
    assert res.acc_after.mean == pytest.approx(tvlens.icl_accuracy(res.model, ev).mean)
    df = res.to_dataframe()
    assert {"before", "after", "change"} <= set(df.columns) and "TD (best layer)" in set(df["what"])
    assert res.plot().data and "FinetuneResult" in res._repr_html_()


def res_eval(res):
    from tvlens.finetune import EVAL_SEED

    return tvlens.tasks.get("bitwise").sample(11, shots=4, seed=EVAL_SEED + res.notes["seed"])


def test_lora_finetuning_on_the_text_model_is_low_rank(gpt2):
    from tvlens.backends.loading import tl_state  # HookedTransformer-format names on either class

    before = {k: v.clone() for k, v in tl_state(gpt2).items()}
    res = tvlens.finetune(gpt2, "lexical", layers="last:1", steps=15, lr=1e-2, lora_rank=2, batch_size=10,
                          n_eval_per_task=6, k=3, progress=False)
    after = tl_state(res.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"blocks.1.{n}" for n in ("attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O", "mlp.W_in",
                                                  "mlp.W_out")}
    for k in changed:
        d = after[k] - before[k]
        if k.endswith(("W_Q", "W_K", "W_V")):  # [heads, d_model, d_head]: rank over d_model
            d = d.permute(1, 0, 2).reshape(d.shape[1], -1)
        elif k.endswith("W_O"):
            d = d.reshape(-1, d.shape[-1])
        assert torch.linalg.matrix_rank(d, rtol=1e-4) <= 2, k
    assert res.n_trainable == sum(2 * (a + b) for a, b in ((32, 32), (32, 32), (32, 32), (32, 32), (32, 128),
                                                           (128, 32)))
    assert not any(isinstance(m, torch.nn.utils.parametrize.ParametrizationList) for m in res.model.modules())
    assert res.losses[-1] < res.losses[0]


def test_bad_input(gpt2):
    model = tvlens.load_model("bitwise", step=605)
    assert resolve_blocks(model, "last_half") == [2, 3] and resolve_blocks(model, "first:1") == [0]
    assert resolve_blocks(model, range(1, 3)) == [1, 2]
    for bad, match in ((4, "out of range.*0..3"), ([0, 7], "out of range"), ("first:5", "k must be in 1..4"),
                       ([], "empty"), ([1, 1], "twice"), ("middle", "first_half")):
        with pytest.raises(ConfigError, match=match):
            tvlens.finetune(model, "bitwise", layers=bad, steps=1, progress=False)
    with pytest.raises(ConfigError, match="lora_rank"):
        tvlens.finetune(model, "bitwise", layers=[0], lora_rank=0, progress=False)
    with pytest.raises(ConfigError, match="steps"):
        tvlens.finetune(model, "bitwise", layers=[0], steps=0, progress=False)
    with pytest.raises(ConfigError, match="shots=30"):
        tvlens.finetune(gpt2, "lexical", layers=[0], shots=30, progress=False)
    with pytest.raises(ConfigError, match="scoring"):
        tvlens.td_vs_accuracy(gpt2, "pos", shots=(1,), scoring="best", progress=False)
    with pytest.raises(ConfigError, match="shots=25"):
        tvlens.td_vs_accuracy(gpt2, "lexical", shots=(1, 25), progress=False)
    with pytest.raises(ConfigError, match="vocabulary"):  # pos' word tokenizer does not fit the bitwise model
        tvlens.td_vs_accuracy(model, "pos", shots=(1,), n_per_task=11, progress=False)
