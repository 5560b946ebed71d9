"""Your own models and tasks (issue 12): PromptSet.from_tokens/from_strings on a user's HookedTransformer,
a task family of your own (RuleFamily + tasks.register) through training, the CLI (--import) and a reopen
in a new process, and the shipped models' tokenizer."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import tvlens
from tvlens import tasks
from tvlens.backends import has_hooked_transformer
from tvlens.errors import ConfigError, UnknownNameError
from tvlens.prompts import PromptSet
from tvlens.tokenizer import word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(10)] + ["->", ";"]


@pytest.fixture(scope="module")
def user_model():
    """A plain model as a researcher builds it, no tvlens metadata, with its own tokenizer: a HookedTransformer
    (TransformerLens 3.x), or on 4.x (no HookedTransformer) a TransformerBridge booted from a config."""
    kw = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=16, d_vocab=len(WORDS), act_fn="gelu",
              normalization_type="LN", seed=0)
    if not has_hooked_transformer():
        from tvlens.backends.loading import build_native_bridge

        model = build_native_bridge({**kw, "d_mlp": 128, "d_vocab_out": len(WORDS), "attn_only": False,
                                     "positional_embedding_type": "standard"}, continuous=False)
        model.tokenizer = word_tokenizer(WORDS)
        return model.eval()
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TL 3.x: HookedTransformer is deprecated for 4.x
        model = HookedTransformer(HookedTransformerConfig(**kw, default_prepend_bos=False))
    model.set_tokenizer(word_tokenizer(WORDS), default_padding_side="right")
    return model


def _own_prompts(n: int = 24, seed: int = 0):
    """Two tasks on 3-word inputs: answer the first or the last word."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 10, (n, 3), generator=g)
    labels = torch.arange(n) % 2
    arrow = WORDS.index("->")
    tokens = torch.cat([x, torch.full((n, 1), arrow)], 1)
    rules = torch.stack([x[:, :1], x[:, 2:]], 1)  # [n, task, 1]
    answers = rules[torch.arange(n), labels]
    return tokens, answers, labels, rules


def test_from_tokens_feeds_every_analysis_on_a_users_model(user_model):
    tokens, answers, labels, rules = _own_prompts()
    p = PromptSet.from_tokens(tokens, answers=answers, labels=labels, task_names=["first", "last"],
                              task_answers=rules)
    assert p.seq_len == 5 and p.query_pos.eq(3).all() and torch.equal(p.tokens[:, 4:], answers)
    assert p.family == "" and p.train_mask.sum() == len(p) and "first" in repr(p)
    acc = tvlens.icl_accuracy(user_model, p)
    assert set(acc.per_task) == {"first", "last"}
    enc = tvlens.extract(user_model, p, progress=False)
    td = tvlens.task_decodability(enc, k=3)
    assert td.td.shape == (3,)
    res = tvlens.run_patching(user_model, p, enc.task_vectors(), progress=False)
    assert res.follows_source.shape == (2, 2, 2) and not res.follows_source.isnan().any()
    hs = tvlens.head_attribution(user_model, p, method="dla", progress=False)
    assert hs.scores.shape == (2, 4)
    assert p.str_tokens(0, tokenizer=user_model.tokenizer)[-2] == "->"


def test_from_tokens_forms():
    one = PromptSet.from_tokens([3, 4, 5])  # last token is the answer; one task
    assert one.task_names == ["task"] and one.answers.tolist() == [[5]] and one.query_pos.tolist() == [1]
    ragged = PromptSet.from_tokens([[1, 2], [1, 2, 3, 4]], answers=[7, 8], labels=["a", "b"])
    assert ragged.tokens.tolist() == [[1, 2, 7, 0, 0], [1, 2, 3, 4, 8]] and ragged.task_names == ["a", "b"]
    at = PromptSet.from_tokens(torch.tensor([[1, 2, 3, 4]]), query_pos=1)
    assert at.answers.tolist() == [[3]]
    for bad, msg in ((dict(tokens=torch.rand(2, 3)), "integer"), (dict(tokens=[[1, -2]]), "non-negative"),
                     (dict(tokens=[[1, 2]], answers=[[1], [2]]), "2 rows for 1"),
                     (dict(tokens=[[1, 2, 3]], query_pos=[5]), "beyond"),
                     (dict(tokens=[[1, 2], [3, 4]], labels=[0, 1], task_names=["a"]), "index task_names"),
                     (dict(tokens=[[1, 2, 3]], answers=[4], task_answers=torch.tensor([[[5]]])), "own task")):
        with pytest.raises(ConfigError, match=msg):
            PromptSet.from_tokens(**bad)


