"""Fig. 7 of Han et al. (2025) for sparse regression: does basis A's task vector make the model
regress as if on basis A?

``regression_patching(model, prompts, vectors, layers, mode)`` patches each source basis a's vector
into every prompt (of basis b) at its query position, as ``run_patching`` does, and scores the
patched prediction against each basis's *restricted least-squares solution* on that prompt's own
examples (``tvlens.tasks.sparse_regression.basis_fits``): the prediction a model that believed the
prompt's basis were a would make. For each layer and (a, b):

- ``mse_to_source[l, a, b]``: mean squared distance of the patched prediction to a's solution;
- ``mse_to_own[l, a, b]``: ... to b's own solution; ``mse_answer[l, a, b]``: to the true answer;
- ``base_to_source[a, b]``, ``base_to_own[b]``, ``base_answer[b]``: the same for the unpatched model;
- ``toward_source[l, a, b] = (base_to_source - mse_to_source) / (base_to_source - base_to_own)``:
  the fraction of the gap between "as far from a's solution as the unpatched model" (0) and "as
  close to a's solution as the unpatched model is to its own" (1) that the patch closes;
- ``zero_floor[a, b]``: the ``toward_source`` a patch gets by collapsing every prediction to 0 (a
  patch that destroys the computation also moves predictions "toward" a's solution: read
  ``toward_source`` against this floor and against ``control``);
- ``control[l]``: for a == b (own basis's vector), ``mse_answer / base_answer - 1``, the relative
  change of the query MSE that patching a prompt's own basis vector causes (0 = harmless).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from jaxtyping import Float

from tvlens.accuracy import check_prompts_fit, logits_at_answers
from tvlens.backends import get_backend
from tvlens.encoding import TaskVectors, resid_hook_name
from tvlens.errors import ConfigError
from tvlens.patching import _patch, _patch_layers, _prefix
from tvlens.prompts import PromptSet
from tvlens.tasks.sparse_regression import basis_fits


@dataclass
class RegressionPatchingResult:
    """Per layer, a source-basis x target-basis grid of where patched predictions land."""

    layers: list[int]
    task_names: list[str]
    mode: str
    scale: float
    mse_to_source: Float[torch.Tensor, "layer source target"]
    mse_to_own: Float[torch.Tensor, "layer source target"]
    mse_answer: Float[torch.Tensor, "layer source target"]
    base_to_source: Float[torch.Tensor, "source target"]
    base_to_own: Float[torch.Tensor, "target"]
    base_answer: Float[torch.Tensor, "target"]
    counts: torch.Tensor
    zero_to_source: torch.Tensor | None = None  # [source, target]: mean squared size of a's solution
    shots: int = 0
    notes: dict = field(default_factory=dict)

    @property
    def toward_source(self) -> Float[torch.Tensor, "layer source target"]:
        """``[layer, a, b]``; NaN on the diagonal (a == b: no gap to close)."""
        gap = self.base_to_source - self.base_to_own[None, :]
        out = (self.base_to_source[None] - self.mse_to_source) / gap[None]
        eye = torch.eye(len(self.task_names), dtype=torch.bool)
        return out.masked_fill(eye[None], float("nan"))

    @property
    def zero_floor(self) -> Float[torch.Tensor, "source target"]:
        """``toward_source`` of the constant prediction 0; NaN on the diagonal."""
        if self.zero_to_source is None:
            return torch.full_like(self.base_to_source, float("nan"))
        gap = self.base_to_source - self.base_to_own[None, :]
        out = (self.base_to_source - self.zero_to_source) / gap
        return out.masked_fill(torch.eye(len(self.task_names), dtype=torch.bool), float("nan"))

    def _offdiag_mean(self, grid: torch.Tensor) -> torch.Tensor:
        T = len(self.task_names)
        off = ~torch.eye(T, dtype=torch.bool)
        return grid[:, off].nanmean(1)

    @property
    def cross_toward_source(self) -> Float[torch.Tensor, "layer"]:
        """Per layer: mean ``toward_source`` over a != b."""
        return self._offdiag_mean(self.toward_source)

    @property
    def control(self) -> Float[torch.Tensor, "layer"]:
        """Per layer: mean over bases of ``mse_answer[a, a] / base_answer[a] - 1`` (own-basis vector)."""
        d = torch.diagonal(self.mse_answer, dim1=1, dim2=2)  # [layer, task]
        return (d / self.base_answer[None] - 1).nanmean(1)

    def best_layer(self, max_control: float = 0.1) -> int:
        """The layer that moves predictions furthest toward the source basis among those whose
        own-basis control stays within ``max_control`` (relative MSE change); else the smallest control."""
        ok = self.control.abs() <= max_control
        if not bool(ok.any()):
            return self.layers[int(torch.argmin(self.control.abs()))]
        score = torch.where(ok, self.cross_toward_source, torch.full_like(self.cross_toward_source, -math.inf))
        return self.layers[int(torch.argmax(score))]

    def layer_profile(self):
        import pandas as pd

        return pd.DataFrame({
            "layer": self.layers,
            "toward_source": self.cross_toward_source.tolist(),
            "own_basis_control": self.control.tolist(),
            "zero_floor": [float(self._offdiag_mean(self.zero_floor[None])[0])] * len(self.layers),
            "cross_mse_to_source": self._offdiag_mean(self.mse_to_source).tolist(),
            "unpatched_cross_mse_to_source": [float(self.base_to_source[~torch.eye(len(self.task_names),
                                                                                   dtype=torch.bool)].mean())]
            * len(self.layers),
        })

    def to_dataframe(self):
        import pandas as pd

        rows = []
        for li, L in enumerate(self.layers):
            for i, a in enumerate(self.task_names):
                for j, b in enumerate(self.task_names):
                    rows.append({"layer": L, "source": a, "target": b, "n": int(self.counts[j]),
                                 "mse_to_source": float(self.mse_to_source[li, i, j]),
                                 "mse_to_own": float(self.mse_to_own[li, i, j]),
                                 "mse_answer": float(self.mse_answer[li, i, j]),
                                 "unpatched_mse_to_source": float(self.base_to_source[i, j]),
                                 "toward_source": float(self.toward_source[li, i, j])})
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        b = self.best_layer()
        li = self.layers.index(b)
        return (f"RegressionPatchingResult({self.mode}, scale {self.scale}, layers {self.layers}; best layer {b}: "
                f"toward source {float(self.cross_toward_source[li]):.3f}, own-basis control "
                f"{float(self.control[li]):+.3f})")

    def _repr_html_(self) -> str:
        from tvlens.plotting import figure_fragment, result_html

        return result_html(f"<div><b>Regression task-vector patching</b>: {html.escape(repr(self))}"
                           + self.layer_profile().to_html(index=False, float_format=lambda v: f"{v:.3f}") + "</div>",
                           [figure_fragment(self.plot())])

    def plot(self):
        """Per layer: the cross-basis fraction moved toward the source basis, and the own-basis control."""
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_scatter(x=self.layers, y=self.cross_toward_source.tolist(), mode="lines+markers",
                        name="toward source basis (a != b)")
        fig.add_scatter(x=self.layers, y=self.control.tolist(), mode="lines+markers",
                        name="own-basis control (relative MSE change)")
        fig.update_layout(title=f"Regression task-vector patching ({self.mode}, {self.shots}-shot)",
                          xaxis_title="layer", yaxis_title="fraction")
        return fig


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ConfigError(f"regression_patching: scale must be a finite number (e.g. 1.0), got {scale!r}")
    return float(scale)


@torch.no_grad()
def regression_patching(
    model,
    prompts: PromptSet,
    vectors: TaskVectors,
    layers: Sequence[int] | int | None = None,
    mode: str = "replace",
    scale: float = 1.0,
    batch_size: int | None = 512,
) -> RegressionPatchingResult:
    """Patch each basis's vector into every ``sparse_regression`` prompt at its query position and
    measure how far the prediction moves toward the source basis's restricted least-squares solution.

    ``vectors``: task vectors (``extract(model, other_prompts).task_vectors()``), best extracted from
    prompts other than ``prompts``. ``mode``: ``"replace"``, ``"add"`` or ``"swap"``, as in
    ``run_patching``.
    """
    pred_fits, layers, scale = _check_regression_args(model, prompts, vectors, layers, mode, scale, batch_size)
    names = list(prompts.task_names)
    device = get_backend(model).input_device
    T, L = len(names), len(layers)
    labels = prompts.labels.cpu()
    counts = torch.bincount(labels, minlength=T).double()
    sums = {"to_src": torch.zeros(L, T, T), "to_own": torch.zeros(L, T, T), "to_ans": torch.zeros(L, T, T),
            "b_src": torch.zeros(T, T), "b_own": torch.zeros(T), "b_ans": torch.zeros(T), "z_src": torch.zeros(T, T)}
    sums = {k: v.double() for k, v in sums.items()}
    vecs = torch.stack([torch.stack([vectors.get(t, layer) for t in names]) for layer in layers]).to(device)  # [L, T, d]
    hooks = sorted({resid_hook_name(layer) for layer in layers})
    bs = batch_size or len(prompts)
    was_training = model.training
    model.eval()
    for b0 in range(0, len(prompts), bs):
        sub = prompts.subset(slice(b0, b0 + bs)).to(device)
        _add_batch(model, sub, labels[b0 : b0 + bs], pred_fits[b0 : b0 + bs], layers, vecs, hooks, mode, scale, sums)
    if was_training:
        model.train()
    cnt = counts.clamp_min(1)
    nan_absent = torch.where(counts > 0, torch.ones_like(counts), torch.full_like(counts, float("nan")))
    mean = {k: v / cnt * nan_absent for k, v in sums.items()}
    return RegressionPatchingResult(
        layers=layers, task_names=names, mode=mode, scale=scale,
        mse_to_source=mean["to_src"], mse_to_own=mean["to_own"], mse_answer=mean["to_ans"],
        base_to_source=mean["b_src"], base_to_own=mean["b_own"], base_answer=mean["b_ans"],
        counts=counts.long(), zero_to_source=mean["z_src"], shots=prompts.shots, notes=_notes_of(prompts, names, counts),
    )


def _check_regression_args(model, prompts, vectors, layers, mode, scale, batch_size):
    """Refuse what ``regression_patching`` cannot run; each prompt's restricted fit per basis, the layers, the scale."""
    if not isinstance(prompts, PromptSet):
        raise ConfigError(f"regression_patching: prompts must be a PromptSet, got {type(prompts).__name__}")
    if not isinstance(vectors, TaskVectors):
        raise ConfigError(f"regression_patching: vectors must be TaskVectors (extract(...).task_vectors()), got "
                          f"{type(vectors).__name__}")
    check_prompts_fit(model, prompts)
    pred_fits, _ = basis_fits(prompts)  # refuses non-sparse_regression prompts
    vectors.check_model(model)
    if getattr(vectors, "read_at", "query") != "query":
        raise ConfigError("regression_patching patches at the query position: extract the vectors with at='query'")
    if mode not in ("replace", "add", "swap"):
        raise ConfigError(f"regression_patching: mode must be 'replace', 'add' or 'swap', got {mode!r}")
    scale = _check_scale(scale)
    layers = _patch_layers(model, vectors, layers, "regression_patching")
    names = list(prompts.task_names)
    lacking = [t for t in names if t not in vectors.task_names]
    if lacking:
        raise ConfigError(f"regression_patching: the vectors lack bases {lacking} of these prompts ({names})")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"regression_patching: batch_size must be None or an integer >= 1, got {batch_size!r}")
    return pred_fits, layers, scale


