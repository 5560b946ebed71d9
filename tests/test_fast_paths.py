"""The fast paths of extraction and scoring give today's numbers, on both model classes.

- extraction (``tvlens.extract``) runs only the blocks it reads and never unembeds: the same
  representations as a full ``run_with_cache``;
- a bridge's final residual is one forward pass that stops after the blocks (no per-shape recording
  pass, no final norm, no unembedding), equal to the block replay it replaced;
- first-token and greedy scoring unembed only the answer positions, in chunks (never
  ``[batch, seq, vocab]``), and greedy scoring is teacher-forced exact match in one pass per batch:
  the same verdicts as greedy generation (``greedy_generate``) and the same log-probabilities as the
  full logits;
- ``bitwise_text`` with first-token scoring on a tokenizer whose answers all begin with the same token
  is refused, and ``run_patching`` says why when no patch can change what is scored.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from test_backends import _hf_folder
from test_text_tasks import lexicon_words, make_tokenizer

import tvlens
from tvlens import accuracy
from tvlens.accuracy import answer_scores, at_answer_positions
from tvlens.backends import get_backend, has_hooked_transformer
from tvlens.errors import ConfigError
from tvlens.llm import greedy_generate, text_accuracy

BACKENDS = ["bridge"] + (["hooked"] if has_hooked_transformer() else [])
NOPROC = dict(fold_ln=False, center_writing_weights=False, center_unembed=False)


def _load(folder, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tvlens.load_model(folder, backend=backend, **(NOPROC if backend == "hooked" else {}))


class Count:
    """Passes over the model (runs of block 0), blocks run (their MLP ran: a bridge block that stops the
    pass is entered but not run), and every unembedding call's input shape."""

    def __init__(self, model):
        self.model, self.bk = model, get_backend(model)
        self.passes, self.blocks, self.unembed_shapes, self.handles = 0, [0] * self.bk.n_layers, [], []

    def __enter__(self):
        for i, b in enumerate(self.model.blocks):
            self.handles.append(b.mlp.register_forward_pre_hook(lambda m, a, _i=i: self._block(_i)))
        self.handles.append(self.model.unembed.hook_in.register_forward_pre_hook(
            lambda m, a: self.unembed_shapes.append(tuple(a[0].shape))))
        return self

    def _block(self, i):
        self.blocks[i] += 1
        self.passes += i == 0

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------- extraction
@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma2"])
def arch_folder(request, tmp_path_factory):
    return request.param, _hf_folder(tmp_path_factory, request.param)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extract_equals_run_with_cache_and_never_unembeds(arch_folder, backend):
    arch, folder = arch_folder
    if backend == "hooked" and arch == "gemma2":
        pytest.skip("TL 3.9's HookedTransformer has no Gemma-2 from a local config")
    model = _load(folder, backend)
    p = tvlens.tasks.get("codes").sample(6, shots=2, seed=0)
    n = get_backend(model).n_layers
    _, cache = model.run_with_cache(p.tokens)
    rows = torch.arange(len(p))
    for layers in ([0, 1, 2], [1], [n]):
        with Count(model) as c:
            enc = tvlens.extract(model, p, layers=layers, progress=False)
        for layer in layers:
            name = "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"
            ref = cache[name][rows, p.query_pos]
            assert (enc.at(layer) - ref).abs().max() < 1e-5, (arch, backend, layer)
        assert c.unembed_shapes == []  # never unembeds
        assert c.passes == 1  # one pass per batch: no recording pass
        assert c.blocks == [1 if i < max(max(layers), 1) else 0 for i in range(n)]  # only the blocks it reads
    if backend == "bridge":  # SDPA where exact: Llama's attention wraps HF's projections; GPT-2 splits c_attn
        assert (get_backend(model)._sdpa_plan() is not None) == (arch == "llama")


