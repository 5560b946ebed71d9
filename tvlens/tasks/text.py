"""Natural-language task families for pretrained language models, and their tokenization.

A text family draws prompts as *text* (``sample_text``): examples ``(input, output)``, a query
input and its answer under every task's rule. A tokenizer (any Hugging Face tokenizer, e.g.
``model.tokenizer`` of a TransformerLens model) turns them into the usual :class:`PromptSet`
(``sample(..., tokenizer=...)``), so ``tvlens.extract``, ``task_decodability``, ``icl_accuracy`` and
``run_patching`` work on them unchanged.

Template. Every example is rendered with ``template`` (default :data:`DEFAULT_TEMPLATE`,
``"{input} -> {output}\\n"``), which must hold ``{input}`` then ``{output}`` once each. The query
is the template up to ``{output}``; spaces right before ``{output}`` belong to the answer (``" Paris"``
is one GPT-2 token, ``"Paris"`` after ``"-> "`` is not what the model saw in the examples).

Tokens. Each piece (an example's input part, its answer, the template's tail; the query's input
part, its answer) is tokenized on its own and the ids are concatenated, so the answer positions of
every example are known (they are trained by ``tvlens.finetune``, as in ``tvlens.train``). An
optional BOS token comes first (``prepend_bos``, default: when the tokenizer has one). Prompts are
right-padded; ``query_pos`` is the last token before the query's answer.

Answers. ``PromptSet.answers`` is the answer's **first token** ``[n, 1]`` (and ``task_answers`` the
first token of every task's answer on the query, where every task's rule applies to the query).
The full answer's ids are in ``prompts.extra["answer_tokens"]`` (padded with -1) and
``extra["answer_len"]``. When an answer spans several tokens, ``sample`` needs ``scoring``:
``"first_token"`` (the first token stands for the answer) or ``"greedy"`` (``tvlens.text_accuracy``
generates the whole answer greedily and asks for an exact match); tvlens never picks one silently.
"""

from __future__ import annotations

import re
import weakref
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from tvlens.errors import ConfigError
from tvlens.prompts import PromptSet
from tvlens.tasks.base import TaskFamily

DEFAULT_TEMPLATE = "{input} -> {output}\n"
SCORINGS = ("first_token", "greedy")


@dataclass
class TextPrompt:
    """One prompt as text: ``shots`` examples, the query, its answer and every task's answer."""

    examples: list[tuple[str, str]]
    query: str
    answer: str
    task: int
    task_answers: list[str] | None  # None where other tasks' rules do not apply to the query


def check_template(template: Any) -> str:
    if not isinstance(template, str):
        raise ConfigError(f"template must be a string holding '{{input}}' and '{{output}}', got {template!r}")
    for ph in ("{input}", "{output}"):
        if template.count(ph) != 1:
            raise ConfigError(
                f"template must hold the placeholder {ph} exactly once (default {DEFAULT_TEMPLATE!r}); "
                f"got {template!r} with it {template.count(ph)} times"
            )
    if template.index("{input}") > template.index("{output}"):
        raise ConfigError(f"template must put {{input}} before {{output}}, got {template!r}")
    return template


def split_template(template: str, x: str) -> tuple[str, str, str]:
    """``(head, answer_prefix, tail)``: the query text before the answer, the spaces the answer starts
    with, and what follows an example's answer."""
    i = template.index("{output}")
    head = template[:i].replace("{input}", x)
    stripped = head.rstrip(" ")
    return stripped, head[len(stripped):], template[i + len("{output}"):]


