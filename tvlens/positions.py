"""Positions: where a prompt's task is written and read (the one module that knows).

A prompt is ``examples ... query -> answer``. Everything an analysis reads or patches is located here:

- the **query position** (``prompts.query_pos``): the last token before the query's answer, where the
  paper reads a prompt's representation and where ``run_patching`` writes a task vector;
- the **answer positions** (``answer_positions``): the positions whose outputs predict the query's
  answer tokens (``query_pos .. query_pos + n_answer - 1``), read by every metric; the **answer token
  positions** (``answer_token_positions``): the slots that hold the answer tokens themselves;
- the **representation mask** (``representation_mask``): where a representation is read (``at="query"``
  or ``"answers"``, the in-context examples' answer tokens), and so where task vectors are written back;
- a **position mask** (``position_mask``): the positions an edge or node patch touches;
- the examples' answer spans (``shuffle_labels``: corrupted prompts with the in-context labels permuted),
  and ``trim_to_answers`` (positions after the last answer cannot change it).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from jaxtyping import Bool, Int

from tvlens.errors import ConfigError

AT = ("query", "answers")


def answer_positions(query_pos: torch.Tensor, n_answer: int) -> torch.Tensor:
    """``[b, n_answer]``: the positions whose outputs predict the query's answer tokens."""
    return query_pos[:, None] + torch.arange(n_answer, device=query_pos.device)[None]


def prompt_answer_positions(prompts) -> Int[torch.Tensor, "n n_answer"]:
    """``answer_positions`` of ``prompts`` (their query positions and answer length)."""
    return answer_positions(prompts.query_pos, prompts.n_answer)


def answer_token_positions(prompts) -> Int[torch.Tensor, "n n_answer"]:
    """``[n, n_answer]``: the positions that hold the query's answer tokens (one after each answer position)."""
    return answer_positions(prompts.query_pos, prompts.n_answer) + 1


def at_answer_positions(x: torch.Tensor, query_pos: torch.Tensor, n_answer: int) -> torch.Tensor:
    """``x[b, seq, ...]`` at each prompt's answer positions: ``[b, n_answer, ...]``."""
    pos = answer_positions(query_pos, n_answer)
    return x.gather(1, pos.view(*pos.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:]))


def check_at(at: str) -> str:
    if at not in AT:
        raise ConfigError(f"at must be one of {list(AT)} (where a prompt's representation is read), got {at!r}")
    return at


def representation_mask(prompts, at: str = "query") -> Bool[torch.Tensor, "n seq"]:
    """The positions whose residual (averaged) is a prompt's representation, up to the query.

    ``"query"``: the query position alone, the last token before the answer (the paper's definition).
    ``"answers"``: the answer tokens of the in-context examples, averaged; a model can keep its task
    there and read it from the query (the shipped default model does; see ``run_patching``).
    """
    check_at(at)
    q = prompts.query_pos
    n, width = len(prompts), int(q.max()) + 1
    pos = torch.arange(width, device=q.device)[None]
    if at == "query":
        return pos == q[:, None]
    if prompts.train_mask is None or prompts.shots == 0:
        raise ConfigError("at='answers' needs prompts with in-context examples (shots >= 1) and a train_mask; "
                          f"these have shots={prompts.shots}")
    tm = prompts.train_mask[:, : width - 1].to(q.device)
    mask = torch.zeros(n, width, dtype=torch.bool, device=q.device)
    mask[:, 1:] = tm  # position i holds an answer token when position i-1 is trained to predict it
    mask &= pos < q[:, None]  # examples only, not the query's own answer
    if not bool(mask.any(1).all()):
        raise ConfigError("at='answers': some prompts have no example answer tokens before the query")
    return mask


def position_mask(prompts, positions: Any, seq: int) -> Bool[torch.Tensor, "n seq"]:
    """The positions a patch touches, ``[n, seq]`` on the CPU: all (None), ``"query"`` / ``"answers"``
    (``representation_mask``), or a boolean mask ``[n, <= seq]`` of your own."""
    n = len(prompts)
    if positions is None:
        return torch.ones(n, seq, dtype=torch.bool)
    if isinstance(positions, str):
        if positions not in AT:
            raise ConfigError(f"positions must be None, 'query', 'answers' or a boolean mask [n, seq]; got {positions!r}")
        m = representation_mask(prompts, positions).cpu()
    else:
        m = torch.as_tensor(positions).cpu()
        if m.dtype != torch.bool or m.ndim != 2 or m.shape[0] != n or m.shape[1] > prompts.tokens.shape[1]:
            raise ConfigError(f"positions: a boolean mask of shape [{n}, <= {prompts.tokens.shape[1]}] expected, got "
                              f"{m.dtype} {tuple(m.shape)}")
    out = torch.zeros(n, seq, dtype=torch.bool)
    w = min(seq, m.shape[1])
    out[:, :w] = m[:, :w]
    return out