def test_bridge_runs_hugging_face_sdpa_attention_only_when_no_attention_hook_can_fire(arch_folder, monkeypatch):
    arch, folder = arch_folder
    if arch != "llama":
        pytest.skip("SDPA swap applies to Llama-like attention")
    model = _load(folder, "bridge")
    bk = get_backend(model)
    x = tvlens.tasks.get("codes").sample(3, shots=2, seed=1).tokens
    entered = []
    cls = type(model.blocks[0].attn)
    plain = cls.forward
    # a spy on the bridge's attention class that is no module hook (a module hook keeps the bridge's attention)
    monkeypatch.setattr(cls, "forward", lambda self, *a, **k: (entered.append(1), plain(self, *a, **k))[1])
    try:
        bk.final_resid(x)
        assert len(entered) == 2  # off unless an analysis asks for it (prefer_fast_attention)
        entered.clear()
        with bk.prefer_fast_attention():
            fast = bk.final_resid(x)
        assert entered == []  # the bridge's eager re-implementation did not run
        pattern = []
        with bk.hooks([("blocks.0.attn.hook_pattern", lambda a, hook: pattern.append(a.shape))]), \
                bk.prefer_fast_attention():
            slow = bk.final_resid(x)
        assert len(entered) == 2 and pattern  # an attention hook: the bridge's attention runs (both blocks)
        seen = []
        extra = [("blocks.0.hook_resid_post", lambda a, hook: seen.append(1))]
        with bk.prefer_fast_attention():
            assert bk.run_with_hooks(x, extra, stop_at_layer=1) is not None and seen
        assert len(entered) == 2  # a residual hook alone keeps SDPA (the stopped block 1 did not run)
    finally:
        monkeypatch.undo()
    # a module hook on an attention bridge (e.g. one that passes it a key/value cache) keeps it too
    handle = model.blocks[1].attn.register_forward_pre_hook(lambda m, a, k: entered.append(2), with_kwargs=True)
    try:
        with bk.prefer_fast_attention():
            bk.final_resid(x)
        assert entered[-1] == 2
    finally:
        handle.remove()
    assert (fast - slow).abs().max() < 1e-5
    assert model.original_model.config._attn_implementation == "eager"  # restored


@pytest.mark.parametrize("backend", BACKENDS)
def test_final_resid_is_one_pass_that_stops_after_the_blocks(arch_folder, backend):
    arch, folder = arch_folder
    if backend == "hooked" and arch == "gemma2":
        pytest.skip("TL 3.9's HookedTransformer has no Gemma-2 from a local config")
    model = _load(folder, backend)
    bk = get_backend(model)
    x = tvlens.tasks.get("codes").sample(3, shots=2, seed=1).tokens
    logits, cache = model.run_with_cache(x)
    with Count(model) as full:
        model(x)
    assert full.passes == 1 and full.unembed_shapes and full.blocks == [1] * bk.n_layers  # the counter sees them
    with Count(model) as c:
        r = bk.final_resid(x)
    assert c.passes == 1 and c.unembed_shapes == [] and c.blocks == [1] * bk.n_layers
    assert (r - cache[f"blocks.{bk.n_layers - 1}.hook_resid_post"]).abs().max() < 1e-5
    replay = bk.run_from(bk.embed_input(x), 0)  # the block replay final_resid used before
    assert (r - replay).abs().max() < 1e-5
    # a caller's hooks still fire (and may edit the stream) before the stop
    seen = []

    def zero(act, hook):
        seen.append(act.shape)
        return torch.zeros_like(act)
    with bk.hooks([(f"blocks.{bk.n_layers - 1}.hook_resid_post", zero)]):
        assert float(bk.final_resid(x).abs().max()) == 0.0 and seen
    # the full forward pass is unchanged after stopped passes (nothing left behind)
    assert (model(x) - logits).abs().max() < 1e-5


# --------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_family_accuracy_equals_the_full_logits_on_every_architecture(arch_folder, backend):
    """Soft-capped (Gemma-2), rotary/GQA (Llama) and GPT-2: chunked answer-position scoring gives the full
    logits' verdicts and log-probabilities."""
    arch, folder = arch_folder
    if backend == "hooked" and arch == "gemma2":
        pytest.skip("TL 3.9's HookedTransformer has no Gemma-2 from a local config")
    model = _load(folder, backend)
    p = tvlens.tasks.get("codes").sample(5, shots=2, seed=3)
    ok, lp = _old_first_token(model, p)
    with Count(model) as c:
        acc = tvlens.icl_accuracy(model, p)
    assert torch.equal(acc.per_prompt.bool(), ok) and torch.allclose(acc.logprob, lp, atol=1e-5)
    assert c.passes == 1 and sum(sh[0] for sh in c.unembed_shapes) == len(p) * p.n_answer


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """A small GPT-2 on a word tokenizer, its vocabulary padded to 3000 (so logits are wide)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    words = lexicon_words()
    tok = make_tokenizer(words)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=3000, n_positions=128, n_ctx=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                     eos_token_id=0)
    folder = tmp_path_factory.mktemp("wide-gpt2")
    GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@torch.no_grad()
def _old_first_token(model, p):
    """Today's first-token scoring before this change: full logits at every position, then gather."""
    n = p.n_answer
    logits = model(p.tokens[:, : int(p.query_pos.max()) + n])
    return answer_scores(at_answer_positions(logits, p.query_pos, n), p.answers)


