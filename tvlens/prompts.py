"""PromptSet: the one currency every tvlens analysis takes.

A PromptSet holds a batch of in-context-learning prompts whose latent task is known:

- ``tokens`` ``[n, seq]`` (token families) or ``inputs`` ``[n, seq, d_in]`` (continuous families);
  each sequence holds the examples, the query and the query's answer, so one forward pass scores
  the answer with teacher forcing;
- ``query_pos`` ``[n]``: the last position before the query's answer. Its residual stream is the
  prompt's representation (DESIGN.md), and the model's output there predicts the answer's first part;
- ``answers`` ``[n, n_answer]``: the query's answer (token ids, or the float target);
- ``targets`` ``[n, seq]`` and ``train_mask`` ``[n, seq]``: what the output at each position should
  be and which positions are trained (the answer positions of every example and of the query);
- ``labels`` ``[n]``: the latent task of each prompt, indexing ``task_names``;
- ``task_answers`` ``[n, n_tasks, n_answer]`` (token families): the answer each task's rule gives
  on the prompt's query, so an output can be scored against every task's rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Bool, Float, Int

from tvlens.errors import ConfigError, UnknownNameError
from tvlens.positions import answer_positions


@dataclass
class PromptSet:
    family: str
    params: dict[str, Any]
    task_names: list[str]
    labels: Int[torch.Tensor, "n"]
    query_pos: Int[torch.Tensor, "n"]
    answers: torch.Tensor  # Int[n, n_answer] or Float[n, n_answer]
    targets: torch.Tensor  # Int[n, seq] (next token, -100 where untrained) or Float[n, seq]
    train_mask: Bool[torch.Tensor, "n seq"]
    shots: int
    tokens: Int[torch.Tensor, "n seq"] | None = None
    inputs: Float[torch.Tensor, "n seq d_in"] | None = None
    task_answers: Int[torch.Tensor, "n n_tasks n_answer"] | None = None
    vocab: list[str] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.inputs is None):
            raise ConfigError("PromptSet needs exactly one of `tokens` (token ids) or `inputs` (float vectors)")
        n = self.model_input.shape[0]
        for name in ("labels", "query_pos", "answers", "targets", "train_mask"):
            t = getattr(self, name)
            if t.shape[0] != n:
                raise ConfigError(f"PromptSet.{name} has {t.shape[0]} rows, expected {n} (one per prompt)")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.task_names)):
            raise ConfigError(f"PromptSet.labels must index task_names (0..{len(self.task_names) - 1})")

    # ------------------------------------------------------------------ your own prompts
    @classmethod
    def from_tokens(
        cls,
        tokens: Any,
        query_pos: Any = None,
        answers: Any = None,
        labels: Any = None,
        task_names: Sequence[str] | None = None,
        *,
        task_answers: Any = None,
        family: str = "",
        params: dict[str, Any] | None = None,
        shots: int = 0,
        vocab: Sequence[str] | None = None,
        pad_id: int = 0,
    ) -> "PromptSet":
        """A PromptSet from your own token ids, for any model (``tvlens.extract``, ``task_decodability``,
        ``icl_accuracy``, ``run_patching``... take it as they take a family's prompts).

        - ``tokens``: ``[n, seq]`` ids (tensor, array or nested lists; a list of sequences of different
          lengths is padded on the right with ``pad_id``, which nothing before the answer can see);
          ``[seq]`` is one prompt;
        - where the answer is: with ``answers`` and no ``query_pos``, each sequence is a prompt ending at
          its query and ``answers`` (``[n]`` or ``[n, n_answer]`` ids) are appended after it; with
          ``query_pos`` (``[n]`` or one int), the answer is written at ``query_pos + 1 ...`` (or, without
          ``answers``, read from there); with neither, each sequence's last token is its answer;
        - ``labels``: each prompt's latent task, as indices into ``task_names`` or as task names
          (default: one task, ``"task"``). ``task_names`` defaults to the names in ``labels`` (first
          seen first) or ``task0, task1, ...``;
        - ``task_answers``: what every task's rule answers on each prompt, ``[n, n_tasks, n_answer]`` or
          ``{task: [n, n_answer]}``: needed by ``run_patching`` to score whose rule a patched prompt follows.

        ``family`` is empty (unknown): the model/family agreement check is skipped. ``vocab`` (words by
        id) is optional: views show tokens with the model's tokenizer, or as ids."""
        rows, lens = _token_rows(tokens, "tokens")
        n = len(rows)
        rows, q, ans = _place_answers(rows, lens, query_pos, None if answers is None else _id_matrix(answers, n, "answers"))
        n_ans = len(ans[0])
        if any(len(a) != n_ans for a in ans):
            raise ConfigError("PromptSet.from_tokens: every answer must have the same number of tokens; got "
                              f"{sorted({len(a) for a in ans})}")
        width = max(len(r) for r in rows)
        toks = torch.full((n, width), int(pad_id), dtype=torch.long)
        for i, r in enumerate(rows):
            toks[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        qpos = torch.tensor(q, dtype=torch.long)
        lab, names = _labels(labels, task_names, n)
        pos = answer_positions(qpos, n_ans)
        train_mask = torch.zeros(n, width, dtype=torch.bool)
        train_mask.scatter_(1, pos, True)
        targets = torch.full((n, width), -100, dtype=torch.long)
        answers_t = torch.tensor(ans, dtype=torch.long)
        targets.scatter_(1, pos, answers_t)
        ta = None if task_answers is None else _task_answer_ids(task_answers, names, lab, answers_t)
        if vocab is not None and int(toks.max()) >= len(vocab):
            raise ConfigError(f"PromptSet.from_tokens: token id {int(toks.max())} is outside vocab ({len(vocab)} words)")
        return cls(family=str(family), params=dict(params or {}), task_names=names, labels=lab, query_pos=qpos,
                   answers=answers_t, targets=targets, train_mask=train_mask, shots=int(shots), tokens=toks,
                   task_answers=ta, vocab=None if vocab is None else list(vocab))

    @classmethod
    def from_strings(
        cls,
        model_or_tokenizer: Any,
        prompts: Sequence[str],
        answers: Sequence[str],
        labels: Any = None,
        task_names: Sequence[str] | None = None,
        *,
        task_answers: dict[str, Sequence[str]] | None = None,
        prepend_bos: bool | None = None,
        first_token: bool = False,
        **kwargs: Any,
    ) -> "PromptSet":
        """A PromptSet from text, tokenized with the model's tokenizer (``model.to_tokens``, so BOS follows
        the model's default unless ``prepend_bos``) or a Hugging Face tokenizer. Each prompt ends at its
        query (``"France -> Paris ; Japan ->"``); each answer (``" Tokyo"``: mind the leading space of
        BPE tokenizers) is tokenized alone, without BOS, and appended. Answers must tokenize to the same
        length, or pass ``first_token=True`` to keep their first token. ``task_answers``: per task, the
        answer its rule gives on each prompt (text). Other keywords go to ``from_tokens``."""
        if isinstance(prompts, str) or isinstance(answers, str):
            raise ConfigError("PromptSet.from_strings: prompts and answers must be lists of strings (one per prompt)")
        prompts, answers = list(prompts), list(answers)
        if len(prompts) != len(answers) or not prompts:
            raise ConfigError(f"PromptSet.from_strings: give one answer per prompt; got {len(prompts)} prompts and "
                              f"{len(answers)} answers")
        task_names = _task_names(task_names)  # consistency before any tokenizing
        encode = _encoder(model_or_tokenizer)
        rows = [encode(p, prepend_bos) for p in prompts]

        def answer_ids(texts, what):
            ids = [encode(a, False) for a in texts]
            if any(not a for a in ids):
                raise ConfigError(f"PromptSet.from_strings: an empty {what} tokenizes to no tokens")
            if first_token:
                return [a[:1] for a in ids]
            if len({len(a) for a in ids}) > 1:
                raise ConfigError(f"PromptSet.from_strings: {what} tokenize to different lengths "
                                  f"({sorted({len(a) for a in ids})} tokens); give answers of one length or "
                                  "first_token=True")
            return ids

        ans = answer_ids(answers, "answers")
        ta = None if task_answers is None else {t: answer_ids(list(v), f"task_answers[{t!r}]")
                                                for t, v in task_answers.items()}
        return cls.from_tokens(rows, answers=ans, labels=labels, task_names=task_names, task_answers=ta, **kwargs)

    # ------------------------------------------------------------------ basics
    @property
    def is_continuous(self) -> bool:
        return self.inputs is not None

    @property
    def model_input(self) -> torch.Tensor:
        """What the model is called on: token ids ``[n, seq]`` or float inputs ``[n, seq, d_in]``."""
        return self.tokens if self.tokens is not None else self.inputs  # type: ignore[return-value]

    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    @property
    def seq_len(self) -> int:
        return int(self.model_input.shape[1])

    @property
    def n_answer(self) -> int:
        return int(self.answers.shape[1])

    @property
    def device(self) -> torch.device:
        return self.model_input.device

    def __len__(self) -> int:
        return int(self.model_input.shape[0])

    def __repr__(self) -> str:
        kind = "inputs" if self.is_continuous else "tokens"
        counts = ", ".join(f"{t}: {int((self.labels == i).sum())}" for i, t in enumerate(self.task_names))
        return (
            f"PromptSet(family={self.family!r}, n={len(self)}, shots={self.shots}, "
            f"{kind}={tuple(self.model_input.shape)}, tasks={{{counts}}})"
        )

    def _repr_html_(self) -> str:
        import html

        rows = "".join(
            f"<tr><td>{i}</td><td>{html.escape(self.task_names[int(self.labels[i])])}</td>"
            f"<td><code>{html.escape(self.render(i))}</code></td></tr>"
            for i in range(min(len(self), 8))
        )
        more = f"<p>... {len(self) - 8} more</p>" if len(self) > 8 else ""
        return (
            f"<div><b>{html.escape(repr(self))}</b><table><tr><th>#</th><th>task</th>"
            f"<th>prompt</th></tr>{rows}</table>{more}</div>"
        )

    def task_index(self, task: str | int) -> int:
        if isinstance(task, int):
            if not 0 <= task < self.n_tasks:
                raise ConfigError(f"task index {task} out of range: this PromptSet has {self.n_tasks} tasks")
            return task
        if task not in self.task_names:
            raise UnknownNameError(f"unknown task {task!r}; this PromptSet's tasks are {self.task_names}")
        return self.task_names.index(task)

    # ------------------------------------------------------------------ rendering
    def str_tokens(self, i: int, tokenizer: Any = None) -> list[str]:
        """The tokens of prompt ``i`` as strings, answer included: from the PromptSet's vocabulary, else
        from ``tokenizer`` (e.g. ``model.tokenizer``; each id decoded alone), else the ids themselves."""
        if self.tokens is None:
            raise ConfigError("str_tokens: this PromptSet is continuous (float inputs): it has no tokens to show")
        ids = [int(t) for t in self.tokens[i]]
        if self.vocab is not None:
            return [self.vocab[t] if 0 <= t < len(self.vocab) else f"<{t}>" for t in ids]
        if tokenizer is not None:
            try:
                return [tokenizer.decode([t]) for t in ids]
            except Exception:  # noqa: BLE001 - a tokenizer that cannot decode these ids: show the ids
                pass
        return [str(t) for t in ids]

    def render(self, i: int) -> str:
        """Prompt ``i`` as readable text; the query's answer follows ``=>`` after the query."""
        q = int(self.query_pos[i])
        if self.tokens is not None:
            toks = self.str_tokens(i)
            return " ".join(toks[: q + 1]) + "  =>  " + " ".join(toks[q + 1 : q + 1 + self.n_answer])
        x = self.inputs[i]  # type: ignore[index]
        return f"{x.shape[0]} vectors of dim {x.shape[1]}; query answer y = {float(self.answers[i, 0]):.3f}"

    # ------------------------------------------------------------------ slicing
    def subset(self, index: Sequence[int] | torch.Tensor | slice) -> "PromptSet":
        """The prompts at ``index`` (indices, a boolean mask or a slice), in that order."""
        if isinstance(index, slice):
            idx = torch.arange(len(self))[index]
        else:
            if isinstance(index, str) or (not torch.is_tensor(index) and any(
                    isinstance(i, (str, float)) for i in (index if isinstance(index, (list, tuple)) else [index]))):
                raise ConfigError(f"PromptSet.subset: index must be integer indices, a boolean mask or a slice, got "
                                  f"{index!r}")
            idx = torch.as_tensor(index)
            if idx.is_floating_point() and idx.numel():  # (an empty list is a float tensor: no prompts)
                raise ConfigError(f"PromptSet.subset: index must be integer indices, got a {idx.dtype} tensor")
            if idx.dtype == torch.bool:
                if idx.shape != (len(self),):
                    raise ConfigError(f"boolean index must have shape ({len(self)},), got {tuple(idx.shape)}")
                idx = idx.nonzero().flatten()
            idx = idx.long().flatten()
            if len(idx) and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
                raise ConfigError(f"prompt index out of range: this PromptSet has {len(self)} prompts")
        idx = idx.to(self.device)

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx]

        return replace(
            self,
            labels=self.labels[idx],
            query_pos=self.query_pos[idx],
            answers=self.answers[idx],
            targets=self.targets[idx],
            train_mask=self.train_mask[idx],
            tokens=take(self.tokens),
            inputs=take(self.inputs),
            task_answers=take(self.task_answers),
            extra={k: v[idx] for k, v in self.extra.items()},
        )

    def __getitem__(self, index: Sequence[int] | torch.Tensor | slice) -> "PromptSet":
        return self.subset(index)

    def by_task(self, task: str | int) -> "PromptSet":
        """Only the prompts of one task (by name or index)."""
        return self.subset(self.labels == self.task_index(task))

    def split_by_task(self) -> dict[str, "PromptSet"]:
        return {name: self.by_task(i) for i, name in enumerate(self.task_names)}

    def to(self, device: str | torch.device) -> "PromptSet":
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            labels=self.labels.to(device),
            query_pos=self.query_pos.to(device),
            answers=self.answers.to(device),
            targets=self.targets.to(device),
            train_mask=self.train_mask.to(device),
            tokens=mv(self.tokens),
            inputs=mv(self.inputs),
            task_answers=mv(self.task_answers),
            extra={k: v.to(device) for k, v in self.extra.items()},
        )

    @staticmethod
    def concat(sets: Sequence["PromptSet"]) -> "PromptSet":
        """Concatenate PromptSets of the same family, tasks and shape."""
        if not sets:
            raise ConfigError("PromptSet.concat needs at least one PromptSet, got none")
        first = sets[0]
        for s in sets[1:]:
            if (s.family, s.task_names, s.vocab) != (first.family, first.task_names, first.vocab):
                raise ConfigError(
                    "PromptSet.concat: every set must come from the same family with the same tasks "
                    f"and vocabulary; got {first.family}{first.task_names} and {s.family}{s.task_names}"
                )
            if s.model_input.shape[1:] != first.model_input.shape[1:]:
                raise ConfigError(
                    "PromptSet.concat: sequence shapes differ "
                    f"({tuple(first.model_input.shape[1:])} vs {tuple(s.model_input.shape[1:])}); "
                    "sample them with the same shots"
                )

        def cat(name: str) -> torch.Tensor | None:
            ts = [getattr(s, name) for s in sets]
            return None if ts[0] is None else torch.cat(ts)

        return replace(
            first,
            labels=cat("labels"),
            query_pos=cat("query_pos"),
            answers=cat("answers"),
            targets=cat("targets"),
            train_mask=cat("train_mask"),
            tokens=cat("tokens"),
            inputs=cat("inputs"),
            task_answers=cat("task_answers"),
            extra={k: torch.cat([s.extra[k] for s in sets]) for k in first.extra},
        )

    def __add__(self, other: "PromptSet") -> "PromptSet":
        return PromptSet.concat([self, other])

    # ------------------------------------------------------------------ persistence
    _TENSORS = ("labels", "query_pos", "answers", "targets", "train_mask", "tokens", "inputs", "task_answers")

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Save as ``path.safetensors`` + ``path.json`` (atomic writes)."""
        from tvlens.io import save_tensors_with_sidecar

        tensors = {k: getattr(self, k) for k in self._TENSORS if getattr(self, k) is not None}
        tensors.update({f"extra.{k}": v for k, v in self.extra.items()})
        meta = {
            "kind": "PromptSet",
            "family": self.family,
            "params": self.params,
            "task_names": self.task_names,
            "shots": self.shots,
            "vocab": self.vocab,
        }
        return save_tensors_with_sidecar(path, tensors, meta, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> "PromptSet":
        from tvlens.io import load_tensors_with_sidecar

        tensors, meta = load_tensors_with_sidecar(path, expect_kind="PromptSet")
        extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
        kw = {k: tensors.get(k) for k in cls._TENSORS}
        return cls(
            family=meta["family"],
            params=meta["params"],
            task_names=list(meta["task_names"]),
            shots=int(meta["shots"]),
            vocab=meta["vocab"],
            extra=extra,
            **kw,
        )


# ---------------------------------------------------------------------- helpers of from_tokens
def _token_rows(tokens: Any, argument: str) -> tuple[list[list[int]], list[int]]:
    """Token ids as Python lists of ints (one per prompt) and their lengths; refuses floats, negatives."""
    import numpy as np

    if torch.is_tensor(tokens) or isinstance(tokens, np.ndarray):
        t = torch.as_tensor(tokens)
        if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
            raise ConfigError(f"PromptSet.from_tokens: {argument} must hold integer token ids, got dtype {t.dtype}")
        if t.ndim == 1:
            t = t[None]
        if t.ndim != 2:
            raise ConfigError(f"PromptSet.from_tokens: {argument} must be [n, seq] (or [seq] for one prompt), "
                              f"got shape {tuple(t.shape)}")
        rows = t.tolist()
    elif isinstance(tokens, (list, tuple)):
        if not tokens:
            raise ConfigError(f"PromptSet.from_tokens: {argument} is empty")
        rows = [list(r) for r in tokens] if isinstance(tokens[0], (list, tuple)) or torch.is_tensor(tokens[0]) \
            else [list(tokens)]
        rows = [[x.item() if torch.is_tensor(x) else x for x in r] for r in rows]
    else:
        raise ConfigError(f"PromptSet.from_tokens: {argument} must be token ids (tensor, array or lists), got "
                          f"{type(tokens).__name__}")
    import numbers

    for r in rows:
        for x in r:
            if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 0:
                raise ConfigError(f"PromptSet.from_tokens: {argument} must hold non-negative integer token ids, "
                                  f"got {x!r}")
    if not rows or min(len(r) for r in rows) == 0:
        raise ConfigError(f"PromptSet.from_tokens: {argument} holds an empty sequence")
    return [[int(x) for x in r] for r in rows], [len(r) for r in rows]


def _id_matrix(x: Any, n: int, argument: str) -> list[list[int]]:
    """``[n]`` or ``[n, k]`` ids as n lists."""
    if torch.is_tensor(x) and x.ndim == 1 or (isinstance(x, (list, tuple)) and x and
                                             not isinstance(x[0], (list, tuple)) and not torch.is_tensor(x[0])):
        x = [[v] for v in (x.tolist() if torch.is_tensor(x) else x)]
    rows, _ = _token_rows(x, argument)
    if len(rows) != n:
        raise ConfigError(f"PromptSet.from_tokens: {argument} has {len(rows)} rows for {n} prompts")
    return rows


def _task_names(task_names: Any) -> list[str] | None:
    """Task names: distinct non-empty strings (two tasks of one name would collapse into one)."""
    if task_names is None:
        return None
    if isinstance(task_names, str):
        raise ConfigError(f"PromptSet.from_tokens: task_names must be a list of names, got the string {task_names!r}")
    task_names = list(task_names)
    bad = [t for t in task_names if not isinstance(t, str) or not t]
    if bad:
        raise ConfigError(f"PromptSet.from_tokens: task_names must be non-empty strings, got {bad[0]!r}")
    dup = sorted({t for t in task_names if task_names.count(t) > 1})
    if dup:
        raise ConfigError(f"PromptSet.from_tokens: task_names names {dup} more than once ({task_names}): two tasks "
                          "of one name would be merged into one; give each task its own name")
    return task_names


def _labels(labels: Any, task_names: Sequence[str] | None, n: int) -> tuple[torch.Tensor, list[str]]:
    task_names = _task_names(task_names)
    if labels is None:
        names = list(task_names) if task_names is not None else ["task"]
        if len(names) != 1:
            raise ConfigError(f"PromptSet.from_tokens: {len(names)} task_names but no labels: give each prompt's task")
        return torch.zeros(n, dtype=torch.long), names
    import numpy as np

    if isinstance(labels, str):
        raise ConfigError(f"PromptSet.from_tokens: labels must hold one task per prompt, got the string {labels!r}")
    labs = labels.tolist() if torch.is_tensor(labels) or isinstance(labels, np.ndarray) else list(labels)
    if len(labs) != n:
        raise ConfigError(f"PromptSet.from_tokens: labels has {len(labs)} entries for {n} prompts")
    if all(isinstance(v, str) for v in labs):
        names = list(task_names) if task_names is not None else list(dict.fromkeys(labs))
        unknown = sorted({v for v in labs if v not in names})
        if unknown:
            raise ConfigError(f"PromptSet.from_tokens: labels name tasks {unknown} not in task_names {names}")
        return torch.tensor([names.index(v) for v in labs], dtype=torch.long), names
    if any(isinstance(v, (bool, float, str, np.bool_)) or not isinstance(v, (int, np.integer)) for v in labs):
        raise ConfigError("PromptSet.from_tokens: labels must be task indices (int) or task names (str), not a mix")
    idx = [int(v) for v in labs]
    names = list(task_names) if task_names is not None else [f"task{i}" for i in range(max(idx) + 1)]
    if min(idx) < 0 or max(idx) >= len(names):
        raise ConfigError(f"PromptSet.from_tokens: labels must index task_names (0..{len(names) - 1}); got "
                          f"{min(idx)}..{max(idx)}")
    return torch.tensor(idx, dtype=torch.long), names


def _check_words(tok: Any, text: Any) -> None:
    """Text a tokenizer can read: a string, and, for a tvlens model's word tokenizer (its family's words only),
    words of its vocabulary; a Hugging Face tokenizer with an unknown token must not need it."""
    if not isinstance(text, str):
        raise ConfigError(f"PromptSet.from_strings: prompts and answers must be strings, got {text!r:.80} "
                          f"({type(text).__name__})")
    if getattr(tok, "tvlens_word_tokenizer", False):
        vocab = tok.get_vocab()
        unknown = [w for w in text.split() if w not in vocab]
        if unknown:
            words = sorted(vocab, key=vocab.get)
            raise ConfigError(
                f"PromptSet.from_strings: {unknown[0]!r} (in {text!r:.60}) is not a word of this model's vocabulary: a "
                f"tvlens model reads only its task family's {len(words)} words ({', '.join(words[:12])}, ...), "
                "space-separated. Write prompts from those words (model.tokenizer.get_vocab()), or use a Hugging "
                "Face model for free text")
        return
    unk = getattr(tok, "unk_token_id", None)
    if unk is not None and getattr(tok, "unk_token", None) and tok.unk_token not in text:
        try:
            ids = tok.encode(text, add_special_tokens=False)
        except Exception as e:  # a tokenizer's own error: say which text
            raise ConfigError(f"PromptSet.from_strings: the tokenizer cannot encode {text!r:.60}: {e}") from e
        if unk in ids:
            raise ConfigError(f"PromptSet.from_strings: {text!r:.60} holds characters or words this tokenizer does "
                              f"not know (they map to its unknown token {tok.unk_token!r}); rewrite them")


def _encoder(model_or_tokenizer: Any):
    """``encode(text, prepend_bos) -> ids`` with a TransformerLens model's ``to_tokens`` or a tokenizer."""
    if hasattr(model_or_tokenizer, "to_tokens") and getattr(model_or_tokenizer, "tokenizer", None) is not None:
        m = model_or_tokenizer

        def enc(text: str, bos: bool | None) -> list[int]:
            _check_words(m.tokenizer, text)
            kw = {} if bos is None else {"prepend_bos": bos}
            return m.to_tokens(text, truncate=False, move_to_device=False, **kw)[0].tolist()

        return enc
    tok = getattr(model_or_tokenizer, "tokenizer", None) if hasattr(model_or_tokenizer, "cfg") else model_or_tokenizer
    if tok is None or not hasattr(tok, "encode"):
        raise ConfigError("PromptSet.from_strings needs a model with a tokenizer (model.tokenizer) or a Hugging Face "
                          f"tokenizer; got {type(model_or_tokenizer).__name__} without one: use PromptSet.from_tokens")

    def enc2(text: str, bos: bool | None) -> list[int]:
        _check_words(tok, text)
        ids = list(tok.encode(text, add_special_tokens=False))
        if bos and getattr(tok, "bos_token_id", None) is not None:
            ids = [tok.bos_token_id] + ids
        return ids

    return enc2


