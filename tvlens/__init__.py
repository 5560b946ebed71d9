"""tvlens: task vectors and in-context learning, seen through TransformerLens.

The whole public API (each name documented where it is defined)::

    tvlens.tasks.get(name, **params) -> TaskFamily     # bitwise, categories, shift, sparse_regression
    family.sample(n_per_task, shots, seed) -> PromptSet
    tvlens.PromptSet.from_tokens(tokens, answers=, labels=) / .from_strings(model, texts, answers)  # your prompts
    tvlens.tasks.register("mine", MyFamily)             # your family: a tvlens.tasks.RuleFamily (words + rules)
    tvlens.validate.unchecked("family")                # a `with` block: run a model on another family on purpose
    tvlens.load_model(name_or_path) -> HookedTransformer   # "default", "shift", "categories", "bitwise"
    tvlens.icl_accuracy(model, prompts) -> AccuracyResult  # per-task accuracy (MSE for regression)
    tvlens.train(TrainConfig(...), out_dir) -> (model, history)
    tvlens.extract(model, prompts, layers=None) -> TaskEncodings   # query-position residuals per layer
    encodings.task_vectors(layer) -> TaskVectors                  # per-task means, savable
    tvlens.task_decodability(encodings) -> DecodabilityResult     # leave-one-out kNN TD per layer
    tvlens.emergence(run_or_name) -> EmergenceResult              # TD and accuracy across checkpoints
    tvlens.run_patching(model, prompts, vectors, mode=...) -> PatchingResult  # conditional decoding
    tvlens.activation_patching(model, clean, corrupted, metric, site, by) -> SweepResult
    tvlens.head_attribution(model, prompts, method="cie"|"ablation"|"patch"|"atp"|"dla"|"eap-ig") -> HeadScores
    tvlens.edge_attribution(model, prompts, method="eap-ig"|"eap"|"path-patch") -> EdgeScores  # .plot(): graph
    tvlens.path_patching(model, prompts, edges) / tvlens.faithfulness(model, prompts, edge_scores) -> Faithfulness
    tvlens.function_vector(model, prompts, scores, k=10) -> FunctionVectors  # a TaskVectors for run_patching
    family.sample(n, shots, seed, tokenizer=model.tokenizer, scoring=...)  # text: pos, bitwise_text, lexical
    tvlens.text_accuracy(model, prompts, scoring=...) -> AccuracyResult  # first token or greedy whole answer
    tvlens.td_vs_accuracy(model, families, shots=(1, 4, 10)) -> TDAccuracyResult  # per task, fit and R²
    tvlens.finetune(model, family, layers="first_half", steps=...) -> FinetuneResult  # TD/acc before, after
    result.plot() -> plotly Figure; result._repr_html_() in Jupyter  # every result, via tvlens.views
    tvlens.views.attention_heads_view(model, prompts, heads, prompt) / circuit_view(scores, model, prompts)
    tvlens.views.build_report(model, family) -> Report; report.save("r.html")  # `tvlens report`, offline HTML

The layers, bottom to top (``tvlens/_layers.py``; a module imports only from its layer or below, even inside a
function, never in a circle: ``tests/test_architecture.py``)::

    foundation: errors, checks, io, stats, plotting, _layers  (plotting: the drawing registry views fill)
    backends:   backends/  (protocol, hooked, bridge, embed, loading: the one seam to TransformerLens)
    prompts:    prompts, positions  (query, answers, read/write masks: where a prompt's task is read and written)
    tasks:      tasks/  (the families, their registry)
    models:     models, gguf_models, tokenizer, validate  (checkpoints and loading; GGUF models; boundary checks)
    measures:   encoding/, accuracy, sweeps  (extraction, TD, task vectors, emergence; accuracy/scoring; the engine)
    analyses:   patching, attribution, circuits/, llm, finetune, regression, train
    views:      views/  (figures, CircuitsVis, circuit graph, report; they register drawings in plotting)
    api:        tvlens  (this file: the public names, re-exported lazily)
    cli:        cli  (the `tvlens` command)
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from typing import TYPE_CHECKING, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tvlens never downloads (see models.py)

from tvlens.errors import CheckpointError, ConfigError, OfflineWeightsError, TvlensError, UnknownNameError  # noqa: E402

# Public names -> the module that defines them. Imported on first use (module-level ``__getattr__``), so
# ``import tvlens`` does not pay for TransformerLens/transformers (seconds) until a model is needed.
_LAZY: dict[str, str] = {
    "AccuracyResult": "tvlens.accuracy", "icl_accuracy": "tvlens.accuracy",
    "FunctionVectors": "tvlens.attribution", "HeadScores": "tvlens.attribution",
    "function_vector": "tvlens.attribution", "head_attribution": "tvlens.attribution",
    "DecodabilityResult": "tvlens.encoding", "EmergenceResult": "tvlens.encoding", "TaskEncodings": "tvlens.encoding",
    "TaskVectors": "tvlens.encoding", "emergence": "tvlens.encoding", "extract": "tvlens.encoding",
    "task_decodability": "tvlens.encoding",
    "FinetuneResult": "tvlens.finetune", "finetune": "tvlens.finetune",
    "TDAccuracyResult": "tvlens.llm", "greedy_generate": "tvlens.accuracy", "td_vs_accuracy": "tvlens.llm",
    "text_accuracy": "tvlens.accuracy",
    "build_model": "tvlens.models", "checkpoint_steps": "tvlens.models", "list_checkpoints": "tvlens.models",
    "load_checkpoint": "tvlens.models", "load_model": "tvlens.models", "model_info": "tvlens.models",
    "save_checkpoint": "tvlens.models", "shipped_models": "tvlens.models",
    "PatchingResult": "tvlens.patching", "run_patching": "tvlens.patching",
    "PromptSet": "tvlens.prompts",
    "RegressionPatchingResult": "tvlens.regression", "regression_patching": "tvlens.regression",
    "SweepResult": "tvlens.sweeps", "activation_patching": "tvlens.sweeps",
    "TrainConfig": "tvlens.train", "read_log": "tvlens.train", "train": "tvlens.train",
    "EdgeScores": "tvlens.circuits", "Faithfulness": "tvlens.circuits", "edge_attribution": "tvlens.circuits",
    "faithfulness": "tvlens.circuits", "path_patching": "tvlens.circuits",
}
_SUBMODULES = ("tasks", "views", "validate", "tokenizer", "stats", "checks")


# ``tvlens.train`` and ``tvlens.finetune`` name functions, as their modules do: importing the module sets the
# package attribute to the module, which would hide the function. Keep the function (as eager imports did).
_SHADOWED = {name for name, module in _LAZY.items() if module == f"tvlens.{name}"}


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"tvlens.{name}")
    else:
        raise AttributeError(f"module 'tvlens' has no attribute {name!r}")
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from tvlens import tasks, validate, views  # noqa: F401
    from tvlens.accuracy import AccuracyResult, greedy_generate, icl_accuracy, text_accuracy  # noqa: F401  # noqa: F401
    from tvlens.attribution import FunctionVectors, HeadScores, function_vector, head_attribution  # noqa: F401
    from tvlens.circuits import EdgeScores, Faithfulness, edge_attribution, faithfulness, path_patching  # noqa: F401
    from tvlens.encoding import (  # noqa: F401
        DecodabilityResult,
        EmergenceResult,
        TaskEncodings,
        TaskVectors,
        emergence,
        extract,
        task_decodability,
    )
    from tvlens.finetune import FinetuneResult, finetune  # noqa: F401
    from tvlens.llm import TDAccuracyResult, td_vs_accuracy  # noqa: F401
    from tvlens.models import (  # noqa: F401
        build_model,
        checkpoint_steps,
        list_checkpoints,
        load_checkpoint,
        load_model,
        model_info,
        save_checkpoint,
        shipped_models,
    )
    from tvlens.patching import PatchingResult, run_patching  # noqa: F401
    from tvlens.prompts import PromptSet  # noqa: F401
    from tvlens.regression import RegressionPatchingResult, regression_patching  # noqa: F401
    from tvlens.sweeps import SweepResult, activation_patching  # noqa: F401
    from tvlens.train import TrainConfig, read_log, train  # noqa: F401

__version__ = "0.1.0"

__all__ = [
    "EdgeScores",
    "Faithfulness",
    "edge_attribution",
    "faithfulness",
    "path_patching",
    "views",
    "validate",
    "FinetuneResult",
    "TDAccuracyResult",
    "finetune",
    "greedy_generate",
    "td_vs_accuracy",
    "text_accuracy",
    "AccuracyResult",
    "FunctionVectors",
    "HeadScores",
    "function_vector",
    "head_attribution",
    "PatchingResult",
    "SweepResult",
    "activation_patching",
    "run_patching",
    "RegressionPatchingResult",
    "regression_patching",
    "DecodabilityResult",
    "EmergenceResult",
    "TaskEncodings",
    "TaskVectors",
    "emergence",
    "extract",
    "task_decodability",
    "CheckpointError",
    "ConfigError",
    "OfflineWeightsError",
    "PromptSet",
    "TrainConfig",
    "TvlensError",
    "UnknownNameError",
    "build_model",
    "checkpoint_steps",
    "icl_accuracy",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "model_info",
    "read_log",
    "save_checkpoint",
    "shipped_models",
    "tasks",
    "train",
]