def _generation_verdicts(model, p):
    """Greedy generation's verdicts (``greedy_generate``: one pass per generated token)."""
    full = p.extra["answer_tokens"]
    gen = greedy_generate(model, p, int(p.extra["answer_len"].max()))
    return ((gen == full) | (full < 0)).all(-1)


def _with_model_answers(model, p):
    """Half of the prompts get the model's own greedy continuation as their answer (so they score 1)."""
    gen = greedy_generate(model, p, int(p.extra["answer_len"].max()))
    toks, full = p.tokens.clone(), p.extra["answer_tokens"].clone()
    for i in range(0, len(p), 2):
        n = int(p.extra["answer_len"][i])
        q = int(p.query_pos[i])
        toks[i, q + 1 : q + 1 + n] = gen[i, :n]
        full[i, :n] = gen[i, :n]
    return replace(p, tokens=toks, answers=full[:, :1].clone(), extra={**p.extra, "answer_tokens": full})


@pytest.mark.parametrize("backend", BACKENDS)
def test_scoring_gives_todays_verdicts_in_one_pass(text_folder, backend):
    model = _load(text_folder, backend)
    tok = model.tokenizer
    # greedy: bitwise_text answers are 5 digits = 5 tokens here; lexical answers 1..2 tokens
    for fam in ("bitwise_text", "lexical"):
        p = _with_model_answers(model, tvlens.tasks.get(fam).sample(4, shots=2, seed=2, tokenizer=tok,
                                                                    scoring="greedy"))
        # the answer follows the query in the prompt (teacher forcing reads it there)
        for i in range(len(p)):
            n, q = int(p.extra["answer_len"][i]), int(p.query_pos[i])
            assert torch.equal(p.tokens[i, q + 1 : q + 1 + n], p.extra["answer_tokens"][i, :n])
        ref = _generation_verdicts(model, p)
        assert 0 < int(ref.sum()) < len(p)  # both verdicts occur
        with Count(model) as c:
            acc = text_accuracy(model, p, scoring="greedy", batch_size=None)
        assert torch.equal(acc.per_prompt.bool(), ref), fam
        assert c.passes == 1  # one forward pass for all prompts (generation ran one per answer token)
        A = int(p.extra["answer_len"].max())
        assert sum(s[0] for s in c.unembed_shapes) == len(p) * A  # only the answer positions
        # the whole answer's log-probability equals the full logits'
        with torch.no_grad():
            logits = model(p.tokens).log_softmax(-1)
        for i in range(len(p)):
            n, q = int(p.extra["answer_len"][i]), int(p.query_pos[i])
            want = logits[i, q + torch.arange(n), p.extra["answer_tokens"][i, :n]].sum()
            assert float(acc.logprob[i]) == pytest.approx(float(want), abs=1e-4)
    # first token: single-token pos answers
    p = tvlens.tasks.get("pos").sample(4, shots=2, seed=0, tokenizer=tok)
    ok, lp = _old_first_token(model, p)
    with Count(model) as c:
        acc = text_accuracy(model, p, batch_size=None)
    assert torch.equal(acc.per_prompt.bool(), ok) and torch.allclose(acc.logprob, lp, atol=1e-5)
    assert c.passes == 1 and sum(s[0] for s in c.unembed_shapes) == len(p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocabulary_scoring_never_builds_batch_by_seq_by_vocab(text_folder, backend, monkeypatch):
    """Scoring unembeds chunks of answer positions ``[rows, d_model]``, each within the logits budget."""
    model = _load(text_folder, backend)
    bk = get_backend(model)
    p = tvlens.tasks.get("bitwise_text").sample(3, shots=2, seed=0, tokenizer=model.tokenizer, scoring="greedy")
    whole = text_accuracy(model, p, batch_size=None)
    monkeypatch.setattr(accuracy, "UNEMBED_BUDGET", 4 * bk.d_vocab_out)  # 4 positions per chunk
    with Count(model) as c:
        chunked = text_accuracy(model, p, batch_size=None)
    A = int(p.extra["answer_len"].max())
    assert c.unembed_shapes and all(len(s) == 2 and s[0] <= 4 for s in c.unembed_shapes)
    assert sum(s[0] for s in c.unembed_shapes) == len(p) * A
    assert torch.equal(whole.per_prompt, chunked.per_prompt)
    assert torch.allclose(whole.logprob, chunked.logprob, atol=1e-5)
    with Count(model) as c:
        first = text_accuracy(model, p, scoring="first_token", batch_size=None)
    assert all(len(s) == 2 and s[0] <= 4 for s in c.unembed_shapes) and len(first.per_prompt) == len(p)


# --------------------------------------------------------------------------- indistinguishable first tokens
def _spaced_tokenizer():
    """A tokenizer that keeps the space before an answer as a token of its own (as SmolLM2's and
    Gemma-3's do before a digit string)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = lexicon_words() + [" "]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", behavior="isolated"),
                                                pre_tokenizers.Split("\n", behavior="isolated"),
                                                pre_tokenizers.Digits(individual_digits=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="[UNK]")


def test_first_token_scoring_of_bitwise_text_is_refused_when_every_answer_starts_alike():
    tok = _spaced_tokenizer()
    fam = tvlens.tasks.get("bitwise_text")
    with pytest.raises(ConfigError, match=r"first_token.*begins with the same token ' '.*scoring='greedy'"):
        fam.sample(3, shots=2, seed=0, tokenizer=tok, scoring="first_token")
    p = fam.sample(3, shots=2, seed=0, tokenizer=tok, scoring="greedy")  # whole answers: fine
    assert int(p.extra["answer_len"].min()) == 6  # ' ' and five digits
    # the word tokenizer without space tokens: the first digit is scored and differs across tasks
    assert fam.sample(3, shots=2, seed=0, tokenizer=make_tokenizer(lexicon_words()), scoring="first_token")


def test_run_patching_says_why_no_patch_can_change_the_scored_token(text_folder):
    model = _load(text_folder, "bridge")
    fam = tvlens.tasks.get("bitwise_text")
    p = fam.sample(3, shots=2, seed=0, tokenizer=model.tokenizer, scoring="first_token")
    # every task's scored token made the same (as with a tokenizer whose answers all begin with ' ')
    same = replace(p, task_answers=torch.zeros_like(p.task_answers) + 5, answers=torch.full_like(p.answers, 5))
    vec = tvlens.extract(model, p, progress=False).task_vectors([1])
    with pytest.raises(ConfigError, match="every task.*same scored token.*nothing to flip"):
        tvlens.run_patching(model, same, vec, layers=[1], progress=False)
    from tvlens.patching import nothing_to_flip

    assert "nothing to flip" in nothing_to_flip(same) and nothing_to_flip(p) is None  # the report notes it
    with Count(model) as c:
        res = tvlens.run_patching(model, p, vec, layers=[1], progress=False)  # distinct answers: runs
    assert res.flip_rate.shape == (1,)
    assert c.unembed_shapes and all(sh[:-1] == (len(p), 1) for sh in c.unembed_shapes)  # answer positions only


def test_report_on_bitwise_text_notes_why_patching_is_left_out(tmp_path):
    """A report on a model whose tokenizer starts every answer with ' ' notes why there is no patching."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tvlens.views.report import build_report

    tok = _spaced_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                     eos_token_id=0)
    GPT2LMHeadModel(cfg).eval().save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = _load(tmp_path, "bridge")
    rep = build_report(model, "bitwise_text", n_per_task=11, shots=2, tsne=False, emergence=False)
    assert any(n.startswith("no task-vector patching: ") and "nothing to flip" in n for n in rep.notes), rep.notes