def _add_batch(model, sub, lab, fits, layers, vecs, hooks, mode, scale, sums) -> None:
    """Add one batch's squared distances (unpatched, and patched with every basis's vector at every layer)
    to ``sums``, per target basis."""
    device = vecs.device
    T = fits.shape[1]
    own_fit = fits[torch.arange(len(lab)), lab]  # fits: [b, T] float64
    ans = sub.answers[:, 0].double().cpu()
    q = sub.query_pos
    out, store = _prefix(model, sub.inputs[:, : int(q.max()) + 1], hooks)
    base = out[torch.arange(len(sub), device=device), q, 0].double().cpu()
    sums["b_own"].index_add_(0, lab, (base - own_fit) ** 2)
    sums["b_ans"].index_add_(0, lab, (base - ans) ** 2)
    for a in range(T):
        sums["b_src"][a].index_add_(0, lab, (base - fits[:, a]) ** 2)
        sums["z_src"][a].index_add_(0, lab, fits[:, a] ** 2)
    for li, layer in enumerate(layers):
        own = vecs[li][sub.labels] if mode == "swap" else None
        for a in range(T):
            resid = _patch(store[resid_hook_name(layer)], q, vecs[li, a], mode, scale, own)
            pred = logits_at_answers(model, resid, q, 1, start_at_layer=layer)[:, 0, 0].double().cpu()
            sums["to_src"][li, a].index_add_(0, lab, (pred - fits[:, a]) ** 2)
            sums["to_own"][li, a].index_add_(0, lab, (pred - own_fit) ** 2)
            sums["to_ans"][li, a].index_add_(0, lab, (pred - ans) ** 2)


def _notes_of(prompts, names: list[str], counts: torch.Tensor) -> dict:
    notes = {}
    if bool((counts == 0).any()):
        notes["absent_bases"] = [t for t, c in zip(names, counts.tolist()) if c == 0]
    if prompts.shots <= int(prompts.params.get("r", 0)):
        notes["underdetermined"] = (f"{prompts.shots} examples <= rank {prompts.params.get('r')}: every basis's "
                                    "restricted fit is the minimum-norm solution and fits the examples exactly")
    return notes


__all__ = ["RegressionPatchingResult", "regression_patching"]
