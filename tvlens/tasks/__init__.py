"""Task families that generate ICL prompts with known latent tasks, and their registry.

>>> import tvlens
>>> fam = tvlens.tasks.get("shift")
>>> prompts = fam.sample(n_per_task=10, shots=4, seed=0)
"""

from __future__ import annotations

import builtins
import inspect
from typing import Any, Callable

from tvlens.errors import ConfigError, UnknownNameError
from tvlens.tasks.base import RuleFamily, TaskFamily, TokenTaskFamily
from tvlens.tasks.bitwise import Bitwise
from tvlens.tasks.bitwise_text import BitwiseText
from tvlens.tasks.categories import Categories
from tvlens.tasks.codes import Codes
from tvlens.tasks.lexical import Lexical
from tvlens.tasks.lookup import Lookup
from tvlens.tasks.pos import Pos
from tvlens.tasks.position import Position
from tvlens.tasks.registry import _REGISTRY, registered_module
from tvlens.tasks.shift import Shift
from tvlens.tasks.sparse_regression import (
    SparseRegression,
    basis_aware_baseline,
    basis_aware_predictions,
    basis_fits,
    least_squares_baseline,
)
from tvlens.tasks.text import DEFAULT_TEMPLATE, TextPrompt, TextTaskFamily, tokenize_prompts

_REGISTRY.update({
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
})

#: tvlens' own families: never replaced by ``register`` (models record their family by name)
_BUILTIN = frozenset(_REGISTRY)


def register(name: str, factory: Callable[..., TaskFamily] | None = None, description: str = "", *,
             overwrite: bool = False, **defaults: Any):
    """Add a task family to the registry: ``tvlens.tasks.get(name, **params)`` then builds
    ``factory(**{**defaults, **params})`` (a TaskFamily subclass, e.g. a :class:`RuleFamily`, or a function
    returning one), and training, checkpoints, ``tvlens.load_model`` and the CLI know it by ``name``.

    Also a class decorator: ``@tvlens.tasks.register("ends")``. A model trained on your family records
    ``name``, its parameters and the factory's module; in a new process, import that module (the CLI:
    ``tvlens --import mymodule ...``) before reopening the run. Re-registering a name with another factory
    needs ``overwrite=True``; the shipped families' names cannot be replaced (a shipped model reads its
    recorded family by name)."""
    if factory is None:  # decorator form
        def deco(f: Callable[..., TaskFamily]) -> Callable[..., TaskFamily]:
            register(name, f, description, overwrite=overwrite, **defaults)
            return f

        return deco
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ConfigError(f"register: name must be a non-empty string without surrounding spaces, got {name!r}")
    if not callable(factory):
        raise ConfigError(f"register: factory must be a TaskFamily class or a function returning one, got {factory!r}")
    if name in _BUILTIN:
        raise ConfigError(
            f"register: {name!r} is a task family shipped with tvlens; shipped models and saved runs record their "
            f"family by that name, so replacing it (even with overwrite=True) would change what they are scored on. "
            f"Register yours under another name, e.g. register({name + '_mine'!r}, ...)")
    old = _REGISTRY.get(name)
    same = old is not None and getattr(old[0], "__qualname__", None) == getattr(factory, "__qualname__", None) \
        and getattr(old[0], "__module__", None) == getattr(factory, "__module__", None)
    if old is not None and not same and not overwrite:
        raise ConfigError(f"register: a task family {name!r} is already registered ({old[0]!r}); pick another name "
                          "or pass overwrite=True")
    doc = (getattr(factory, "__doc__", None) or "").strip().splitlines()
    _REGISTRY[name] = (factory, defaults, description or (doc[0] if doc else ""))
    return factory




def with_module(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """``config`` with ``"_module"`` added for a family registered from outside tvlens (see ``register``)."""
    if not isinstance(config, dict) or "_module" in config:
        return config
    module = registered_module(str(config.get("name")))
    return {**config, "_module": module} if module else config


def get(name: str, **params: Any) -> TaskFamily:
    """Build the family registered as ``name``, overriding its default parameters with ``params``."""
    if isinstance(name, TaskFamily):
        return name
    if not isinstance(name, str):
        raise ConfigError(f"a task family name must be a string (tvlens.tasks.list()), got {name!r} ({type(name).__name__})")
    module = params.pop("_module", None)  # recorded by config(): where a user's family was registered
    if name not in _REGISTRY:
        hint = ""
        if module:
            hint = (f". It was registered by module {module!r}: `import {module}` before this (the CLI: "
                    f"tvlens --import {module} ...)")
        else:
            hint = (". Your own family? Register it first: tvlens.tasks.register(name, MyFamily) in a module you "
                    "import (the CLI: tvlens --import mymodule ...)")
        raise UnknownNameError(f"unknown task family {name!r}; known families: {sorted(_REGISTRY)}{hint}")
    factory, defaults, _ = _REGISTRY[name]
    _check_params(name, factory, params)
    fam = factory(**{**defaults, **params})
    if not isinstance(fam, TaskFamily):
        raise ConfigError(f"the factory registered as {name!r} returned {type(fam).__name__}, not a TaskFamily")
    fam.name = name
    return fam


def _check_params(name: str, factory: Callable[..., TaskFamily], params: dict[str, Any]) -> None:
    """Unknown family parameters are an error naming them and the known ones (not a TypeError)."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return
    ps = sig.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in ps):
        return
    known = [p.name for p in ps if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(k for k in params if k not in known)
    if unknown:
        raise ConfigError(f"task family {name!r}: unknown parameter(s) {unknown}; its parameters: {known}")


def list() -> builtins.list[str]:  # noqa: A001 - the issue's API name
    """The registered family names."""
    return sorted(_REGISTRY)


def describe() -> dict[str, str]:
    return {k: v[2] for k, v in sorted(_REGISTRY.items())}


def from_config(config: dict[str, Any]) -> TaskFamily:
    """Rebuild a family from ``family.config()`` (as stored in checkpoints)."""
    if not isinstance(config, dict) or not isinstance(config.get("name"), str):
        raise ConfigError(f"a family config is a dict with a 'name' (e.g. {{'name': 'codes'}}), got {config!r}")
    config = dict(config)
    return get(config.pop("name"), **config)


__all__ = [
    "TaskFamily",
    "TokenTaskFamily",
    "RuleFamily",
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
    "registered_module",
    "with_module",
    "describe",
    "from_config",
]
