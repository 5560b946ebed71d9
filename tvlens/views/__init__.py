"""tvlens views: every result one call away from a picture, in Jupyter and in a file, all offline.

- :mod:`tvlens.views.plots`: plotly figures (TD by layer, per-task TD, encodings scatter, patching
  grids, head-score maps, emergence, function vectors, TD vs ICL accuracy, finetuning arms);
  results' ``.plot()`` return these;
- :mod:`tvlens.views.circuits`: CircuitsVis views from the bundled JavaScript (attention patterns on
  a prompt's tokens, coloured tokens, the interactive circuit view);
- :mod:`tvlens.views.circuit_graph`: the interactive circuit graph of an ``EdgeScores`` (inline SVG);
- :mod:`tvlens.views.page`: fragments and self-contained pages (each library inlined once);
- :mod:`tvlens.views.report`: the HTML report of ``tvlens report`` and ``tvlens demo``.
"""

from __future__ import annotations

from tvlens.views.circuit_graph import circuit_graph_view
from tvlens.views.circuits import (
    attention_heads_view,
    attention_patterns,
    circuit_view,
    colored_tokens_view,
    position_sweep_view,
    prompt_tokens,
)
from tvlens.views.page import Fragment, Page, as_fragment, figure_fragment
from tvlens.views.plots import (
    accuracy_figure,
    emergence_figure,
    encodings_scatter_figure,
    finetune_figure,
    function_vectors_figure,
    head_scores_figure,
    patching_figure,
    patching_grids_figure,
    patching_profile_figure,
    sweep_figure,
    td_accuracy_figure,
    td_by_layer_figure,
    td_heatmap_figure,
)
from tvlens.views.report import Report, build_report, write_report

__all__ = [
    "Fragment",
    "Page",
    "Report",
    "accuracy_figure",
    "as_fragment",
    "attention_heads_view",
    "attention_patterns",
    "build_report",
    "circuit_graph_view",
    "circuit_view",
    "colored_tokens_view",
    "emergence_figure",
    "encodings_scatter_figure",
    "figure_fragment",
    "finetune_figure",
    "function_vectors_figure",
    "head_scores_figure",
    "patching_figure",
    "patching_grids_figure",
    "patching_profile_figure",
    "position_sweep_view",
    "prompt_tokens",
    "sweep_figure",
    "td_accuracy_figure",
    "td_by_layer_figure",
    "td_heatmap_figure",
    "write_report",
]