def _place_answers(rows: list[list[int]], lens: list[int], query_pos: Any, ans: list[list[int]] | None):
    """Where each prompt's query and answer are (``PromptSet.from_tokens``): the rows with the answers written
    in, the query positions and the answers."""
    from tvlens.checks import int_list

    n = len(rows)
    if query_pos is None:
        if ans is None:  # the last token of each sequence is its answer
            if min(lens) < 2:
                raise ConfigError("PromptSet.from_tokens: each sequence needs a query and its answer (>= 2 "
                                  f"tokens) when no answers are given; got a sequence of {min(lens)}")
            return rows, [ln - 2 for ln in lens], [[r[-1]] for r in rows]
        return [r + a for r, a in zip(rows, ans)], [ln - 1 for ln in lens], ans
    from tvlens.checks import _is_int, check_int

    if isinstance(query_pos, bool) or _is_int(query_pos):  # one position for every prompt (True is refused)
        q = [check_int(query_pos, "query_pos", minimum=0, where="PromptSet.from_tokens",
                       hint="the position of the query token (the answer follows it)")] * n
    else:
        q = int_list(query_pos, "query_pos", 0, 10**9, "PromptSet.from_tokens")
    if len(q) != n:
        raise ConfigError(f"PromptSet.from_tokens: query_pos has {len(q)} positions for {n} prompts")
    bad = [i for i, (qi, ln) in enumerate(zip(q, lens)) if qi >= ln]
    if bad:
        raise ConfigError(f"PromptSet.from_tokens: query_pos of prompt {bad[0]} ({q[bad[0]]}) is beyond its "
                          f"{lens[bad[0]]} tokens")
    if ans is None:
        if any(qi + 1 >= ln for qi, ln in zip(q, lens)):
            raise ConfigError("PromptSet.from_tokens: no token follows some query_pos to be its answer; "
                              "give answers=")
        return rows, q, [[r[qi + 1]] for r, qi in zip(rows, q)]
    return [r[: qi + 1] + a + r[qi + 1 + len(a):] for r, qi, a in zip(rows, q, ans)], q, ans