def test_from_strings_with_the_models_tokenizer(user_model):
    p = PromptSet.from_strings(user_model, ["w1 w2 w3 ->", "w4 w5 w6 ->"], ["w1", "w6"], labels=["first", "last"],
                               task_answers={"first": ["w1", "w4"], "last": ["w3", "w6"]})
    assert p.tokens.tolist() == [[1, 2, 3, 10, 1], [4, 5, 6, 10, 6]] and p.task_answers.shape == (2, 2, 1)
    with pytest.raises(ConfigError, match="different lengths"):
        PromptSet.from_strings(user_model, ["w1 ->", "w2 ->"], ["w1", "w1 w2"])
    with pytest.raises(ConfigError, match="lists of strings"):
        PromptSet.from_strings(user_model, "w1 ->", "w1")


def test_shipped_models_have_a_tokenizer():
    model = tvlens.load_model("categories")
    prompts = tvlens.model_info(model).task_family().sample(2, shots=2, seed=0)
    words = prompts.str_tokens(0)
    assert model.to_str_tokens(prompts.tokens[0]) == words
    assert torch.equal(model.to_tokens(" ".join(words))[0], prompts.tokens[0])
    with pytest.raises(Exception, match="UNK"):  # a word outside the vocabulary never maps to a real token
        model.to_tokens("zebra-unicorn")


MYTASKS = '''
import tvlens


@tvlens.tasks.register("ends")
class Ends(tvlens.tasks.RuleFamily):
    """first or last of three letters"""
    words = list("abcdefgh")
    rules = {"first": lambda xs: xs[0], "last": lambda xs: xs[-1]}

    def __init__(self, length: int = 3):
        super().__init__(length=length)
        self.length = length

    def draw_input(self, rng):
        return list(rng.choice(self.words, size=self.length, replace=False))
'''


def test_rule_family_in_process(tmp_path):
    (tmp_path / "mytasks_inproc.py").write_text(MYTASKS.replace('"ends"', '"ends_inproc"'))
    sys.path.insert(0, str(tmp_path))
    try:
        import mytasks_inproc  # noqa: F401
    finally:
        sys.path.remove(str(tmp_path))
    fam = tasks.get("ends_inproc", length=4)
    p = fam.sample(3, shots=2, seed=0, tasks="last")
    assert p.task_names == ["first", "last"] and p.labels.tolist() == [1, 1, 1]
    text = p.render(0)
    q = text.split("=>")[0].split()[-5:-1]
    assert text.split("=>")[1].split() == [q[-1]]
    assert fam.config() == {"name": "ends_inproc", "length": 4, "_module": "mytasks_inproc"}
    assert tasks.from_config(fam.config()).params == {"length": 4}
    with pytest.raises(ConfigError, match="shipped with tvlens"):
        tasks.register("codes", type(fam))
    model = tvlens.build_model(fam, n_layers=1, d_model=16, n_heads=2)
    assert tvlens.icl_accuracy(model, p).task_names == ["first", "last"]


def test_a_run_on_your_family_through_the_cli_and_a_new_process(tmp_path):
    (tmp_path / "mytasks.py").write_text(MYTASKS)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    run = tmp_path / "run"
    train = [sys.executable, "-m", "tvlens.cli", "--import", "mytasks", "train", "--family", "ends", "--out", str(run),
             "--steps", "2", "--batch-size", "4", "--n-layers", "1", "--d-model", "16", "--n-heads", "2",
             "--eval-every", "2", "--eval-n-per-task", "4", "--n-checkpoints", "1", "--warmup", "0", "--no-progress"]
    r = subprocess.run(train, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    probe = textwrap.dedent(f"""
        import sys, tvlens
        m = tvlens.load_model({str(run)!r})
        try:
            tvlens.model_info(m).task_family()
        except tvlens.UnknownNameError as e:
            print("ERROR", e)
        sys.path.insert(0, {str(tmp_path)!r})
        import mytasks
        fam = tvlens.model_info(m).task_family()
        acc = tvlens.icl_accuracy(m, fam.sample(4, shots=4, seed=0))
        print("OK", fam.name, sorted(acc.per_task))
    """)
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ERROR unknown task family 'ends'" in r.stdout and "import mytasks" in r.stdout, r.stdout
    assert "OK ends ['first', 'last']" in r.stdout, r.stdout


def test_unknown_family_hint():
    with pytest.raises(UnknownNameError, match="tvlens.tasks.register"):
        tasks.get("no_such_family")
    with pytest.raises(UnknownNameError, match="import somewhere"):
        tasks.from_config({"name": "no_such_family", "_module": "somewhere"})