def trim_to_answers(prompts):
    """Prompts cut after the last answer position (later positions cannot change the answer)."""
    last = int(prompts.query_pos.max()) + prompts.n_answer
    return replace(prompts, tokens=prompts.tokens[:, :last], targets=prompts.targets[:, :last],
                   train_mask=prompts.train_mask[:, :last])


def _example_answer_spans(row: torch.Tensor, q: int, arrow: int, end: int, i: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each in-context example's answer in one prompt's tokens (between ``->`` and ``;``)."""
    spans = []
    for a in [int(a) for a in (row[:q] == arrow).nonzero().flatten()]:
        ends = (row[a + 1 : q] == end).nonzero().flatten()
        if len(ends) == 0:
            raise ConfigError(f"prompt {i}: an example's answer after position {a} has no ';' before the query")
        spans.append((a + 1, a + 1 + int(ends[0])))
    return _check_spans(spans, i)


def _trained_spans(train_mask: torch.Tensor, q: int, i: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each in-context example's answer in a text prompt: the runs of positions whose
    previous position is trained to predict them (``train_mask``), before the query's own answer."""
    held = torch.zeros(q + 1, dtype=torch.bool)
    held[1:] = train_mask[:q].cpu()  # position p holds an answer token when p - 1 predicts it
    spans, start = [], None
    for p in range(q + 1):
        if bool(held[p]) and start is None:
            start = p
        elif not bool(held[p]) and start is not None:
            spans.append((start, p))
            start = None
    if start is not None:
        spans.append((start, q + 1))
    return _check_spans(spans, i)


def _check_spans(spans: list[tuple[int, int]], i: int) -> list[tuple[int, int]]:
    if len(spans) < 2:
        raise ConfigError(f"prompt {i} has {len(spans)} example(s): shuffling labels needs at least two")
    lens = {e - s for s, e in spans}
    if len(lens) != 1:
        raise ConfigError(f"prompt {i}: examples' answers have different lengths {sorted(lens)} (tokens); cannot "
                          "permute them")
    return spans


def shuffle_labels(prompts, seed: int = 0):
    """The same prompts with each prompt's in-context answers (labels) permuted among its examples.

    Every prompt gets a random permutation other than the identity (so with distinct labels at least
    two examples change answer); the query and its answer stay. Needs at least two shots.
    """
    if prompts.is_continuous:
        raise ConfigError("shuffled labels are built for token families; these prompts are continuous")
    if not prompts.family:
        raise ConfigError(
            "corrupted: these are your own prompts (PromptSet.from_strings / from_tokens), which record no example "
            "layout, so tvlens cannot build their corrupted run (in-context labels shuffled) itself. Pass "
            "corrupted= yourself: a PromptSet of the same shape and query positions, e.g. the same queries after "
            "another task's examples (PromptSet.from_strings(model, corrupted_texts, answers, ...)); or use "
            "method='dla' (no corrupted run)")
    if prompts.shots < 2:
        raise ConfigError(f"shuffling in-context labels needs at least two shots (examples) per prompt; these "
                          f"prompts have shots={prompts.shots}: sample them with shots >= 2")
    text = "answer_tokens" in prompts.extra and prompts.train_mask is not None  # a text family's prompts
    vocab = prompts.vocab or []
    if not text and ("->" not in vocab or ";" not in vocab):
        raise ConfigError("cannot find the examples' answers: the prompts' vocabulary has no '->' and ';' tokens")
    toks = prompts.tokens.clone()
    gen = torch.Generator().manual_seed(seed)
    for i in range(len(prompts)):
        row = toks[i]
        q = int(prompts.query_pos[i])
        spans = (_trained_spans(prompts.train_mask[i], q, i) if text else
                 _example_answer_spans(row, q, vocab.index("->"), vocab.index(";"), i))
        labels = [row[s:e].clone() for s, e in spans]
        perm = torch.arange(len(spans))
        while bool((perm == torch.arange(len(spans))).all()):
            perm = torch.randperm(len(spans), generator=gen)
        for (s, e), j in zip(spans, perm.tolist()):
            row[s:e] = labels[j]
    return replace(prompts, tokens=toks)


__all__ = ["AT", "answer_positions", "answer_token_positions", "at_answer_positions", "check_at", "position_mask",
           "prompt_answer_positions", "representation_mask", "shuffle_labels", "trim_to_answers"]
