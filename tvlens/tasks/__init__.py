"""Task families that generate ICL prompts with known latent tasks, and their registry.

>>> import tvlens
>>> fam = tvlens.tasks.get("shift")
>>> prompts = fam.sample(n_per_task=10, shots=4, seed=0)
"""

from __future__ import annotations

import builtins
from typing import Any, Callable

from tvlens.errors import UnknownNameError
from tvlens.tasks.base import TaskFamily, TokenTaskFamily
from tvlens.tasks.bitwise import Bitwise
from tvlens.tasks.bitwise_text import BitwiseText
from tvlens.tasks.categories import Categories
from tvlens.tasks.codes import Codes
from tvlens.tasks.lexical import Lexical
from tvlens.tasks.lookup import Lookup
from tvlens.tasks.pos import Pos
from tvlens.tasks.position import Position
from tvlens.tasks.shift import Shift
from tvlens.tasks.sparse_regression import (
    SparseRegression,
    basis_aware_baseline,
    basis_aware_predictions,
    basis_fits,
    least_squares_baseline,
)
from tvlens.tasks.text import DEFAULT_TEMPLATE, TextPrompt, TextTaskFamily, tokenize_prompts

_REGISTRY: dict[str, tuple[Callable[..., TaskFamily], dict[str, Any], str]] = {
    "bitwise": (Bitwise, {}, "AND/OR/XOR/NAND/NOR/XNOR of two 5-bit strings, plus Null"),
    "categories": (Categories, {}, "answer the input's token of category T (6 x 8 tokens), plus Null"),
    "codes": (Codes, {}, "answer the code (1-8) of the input's category-T word: the task shows only in the mapping"),
    "lookup": (Lookup, {}, "answer the value of key T in a key-value table: the task shows only in the mapping"),
    "position": (Position, {}, "answer the letter at position T of a 5-letter word: the task shows only in the mapping"),
    "shift": (Shift, {}, "Caesar shifts of letters: the task shows only in how inputs map to outputs"),
    "sparse_regression": (
        SparseRegression,
        {"D": 16, "r": 4, "n_bases": 4},
        "the paper's mixture of sparse linear regressions (D=16, r=4, 4 bases; 19 shots = 20 examples)",
    ),
    "pos": (Pos, {}, "text: the first word with POS tag T (noun, adjective, ...) of a sentence, plus Null"),
    "bitwise_text": (BitwiseText, {}, "text: AND/NAND/OR/NOR/XOR/XNOR of two 5-digit binary numbers, plus Null"),
    "lexical": (Lexical, {}, "text: antonym, country-capital, uppercase, next letter, present-past"),
    "sparse_regression_small": (
        SparseRegression,
        {"D": 8, "r": 2, "n_bases": 4},
        "a CPU-sized sparse regression (D=8, r=2, 4 bases)",
    ),
}


def register(name: str, factory: Callable[..., TaskFamily], description: str = "", **defaults: Any) -> None:
    """Add a task family to the registry (``tvlens.tasks.get(name)`` then builds it)."""
    _REGISTRY[name] = (factory, defaults, description)


def get(name: str, **params: Any) -> TaskFamily:
    """Build the family registered as ``name``, overriding its default parameters with ``params``."""
    if isinstance(name, TaskFamily):
        return name
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown task family {name!r}; known families: {sorted(_REGISTRY)}")
    factory, defaults, _ = _REGISTRY[name]
    fam = factory(**{**defaults, **params})
    fam.name = name
    return fam


def list() -> builtins.list[str]:  # noqa: A001 - the issue's API name
    """The registered family names."""
    return sorted(_REGISTRY)


def describe() -> dict[str, str]:
    return {k: v[2] for k, v in sorted(_REGISTRY.items())}


def from_config(config: dict[str, Any]) -> TaskFamily:
    """Rebuild a family from ``family.config()`` (as stored in checkpoints)."""
    config = dict(config)
    return get(config.pop("name"), **config)


__all__ = [
    "TaskFamily",
    "TokenTaskFamily",
    "Bitwise",
    "Categories",
    "Codes",
    "Lookup",
    "Position",
    "Shift",
    "SparseRegression",
    "least_squares_baseline",
    "basis_aware_baseline",
    "basis_aware_predictions",
    "basis_fits",
    "Pos",
    "BitwiseText",
    "Lexical",
    "TextTaskFamily",
    "TextPrompt",
    "DEFAULT_TEMPLATE",
    "tokenize_prompts",
    "get",
    "list",
    "register",
    "describe",
    "from_config",
]
