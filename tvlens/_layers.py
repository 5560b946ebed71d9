"""The layers of tvlens, bottom to top: the one table ``tests/test_architecture.py`` enforces.

A module imports only from its own layer or the layers below it, at module level or inside a function,
and never in a circle (within a layer the imports must be acyclic). A module's layer is the entry of the
longest name that is it or a package above it (``tvlens.backends`` covers ``tvlens.backends.hooked``;
``tvlens``, the facade, covers only itself). A module in no layer fails the test: add it here.
``tvlens/__init__.py`` (the lazy facade) and the README's "Layout" section list the same table.

Where the in-between modules sit, and why:
- ``stats`` (bootstrap CIs, kNN votes), ``plotting`` (the drawing registry the views fill) and ``_layers``
  import nothing of tvlens but errors: the foundation;
- ``positions`` shares the prompts layer: where a prompt's task is read and written is about the prompt;
- ``tokenizer`` (word tokenizers of the synthetic families) and ``validate`` (model/prompts/family
  agreement at the public boundary) need backends and tasks, and everything above uses them: the models layer;
- ``views`` draw results, so they sit above every analysis; results reach their drawings through
  ``tvlens.plotting`` (by name), never by importing a view;
- ``tvlens`` itself (the package facade, names re-exported lazily) sits just below the CLI.
"""

from __future__ import annotations

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("tvlens.errors", "tvlens.checks", "tvlens.io", "tvlens.stats", "tvlens.plotting", "tvlens._layers")),
    ("backends", ("tvlens.backends",)),
    ("prompts", ("tvlens.prompts", "tvlens.positions")),
    ("tasks", ("tvlens.tasks",)),
    ("models", ("tvlens.models", "tvlens.gguf_models", "tvlens.tokenizer", "tvlens.validate")),
    ("measures", ("tvlens.encoding", "tvlens.accuracy", "tvlens.sweeps")),
    ("analyses", ("tvlens.patching", "tvlens.attribution", "tvlens.circuits", "tvlens.llm", "tvlens.finetune",
                  "tvlens.regression", "tvlens.train")),
    ("views", ("tvlens.views",)),
    ("api", ("tvlens",)),
    ("cli", ("tvlens.cli",)),
)


def layer_of(module: str) -> int | None:
    """The index (0 = bottom) of ``module``'s layer: its longest listed prefix; None when unlisted."""
    best, best_len = None, -1
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            below = name != "tvlens" and module.startswith(name + ".")  # the facade covers only itself
            if (module == name or below) and len(name) > best_len:
                best, best_len = i, len(name)
    return best


__all__ = ["LAYERS", "layer_of"]
