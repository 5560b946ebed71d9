"""tvlens views: every result one call away from a picture, in Jupyter and in a file, all offline.

- :mod:`tvlens.views.plots`: plotly figures (TD by layer, per-task TD, encodings scatter, patching
  grids, head-score maps, emergence, function vectors, TD vs ICL accuracy, finetuning arms);
  results' ``.plot()`` return these;
- :mod:`tvlens.views.circuits`: CircuitsVis views from the bundled JavaScript (attention patterns on
  a prompt's tokens, coloured tokens, the interactive circuit view);
- :mod:`tvlens.views.circuit_graph`: the interactive circuit graph of an ``EdgeScores`` (inline SVG);
- :mod:`tvlens.views.page`: fragments and self-contained pages (each library inlined once);
- :mod:`tvlens.views.report`: the HTML report of ``tvlens report`` and ``tvlens demo``.

Importing this package registers its drawings in ``tvlens.plotting``, the registry results draw through
(analyses sit below the views and never import them; see ``tvlens/_layers.py``).
"""

from __future__ import annotations

from tvlens import plotting
from tvlens.views.circuit_graph import circuit_graph_view
from tvlens.views.circuits import (
    attention_heads_view,
    attention_patterns,
    circuit_view,
    colored_tokens_view,
    position_sweep_view,
    prompt_tokens,
)
from tvlens.views.page import Fragment, Page, as_fragment, figure_fragment, result_html
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

# results' .plot() and _repr_html_ find these by name (tvlens.plotting): analyses never import views
plotting.register(
    accuracy_figure=accuracy_figure, circuit_graph_view=circuit_graph_view, emergence_figure=emergence_figure,
    encodings_scatter_figure=encodings_scatter_figure, figure_fragment=figure_fragment, finetune_figure=finetune_figure,
    function_vectors_figure=function_vectors_figure, head_scores_figure=head_scores_figure,
    patching_figure=patching_figure, patching_grids_figure=patching_grids_figure, result_html=result_html,
    sweep_figure=sweep_figure, td_accuracy_figure=td_accuracy_figure, td_by_layer_figure=td_by_layer_figure,
    td_heatmap_figure=td_heatmap_figure,
)

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
