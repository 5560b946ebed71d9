"""tvlens: task vectors and in-context learning, seen through TransformerLens.

The whole public API (each name documented where it is defined)::

    tvlens.tasks.get(name, **params) -> TaskFamily     # bitwise, categories, shift, sparse_regression
    family.sample(n_per_task, shots, seed) -> PromptSet
    tvlens.load_model(name_or_path) -> HookedTransformer   # "default", "shift", "categories", "bitwise"
    tvlens.icl_accuracy(model, prompts) -> AccuracyResult  # per-task accuracy (MSE for regression)
    tvlens.train(TrainConfig(...), out_dir) -> (model, history)
    tvlens.extract(model, prompts, layers=None) -> TaskEncodings   # query-position residuals per layer
    encodings.task_vectors(layer) -> TaskVectors                  # per-task means, savable
    tvlens.task_decodability(encodings) -> DecodabilityResult     # leave-one-out kNN TD per layer
    tvlens.emergence(run_or_name) -> EmergenceResult              # TD and accuracy across checkpoints
    tvlens.run_patching(model, prompts, vectors, mode=...) -> PatchingResult  # conditional decoding
    tvlens.activation_patching(model, clean, corrupted, metric, site, by) -> SweepResult
    tvlens.head_attribution(model, prompts, method="cie"|"ablation"|"patch"|"atp"|"dla") -> HeadScores
    tvlens.function_vector(model, prompts, scores, k=10) -> FunctionVectors  # a TaskVectors for run_patching
    family.sample(n, shots, seed, tokenizer=model.tokenizer, scoring=...)  # text: pos, bitwise_text, lexical
    tvlens.text_accuracy(model, prompts, scoring=...) -> AccuracyResult  # first token or greedy whole answer
    tvlens.td_vs_accuracy(model, families, shots=(1, 4, 10)) -> TDAccuracyResult  # per task, fit and R²
    tvlens.finetune(model, family, layers="first_half", steps=...) -> FinetuneResult  # TD/acc before, after
    result.plot() -> plotly Figure; result._repr_html_() in Jupyter  # every result, via tvlens.views
    tvlens.views.attention_heads_view(model, prompts, heads, prompt) / circuit_view(scores, model, prompts)
    tvlens.views.build_report(model, family) -> Report; report.save("r.html")  # `tvlens report`, offline HTML
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tvlens never downloads (see models.py)

from tvlens import tasks, views  # noqa: E402
from tvlens.accuracy import AccuracyResult, icl_accuracy  # noqa: E402
from tvlens.attribution import FunctionVectors, HeadScores, function_vector, head_attribution  # noqa: E402
from tvlens.encoding import (  # noqa: E402
    DecodabilityResult,
    EmergenceResult,
    TaskEncodings,
    TaskVectors,
    emergence,
    extract,
    task_decodability,
)
from tvlens.errors import CheckpointError, ConfigError, OfflineWeightsError, TvlensError, UnknownNameError  # noqa: E402
from tvlens.finetune import FinetuneResult, finetune  # noqa: E402
from tvlens.llm import TDAccuracyResult, greedy_generate, td_vs_accuracy, text_accuracy  # noqa: E402
from tvlens.models import (  # noqa: E402
    build_model,
    checkpoint_steps,
    list_checkpoints,
    load_checkpoint,
    load_model,
    model_info,
    save_checkpoint,
    shipped_models,
)
from tvlens.patching import PatchingResult, run_patching  # noqa: E402
from tvlens.prompts import PromptSet  # noqa: E402
from tvlens.regression import RegressionPatchingResult, regression_patching  # noqa: E402
from tvlens.sweeps import SweepResult, activation_patching  # noqa: E402
from tvlens.train import TrainConfig, read_log, train  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "views",
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