def _task_answer_ids(task_answers: Any, names: list[str], lab: torch.Tensor, answers_t: torch.Tensor) -> torch.Tensor:
    """``task_answers`` of ``PromptSet.from_tokens`` as ids ``[n, n_tasks, n_answer]``, each prompt's own task's
    answer checked against its answer."""
    n, n_ans = answers_t.shape
    if isinstance(task_answers, dict):
        unknown = [t for t in task_answers if t not in names]
        if unknown:
            raise ConfigError(f"PromptSet.from_tokens: task_answers names tasks {unknown} not in task_names {names}")
        missing = [t for t in names if t not in task_answers]
        if missing:
            raise ConfigError(f"PromptSet.from_tokens: task_answers has no answers for tasks {missing}")
        ta = torch.stack([torch.tensor(_id_matrix(task_answers[t], n, f"task_answers[{t!r}]")) for t in names], 1)
    else:
        ta = torch.as_tensor(task_answers)
    if ta.is_floating_point() or tuple(ta.shape) != (n, len(names), n_ans):
        raise ConfigError(f"PromptSet.from_tokens: task_answers must be integer ids [n, n_tasks, n_answer] = "
                          f"{(n, len(names), n_ans)}, got {ta.dtype} {tuple(ta.shape)}")
    ta = ta.long()
    own = ta[torch.arange(n), lab]
    if not torch.equal(own, answers_t):
        i = int((own != answers_t).any(-1).nonzero()[0])
        raise ConfigError(f"PromptSet.from_tokens: task_answers of prompt {i}'s own task "
                          f"({names[int(lab[i])]!r}) is {own[i].tolist()} but its answer is {answers_t[i].tolist()}")
    return ta


def describe(prompts: PromptSet) -> str:
    """One line naming the prompts an analysis ran on (its result's ``prompts`` field)."""
    return f"{prompts.family}: {len(prompts)} prompts, {prompts.shots}-shot, tasks {prompts.task_names}"

