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
            idx = torch.as_tensor(index)
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

    def save(self, path: str | Path) -> Path:
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
        return save_tensors_with_sidecar(path, tensors, meta)

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