class TextTaskFamily(TaskFamily):
    """A family of text tasks; subclasses give ``task_names``, ``pool_size`` and ``_draw_text``."""

    text = True

    def __init__(self, template: str = DEFAULT_TEMPLATE, **params: Any) -> None:
        check_template(template)
        super().__init__(template=template, **params)
        self.template = template

    # ------------------------------------------------------------------ subclasses
    @abstractmethod
    def pool_size(self) -> int:
        """How many distinct examples a prompt can draw from (shots must be below it)."""

    @abstractmethod
    def _draw_text(self, task: int, shots: int, rng: np.random.Generator) -> TextPrompt: ...

    def max_shots(self) -> int:
        return self.pool_size() - 1  # distinct examples, the query's excluded

    def words(self) -> list[str]:
        """Every word the family's inputs and answers use (the built-in tokenizer's vocabulary)."""
        raise NotImplementedError

    def max_input_tokens(self) -> int:
        """The most built-in-tokenizer tokens an input can take."""
        raise NotImplementedError

    @property
    def vocab(self) -> list[str]:
        """The built-in word tokenizer's vocabulary: ``<bos>``, ``<unk>``, the template's and the family's words."""
        return self.word_tokenizer().vocab

    def word_tokenizer(self) -> "WordTokenizer":
        """A word-level tokenizer over this family's own words (``sample`` uses it when given no tokenizer),
        so a synthetic tvlens model can be built and trained on a text family."""
        bare = self.template.replace("{input}", " ").replace("{output}", " ")
        return WordTokenizer([*WordTokenizer.pieces(bare), *self.words()])

    # ------------------------------------------------------------------ sampling
    def sample_text(
        self, n_per_task: int, shots: int = 4, seed: int = 0, tasks: Sequence[str | int] | None = None
    ) -> list[TextPrompt]:
        """``n_per_task`` text prompts of each task (task-major order), ``shots`` examples each."""
        labels, shots, rng = self._sampling_plan(n_per_task, shots, seed, tasks)
        return [self._draw_text(int(t), shots, rng) for t in labels]

    def _pool_note(self) -> str:
        return f": a pool of {self.pool_size()} examples, one kept for the query"

    def render(self, prompt: TextPrompt) -> str:
        """The prompt as the model reads it, the query's answer included."""
        out = ""
        for x, y in prompt.examples:
            out += self.template.replace("{input}", x).replace("{output}", y)
        head, pre, _ = split_template(self.template, prompt.query)
        return out + head + pre + prompt.answer

    def sample(
        self,
        n_per_task: int,
        shots: int = 4,
        seed: int = 0,
        tasks: Sequence[str | int] | None = None,
        *,
        tokenizer: Any = None,
        scoring: str | None = None,
        prepend_bos: bool | None = None,
    ) -> PromptSet:
        """Tokenized prompts (see the module docstring). ``tokenizer``: the model's (``model.tokenizer``);
        without one, the family's built-in word tokenizer (``word_tokenizer()``, for synthetic models)."""
        if tokenizer is None:
            tokenizer = self.word_tokenizer()
        if scoring is not None and scoring not in SCORINGS:
            raise ConfigError(f"scoring must be one of {SCORINGS} (or None), got {scoring!r}")
        texts = self.sample_text(n_per_task, shots, seed, tasks)
        return tokenize_prompts(self, texts, tokenizer, scoring=scoring, prepend_bos=prepend_bos)

    def sample_train(self, n_per_task: int, shots: int = 4, seed: int = 0, **kw: Any) -> PromptSet:
        return self.sample(n_per_task, shots=shots, seed=seed, **kw)

    def _sample(self, labels, shots, rng):  # pragma: no cover - sample() is overridden
        raise ConfigError(f"{self.name} is a text family: use sample(..., tokenizer=...)")

    def seq_len(self, shots: int) -> int:
        """The longest prompt with the built-in word tokenizer (BOS, ``shots`` examples and the query)."""
        bare = self.template.replace("{input}", " ").replace("{output}", " ")
        per_example = self.max_input_tokens() + len(WordTokenizer.pieces(bare)) + 1
        return 1 + (shots + 1) * per_example


