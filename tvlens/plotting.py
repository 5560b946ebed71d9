"""The drawing registry: results draw themselves through it, ``tvlens.views`` fills it.

Analyses sit below the views in the layering (``tvlens/_layers.py``), so a result never imports a view.
Its ``.plot()`` and ``_repr_html_`` ask this registry by name instead::

    from tvlens.plotting import accuracy_figure   # the drawing registered as "accuracy_figure"

``tvlens.views`` registers its drawings (``register(...)`` at the end of ``tvlens/views/__init__.py``) when it
is imported; a name asked for before that loads ``tvlens.views`` once (``PROVIDER``), as a plugin entry point
would. That load, by name, is the one place a lower layer reaches a higher one, and only to let it register.
Your own drawing for a name: ``tvlens.plotting.register(accuracy_figure=my_figure)`` after importing tvlens.views.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from tvlens.errors import ConfigError

PROVIDER = "tvlens.views"  # the package that registers tvlens' own drawings when imported
_DRAWINGS: dict[str, Callable[..., Any]] = {}


def register(**drawings: Callable[..., Any]) -> None:
    """Register drawings by name: ``register(accuracy_figure=fn, ...)``; a later registration wins."""
    for name, fn in drawings.items():
        if not callable(fn):
            raise ConfigError(f"register: drawing {name!r} must be callable, got {type(fn).__name__}")
        _DRAWINGS[name] = fn


def drawing(name: str) -> Callable[..., Any]:
    """The drawing registered as ``name`` (loading ``PROVIDER`` first when nothing has registered it)."""
    if name not in _DRAWINGS:
        importlib.import_module(PROVIDER)
    try:
        return _DRAWINGS[name]
    except KeyError:
        raise ConfigError(f"no drawing registered as {name!r}; registered: {sorted(_DRAWINGS)}") from None


def __getattr__(name: str) -> Callable[..., Any]:
    """``from tvlens.plotting import <drawing>``; an unknown name is an AttributeError, as for any module."""
    if name.startswith("_"):
        raise AttributeError(f"module 'tvlens.plotting' has no attribute {name!r}")
    try:
        return drawing(name)
    except ConfigError as e:
        raise AttributeError(str(e)) from None


__all__ = ["PROVIDER", "drawing", "register"]
