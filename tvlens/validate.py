"""Checks at the public boundary, shared by every entry point: each raises a ``tvlens`` error that names
the argument, what was expected, what was given and what to do, before any work is done.

This module is low: it imports only ``tvlens.errors`` and torch/numpy at the top (``tvlens.prompts``,
``tvlens.models``, ``tvlens.encoding`` and ``tvlens.tasks`` lazily, inside the checks that need them), so any
module may import it. Sections: one per part of tvlens; keep a new part's checks in its own section.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from tvlens.backends import get_backend
from tvlens.checks import _given, as_items, int_list  # noqa: F401 - int_list: also importable here
from tvlens.checks import _plain_int as _is_int
from tvlens.errors import ConfigError

# =====================================================================================================
# Analyses: prompts, models, vectors, the arguments analyses share (batch_size, layers, names, ...)
# =====================================================================================================

#: the checks ``unchecked()`` can switch off
OPTIONAL_CHECKS = ("family", "fingerprint")
_SKIPPED: set[str] = set()


@contextlib.contextmanager
def unchecked(*checks: str) -> Iterator[None]:
    """Switch off agreement checks inside a ``with`` block, on purpose:

    - ``"family"``: run a model on prompts of another task family than the one it was trained on
      (e.g. to measure transfer); by default every analysis refuses that mismatch;
    - ``"fingerprint"``: patch task vectors that carry no model fingerprint (built by hand, or saved by
      an old tvlens), vouching that they live in this model's residual space.

    >>> with tvlens.validate.unchecked("family"):
    ...     acc = tvlens.icl_accuracy(codes_model, categories_prompts)
    """
    bad = [c for c in checks if c not in OPTIONAL_CHECKS]
    if bad or not checks:
        raise ConfigError(f"unchecked(): name one or more of {list(OPTIONAL_CHECKS)}, got {list(checks)}")
    added = [c for c in checks if c not in _SKIPPED]
    _SKIPPED.update(added)
    try:
        yield
    finally:
        _SKIPPED.difference_update(added)


def _where(where: str) -> str:
    return f"{where}: " if where else ""


# --------------------------------------------------------------------------- scalar arguments
def check_batch_size(batch_size: Any, argument: str = "batch_size", where: str = "") -> int | None:
    """``batch_size`` means the same everywhere: a positive integer (prompts per forward pass), or None for
    all prompts in one batch; 0, negatives, floats and strings are refused (``tvlens.checks.check_batch_size``)."""
    from tvlens.checks import check_batch_size as _check

    return _check(batch_size, argument, where)


def check_finite_number(value: Any, argument: str, where: str = "") -> float:
    """A real, finite number (``scale=nan`` or ``inf`` would patch garbage)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        if not (torch.is_tensor(value) and value.numel() == 1 and value.is_floating_point()):
            raise ConfigError(f"{_where(where)}{argument} must be a finite real number, got {_given(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"{_where(where)}{argument} must be a finite number, got {v}")
    return v


def check_finite(t: torch.Tensor, argument: str, where: str = "", what: str = "") -> None:
    """Refuse a float tensor holding NaN or inf (it would give numbers without a word)."""
    if torch.is_tensor(t) and t.is_floating_point() and t.numel():
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            n_bad = int((~finite).sum())
            raise ConfigError(
                f"{_where(where)}{argument} holds {n_bad} NaN or infinite value(s) of {t.numel()}{what}: every "
                "number computed from them would be meaningless; find where they came from (a diverged model, "
                "a bad division) and pass finite values"
            )


def name_list(value: Any, argument: str, known: Sequence[str] | None = None, where: str = "") -> list[Any] | None:
    """A list of names (or indices) from a name, a list of names, or None. A single string is one name
    (``tasks="color"`` is ``["color"]``, never the letters c, o, l, o, r); unknown names are refused."""
    if value is None:
        return None
    items = as_items([value] if isinstance(value, str) or _is_int(value) else value, argument,
                     "a name or a list of names", where)
    for it in items:
        if not isinstance(it, str) and not _is_int(it):
            raise ConfigError(f"{_where(where)}{argument} must hold names (str) or indices (int), got {_given(it)}")
        if known is not None and isinstance(it, str) and it not in known:
            from tvlens.errors import UnknownNameError

            raise UnknownNameError(f"{_where(where)}{argument}: unknown name {it!r}; known: {list(known)}")
    return items


# --------------------------------------------------------------------------- prompts and tokens
def check_prompt_set(prompts: Any, argument: str = "prompts", where: str = "") -> None:
    """A PromptSet, not a raw tensor or list (which carry no query position, answers or tasks)."""
    from tvlens.prompts import PromptSet

    if isinstance(prompts, PromptSet):
        return
    hint = ""
    if torch.is_tensor(prompts) or isinstance(prompts, (list, tuple, np.ndarray)):
        hint = (": wrap your token ids with tvlens.PromptSet.from_tokens(tokens, query_pos, answers, labels=...) "
                "(or PromptSet.from_strings(model, texts, answers, ...)), or sample a family: "
                "tvlens.tasks.get(name).sample(n_per_task)")
    raise ConfigError(f"{_where(where)}{argument} must be a tvlens PromptSet, got {_given(prompts)}{hint}")


def check_token_ids(tokens: Any, d_vocab: int | None, argument: str = "tokens", where: str = "",
                    ndim: int | None = 2) -> None:
    """Integer token ids in ``0..d_vocab-1`` of shape ``[batch, seq]`` (when ``ndim=2``)."""
    if not torch.is_tensor(tokens):
        raise ConfigError(f"{_where(where)}{argument} must be a tensor of token ids, got {_given(tokens)}"
                          + ("; convert it with torch.tensor(...)" if isinstance(tokens, (list, tuple, np.ndarray)) else ""))
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ConfigError(f"{_where(where)}{argument} must hold integer token ids (torch.long), got {_given(tokens)}; "
                          "convert with .long() only if they are whole numbers")
    if ndim is not None and tokens.ndim != ndim:
        one = "; for one prompt use tokens[None]" if tokens.ndim == ndim - 1 else ""
        raise ConfigError(f"{_where(where)}{argument} must have shape [batch, seq], got {_given(tokens)}{one}")
    if tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0:
            raise ConfigError(f"{_where(where)}{argument} holds a negative token id ({lo}); token ids are 0..{(d_vocab or 0) - 1}")
        if d_vocab is not None and hi >= d_vocab:
            raise ConfigError(
                f"{_where(where)}{argument} uses token id {hi} but the model's vocabulary has {d_vocab} tokens (ids "
                f"0..{d_vocab - 1}): these prompts come from another family or vocabulary than the model was built for"
            )


def check_prompts_shape(prompts) -> None:
    """Query positions and answers that fit the prompts' sequences (a PromptSet built by hand can hold any)."""
    n, seq = len(prompts), prompts.seq_len
    if prompts.labels.is_floating_point() or prompts.labels.dtype == torch.bool:
        raise ConfigError(f"PromptSet.labels must hold integer task indices, got {_given(prompts.labels)}")
    q = prompts.query_pos
    if q.is_floating_point() or q.dtype == torch.bool:
        raise ConfigError(f"PromptSet.query_pos must hold integer positions, got {_given(q)}")
    if n and (int(q.min()) < 0 or int(q.max()) + prompts.n_answer >= seq + 1):
        raise ConfigError(
            f"PromptSet.query_pos must be positions 0..{seq - 1 - prompts.n_answer} (the answer's {prompts.n_answer} "
            f"token(s) follow the query position within the {seq} positions); got {int(q.min())}..{int(q.max())}"
        )


def model_family(model) -> dict[str, Any] | None:
    """The task family config a model records (trained or built by tvlens), or None when unknown."""
    info = getattr(model, "tvlens_info", None)
    fam = getattr(info, "family", None)
    return fam if isinstance(fam, dict) and fam.get("name") else None


def check_family(model, prompts, where: str = "", force: bool = False) -> None:
    """Refuse prompts of another task family than the model's (when the model records its family);
    ``force`` checks even inside ``unchecked("family")``."""
    if "family" in _SKIPPED and not force:
        return
    fam = model_family(model)
    if fam is None or not prompts.family:
        return
    name = fam["name"]
    diff = []
    if prompts.family != name:
        diff.append(f"family {prompts.family!r} vs the model's {name!r}")
    else:  # same name: the same tasks and vocabulary? (parameters such as a training curriculum may differ)
        built = _family_of(fam)
        if built is not None:
            params = [f"{k}={prompts.params[k]!r} vs the model's {k}={v!r}" for k, v in built.params.items()
                      if k in prompts.params and prompts.params[k] != v]
            if list(built.task_names) != list(prompts.task_names):
                diff.append(f"tasks {prompts.task_names} vs the model's {built.task_names}")
            elif prompts.vocab is not None and built.vocab is not None and list(built.vocab) != list(prompts.vocab):
                diff.append(f"another vocabulary ({len(prompts.vocab)} vs the model's {len(built.vocab)} words)")
            if diff and params:
                diff.append("parameters " + ", ".join(params))
    if diff:
        raise ConfigError(
            f"{_where(where)}the prompts do not come from the task family this model was trained on "
            f"({'; '.join(diff)}): its numbers would be meaningless. Sample prompts of the model's family "
            f"(tvlens.model_info(model).task_family().sample(...)), or, to test transfer on purpose, run inside "
            "`with tvlens.validate.unchecked('family'):`"
        )


_FAMILIES: dict[str, Any] = {}


def _family_of(config: dict[str, Any]):
    """The TaskFamily a model's family config describes (cached), or None when it cannot be built here
    (e.g. a user's family not registered in this process)."""
    key = repr(sorted(config.items(), key=lambda kv: kv[0]))
    if key not in _FAMILIES:
        from tvlens import tasks
        from tvlens.errors import TvlensError

        try:
            _FAMILIES[key] = tasks.from_config(config)
        except (TvlensError, TypeError, ValueError):
            return None
    return _FAMILIES[key]


def check_model(model: Any, argument: str = "model", where: str = ""):
    """A loaded TransformerLens model, not a name or a path: returns its backend (``tvlens.backends``)."""
    import os

    if isinstance(model, (str, os.PathLike)):
        raise ConfigError(f"{_where(where)}{argument} must be a loaded model, got the name {str(model)!r}: "
                          f"load it first, model = tvlens.load_model({str(model)!r})")

    return get_backend(model)  # UnsupportedModelError names what it takes


def check_seed(seed: Any, argument: str = "seed", where: str = "") -> int:
    """A seed: a non-negative integer (``tvlens.checks.check_seed``)."""
    from tvlens.checks import check_seed as _check

    return _check(seed, argument, where=where)


def check_model_prompts(model, prompts, where: str = "") -> None:
    """Everything that must hold before ``prompts`` are fed to ``model``: a non-empty PromptSet of the
    model's kind (tokens or continuous), integer ids inside its vocabulary (or inputs of its width,
    finite), sequences within its context, and the model's task family when it records one."""
    bk = check_model(model, "model", where)
    check_prompt_set(prompts, "prompts", where)
    if len(prompts) == 0:
        raise ConfigError(f"{_where(where)}the PromptSet is empty: sample at least one prompt")
    if bk.continuous != prompts.is_continuous:
        kind = "continuous (regression)" if bk.continuous else "token"
        raise ConfigError(
            f"{_where(where)}prompts of family {prompts.family!r} are "
            f"{'continuous' if prompts.is_continuous else 'tokens'} but the model is a {kind} model"
        )
    if prompts.is_continuous:
        if prompts.inputs.shape[-1] != bk.d_vocab:
            raise ConfigError(
                f"{_where(where)}prompts have input dimension {prompts.inputs.shape[-1]} but the model reads "
                f"{bk.d_vocab}"
            )
        check_finite(prompts.inputs, "PromptSet.inputs", where)
    else:
        check_token_ids(prompts.tokens, int(bk.d_vocab), "PromptSet.tokens", where)
    check_prompts_shape(prompts)
    if prompts.seq_len > bk.n_ctx:
        raise ConfigError(
            f"{_where(where)}prompts are {prompts.seq_len} positions long but the model's context is "
            f"{bk.n_ctx} (n_ctx): use fewer shots, or shorter sequences"
        )
    check_family(model, prompts, where)


def check_model_inputs(x: Any, model, argument: str, where: str = "") -> None:
    """Raw model inputs (``activation_patching``'s clean/corrupted): ``[batch, seq]`` token ids inside the
    vocabulary, or ``[batch, seq, d_in]`` finite floats for a regression model; within ``n_ctx``."""
    bk = check_model(model, "model", where)
    if not torch.is_tensor(x):
        raise ConfigError(f"{_where(where)}{argument} must be a tensor of model inputs, got {_given(x)}"
                          + ("; convert it with torch.tensor(...)" if isinstance(x, (list, tuple, np.ndarray)) else ""))
    if bk.continuous:
        if not x.is_floating_point() or x.ndim != 3 or x.shape[-1] != bk.d_vocab:
            raise ConfigError(f"{_where(where)}{argument} must be float inputs [batch, seq, {bk.d_vocab}] for "
                              f"this regression model, got {_given(x)}")
        check_finite(x, argument, where)
    else:
        check_token_ids(x, int(bk.d_vocab), argument, where)
    if x.shape[1] > bk.n_ctx:
        raise ConfigError(f"{_where(where)}{argument} is {x.shape[1]} positions long but the model's context is "
                          f"{bk.n_ctx} (n_ctx)")


def one_of(value: Any, argument: str, choices: Iterable[str], where: str = "") -> str:
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{_where(where)}{argument} must be one of {choices}, got {_given(value)}")
    return value


__all__ = [
    "OPTIONAL_CHECKS",
    "check_batch_size",
    "check_family",
    "check_finite",
    "check_finite_number",
    "check_model",
    "check_model_inputs",
    "check_model_prompts",
    "check_prompt_set",
    "check_prompts_shape",
    "check_seed",
    "check_token_ids",
    "int_list",
    "model_family",
    "name_list",
    "one_of",
    "unchecked",
]