class WordTokenizer:
    """A word-level tokenizer: newlines, ``,`` and ``;`` are tokens, other text splits on whitespace.

    Token 0 is ``<bos>`` (also EOS and padding), token 1 ``<unk>``. It has the methods of a Hugging
    Face tokenizer that tvlens uses (``encode``, ``decode``, ``convert_ids_to_tokens``, ``len``).
    """

    _PIECE = re.compile(r"\n|[,;]|[^\s,;]+")

    def __init__(self, words: Sequence[str]) -> None:
        self.vocab = ["<bos>", "<unk>", *sorted(set(words) - {"<bos>", "<unk>"})]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.bos_token_id = self.eos_token_id = self.pad_token_id = 0
        self.unk_token_id = 1

    @classmethod
    def pieces(cls, text: str) -> list[str]:
        return cls._PIECE.findall(text)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [self.index.get(p, 1) for p in self.pieces(text)]
        return [0, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        return self.vocab[int(ids)] if isinstance(ids, (int, np.integer)) else [self.vocab[int(i)] for i in ids]

    def __len__(self) -> int:
        return len(self.vocab)


# --------------------------------------------------------------------------- tokenization
def tokenizer_of(model_or_tokenizer: Any) -> Any:
    """The tokenizer of a model (``model.tokenizer``) or the tokenizer itself."""
    tok = getattr(model_or_tokenizer, "tokenizer", None) if hasattr(model_or_tokenizer, "cfg") else model_or_tokenizer
    if tok is None or not hasattr(tok, "encode"):
        raise ConfigError(
            "text families need a tokenizer (a Hugging Face tokenizer, or a model whose .tokenizer is one); "
            f"got {type(model_or_tokenizer).__name__} without one"
        )
    return tok


_VOCABS: "weakref.WeakKeyDictionary[Any, list[str]]" = weakref.WeakKeyDictionary()


def _vocab_list(tok: Any) -> list[str]:
    """The tokenizer's tokens by id (computed once per tokenizer: finetuning samples every step)."""
    try:
        cached = _VOCABS.get(tok)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and len(cached) == len(tok):
        return cached
    out = [str(t) for t in tok.convert_ids_to_tokens(list(range(len(tok))))]
    try:
        _VOCABS[tok] = out
    except TypeError:
        pass
    return out


def tokenize_prompts(
    family: TextTaskFamily,
    texts: Sequence[TextPrompt],
    tokenizer: Any,
    scoring: str | None = None,
    prepend_bos: bool | None = None,
) -> PromptSet:
    """Turn text prompts into a PromptSet with ``tokenizer`` (see the module docstring)."""
    tok = tokenizer_of(tokenizer)
    if not texts:
        raise ConfigError("no text prompts to tokenize")
    bos = getattr(tok, "bos_token_id", None)
    if prepend_bos is None:
        prepend_bos = bos is not None
    if prepend_bos and bos is None:
        raise ConfigError("prepend_bos=True but the tokenizer has no BOS token")
    pad = next((t for t in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None), bos) if t is not None), 0)
    encoder = _Encoder(tok)
    names = family.task_names
    seqs, masks, qpos, full, tanswers = [], [], [], [], []
    for tp in texts:
        seq, mask, q, a, ta = _encode_prompt(family, tp, encoder, [bos] if prepend_bos else [])
        seqs.append(seq)
        masks.append(mask)
        qpos.append(q)
        full.append(a)
        if ta is not None:
            tanswers.append(ta)
    _check_scoring(family, texts, full, tanswers, scoring, tok)
    n = len(seqs)
    tokens, train_mask, answer_tokens = _padded(seqs, masks, full, pad)
    targets = torch.full_like(tokens, -100)
    targets[:, :-1] = torch.where(train_mask[:, :-1], tokens[:, 1:], torch.tensor(-100))
    params = {**family.params, "scoring": scoring or "first_token", "prepend_bos": bool(prepend_bos)}
    return PromptSet(
        family=family.name,
        params=params,
        task_names=list(names),
        labels=torch.tensor([tp.task for tp in texts], dtype=torch.long),
        query_pos=torch.tensor(qpos, dtype=torch.long),
        answers=answer_tokens[:, :1].clone(),
        targets=targets,
        train_mask=train_mask,
        shots=len(texts[0].examples),
        tokens=tokens,
        task_answers=torch.tensor(tanswers, dtype=torch.long)[..., None] if len(tanswers) == n else None,
        vocab=_vocab_list(tok),
        extra={"answer_tokens": answer_tokens, "answer_len": torch.tensor([len(a) for a in full])},
    )


class _Encoder:
    """A tokenizer's ids of strings (cached), and of answers, refused when it cannot encode them faithfully."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.unk = getattr(tok, "unk_token_id", None)
        self.cache: dict[str, list[int]] = {}

    def enc(self, s: str) -> list[int]:
        if s not in self.cache:
            self.cache[s] = list(self.tok.encode(s, add_special_tokens=False)) if s else []
        return self.cache[s]

    def answer(self, pre: str, y: str, task: str) -> list[int]:
        ids = self.enc(pre + y)
        if not ids:
            raise ConfigError(f"answer {y!r} of task {task!r} encodes to no token with this tokenizer")
        if self.unk is not None and self.unk in ids:
            raise ConfigError(
                f"the tokenizer cannot encode answer {y!r} of task {task!r}: it maps to the unknown token "
                f"{self.tok.convert_ids_to_tokens(self.unk)!r}; use a tokenizer whose vocabulary covers the family's answers"
            )
        back = self.tok.decode(ids)
        if "".join(back.split()) != "".join((pre + y).split()):
            raise ConfigError(
                f"the tokenizer cannot encode answer {y!r} of task {task!r}: its tokens {ids} decode to {back!r}"
            )
        return ids


def _encode_prompt(family: TextTaskFamily, tp: TextPrompt, encoder: _Encoder, seq: list[int]):
    """One prompt's ids (after ``seq``, the BOS or nothing), its train mask, query position, answer ids, and the
    first token of every task's answer (None when the prompt has no ``task_answers``)."""
    names = family.task_names
    mask: list[bool] = [False] * len(seq)
    for x, y in tp.examples:
        head, pre, tail = split_template(family.template, x)
        h = encoder.enc(head)
        if not h:
            raise ConfigError(f"template {family.template!r} renders input {x!r} to no token")
        a = encoder.answer(pre, y, names[tp.task])
        t = encoder.enc(tail)
        seq = seq + h + a + t
        # the last head token and all but the last answer token predict the answer's tokens
        mask += [False] * (len(h) - 1) + [True] * len(a) + [False] * (1 + len(t))
    head, pre, _ = split_template(family.template, tp.query)
    h = encoder.enc(head)
    if not h:
        raise ConfigError(f"template {family.template!r} renders the query {tp.query!r} to no token")
    q = len(seq) + len(h) - 1
    a = encoder.answer(pre, tp.answer, names[tp.task])
    seq = seq + h + a
    mask += [False] * (len(h) - 1) + [True] * len(a) + [False]
    ta = None
    if tp.task_answers is not None:
        ta = [encoder.answer(pre, y, names[j])[0] for j, y in enumerate(tp.task_answers)]
    return seq, mask, q, a, ta


