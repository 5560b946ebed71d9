"""The registry of task families by name (filled by ``tvlens.tasks``; ``tvlens.tasks.register`` adds yours).

It lives apart from ``tvlens/tasks/__init__.py`` so that ``tasks.base`` (below the families) can ask which
module registered a family without importing the package that imports it.
"""

from __future__ import annotations

from typing import Any, Callable

# name -> (factory, default parameters, one-line description)
_REGISTRY: dict[str, tuple[Callable[..., Any], dict[str, Any], str]] = {}


def registered_module(name: str) -> str | None:
    """The module of a family registered from outside tvlens (None for tvlens' own and unknown names)."""
    entry = _REGISTRY.get(name)
    module = getattr(entry[0], "__module__", None) if entry else None
    return None if module is None or module == "tvlens" or module.startswith("tvlens.") else module