def _check_scoring(family, texts, full: list[list[int]], tanswers: list[list[int]], scoring: str | None, tok) -> None:
    """Multi-token answers need a ``scoring`` said out loud (and ``first_token`` one that tells tasks apart)."""
    multi = [i for i, a in enumerate(full) if len(a) > 1]
    if multi and scoring is None:
        i = multi[0]
        raise ConfigError(
            f"answers span several tokens with this tokenizer (e.g. {texts[i].answer!r} -> {len(full[i])} tokens, "
            f"{len(multi)} of {len(full)} prompts): choose scoring='first_token' (the first token stands for the "
            "answer) or scoring='greedy' (tvlens.text_accuracy generates the whole answer)"
        )
    if multi and scoring == "first_token":
        _refuse_constant_first_token(family, full, tanswers, tok)


def _padded(seqs, masks, full, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids ``[n, L]`` (padded with ``pad``), the train mask, and the answers' ids ``[n, A]`` (-1 padded)."""
    n, L, A = len(seqs), max(map(len, seqs)), max(map(len, full))
    tokens = torch.full((n, L), int(pad), dtype=torch.long)
    train_mask = torch.zeros(n, L, dtype=torch.bool)
    answer_tokens = torch.full((n, A), -1, dtype=torch.long)
    for i, (s, m, a) in enumerate(zip(seqs, masks, full)):
        tokens[i, : len(s)] = torch.tensor(s)
        train_mask[i, : len(m)] = torch.tensor(m)
        answer_tokens[i, : len(a)] = torch.tensor(a)
    return tokens, train_mask, answer_tokens


def _refuse_constant_first_token(family: TextTaskFamily, full: list[list[int]], tanswers: list[list[int]],
                                 tok: Any) -> None:
    """First-token scoring scores nothing when every answer (of every prompt and, where recorded, every
    task) begins with the same token while the whole answers differ: e.g. ``bitwise_text`` on SmolLM2's
    and Gemma-3's tokenizers, where each answer is ``' '`` then its digits. Accuracy would then be the
    same for every task and no task-vector patch could change the scored token: refuse."""
    firsts = {a[0] for a in full} | {t for row in tanswers for t in row}
    if len(firsts) != 1 or len({tuple(a) for a in full}) < 2:
        return
    first = next(iter(firsts))
    try:
        shown = repr(tok.decode([first]))
    except Exception:  # noqa: BLE001 - only for the message
        shown = f"id {first}"
    raise ConfigError(
        f"scoring='first_token' cannot score family {family.name!r} with this tokenizer: every answer begins with "
        f"the same token {shown} (id {first}) and differs only after it, so the scored token is the same for "
        "every task and prompt: accuracy could not tell the tasks apart and no patch (run_patching) could "
        "change it. Use scoring='greedy' (tvlens.text_accuracy scores the whole answer), or a template or "
        "tokenizer whose answers' first tokens differ"
    )


def draw_distinct(rng: np.random.Generator, pool: int, k: int) -> list[int]:
    """``k`` distinct indices into a pool of ``pool``."""
    return rng.choice(pool, size=k, replace=False).tolist()


__all__ = [
    "DEFAULT_TEMPLATE",
    "SCORINGS",
    "TextPrompt",
    "TextTaskFamily",
    "WordTokenizer",
    "check_template",
    "draw_distinct",
    "split_template",
    "tokenize_prompts",
    "tokenizer_of",
]
