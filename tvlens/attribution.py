"""Attention-head attribution: which heads write the task and which read it.

``head_attribution(model, prompts, method)`` scores every head (layer x head), per task:

- ``"cie"``: the causal indirect effect of Todd et al. (Function Vectors, 2024). Each prompt's
  in-context labels are shuffled among its examples (the corrupted prompt); one head's output
  (``hook_z``) at the query position is replaced by its mean over the clean prompts of the same task;
  the score is the gain of the correct answer's probability, averaged over prompts. Batched over
  heads through the patching engine (``tvlens.sweeps.activation_patching``).
- ``"ablation"``: zero- or mean-ablate each head (all positions, or the query only) in the clean
  prompts; the score is the metric's *drop* (positive = the head helps), per task.
- ``"patch"``: the exact clean -> corrupted sweep of each head's output at every position (the
  number AtP estimates).
- ``"atp"``: attribution patching (Nanda 2023; Kramar et al. 2024): ``(clean - corrupted) x
  gradient`` for every head from one clean forward, one corrupted forward and one backward. With
  ``atp_site="qkv"`` a head's effect is split into its values, queries and keys; ``qk_fix=True`` (the
  AtP* fix) recomputes the attention softmax exactly with the clean queries (or keys) and linearises
  only after it, instead of through it. ``atp_site="z"`` linearises at the head's output, which holds
  no softmax of its own.
- ``"dla"``: direct logit attribution of each head's output at the query position to the answer's
  logit, through the final layer norm's scale (as TransformerLens' ``apply_ln_to_stack``), from
  ``hook_z`` at the query position only (no per-head results at every position).

Every score map is ``[n_layers, n_heads]``, larger = more important; ``per_task`` is
``[n_tasks, n_layers, n_heads]`` and the headline ``scores`` is its mean over the real (non-null)
tasks, as Todd et al. average the indirect effect over tasks.

``function_vector(model, prompts, scores, k)`` sums the top-k heads' mean outputs at the query
(projected by ``W_O``: their contribution to the residual stream), per task, as a ``TaskVectors``
that ``run_patching(..., mode="add")`` takes.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float

from tvlens.errors import ConfigError
from tvlens.io import load_tensors_with_sidecar, save_tensors_with_sidecar

METHODS = ("cie", "ablation", "patch", "atp", "dla")


@dataclass
class HeadScores:
    """A layer x head score map (larger = more important), per task where the method has one.

    - ``scores[l, h]``: the headline map (mean of ``per_task`` over the non-null tasks);
    - ``per_task[t, l, h]``: the same per task (``None`` when ``per_task=False``);
    - ``per_position[p, l, h]``: by position where the method has one (``"atp"``: the output at
      position p; ``"dla"``: the part of the query's output read from source position p), else ``None``;
    - ``method``, ``metric``, ``task_names``, ``prompts`` (a short description), ``notes`` (details:
      the unpatched metric, the ablation kind, ...).
    """

    scores: Float[torch.Tensor, "layer head"]
    method: str
    metric: str
    task_names: list[str]
    per_task: Float[torch.Tensor, "task layer head"] | None = None
    per_position: Float[torch.Tensor, "pos layer head"] | None = None
    prompts: str = ""
    notes: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.scores.shape[1])

    def task(self, task: str | int) -> Float[torch.Tensor, "layer head"]:
        """The score map of one task."""
        if self.per_task is None:
            raise ConfigError("these scores hold no per-task maps; run head_attribution(..., per_task=True)")
        if isinstance(task, str):
            if task not in self.task_names:
                raise ConfigError(f"unknown task {task!r}; these scores hold {self.task_names}")
            task = self.task_names.index(task)
        return self.per_task[int(task)]

    def top(self, k: int = 10, task: str | int | None = None, by_abs: bool = False) -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring heads as ``(layer, head, score)``, best first (ties: lower
        layer, then lower head). ``by_abs`` ranks by ``|score|``; ``task`` ranks one task's map."""
        m = self.scores if task is None else self.task(task)
        n = m.numel()
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ConfigError(f"k must be an integer in 1..{n} (the number of heads), got {k!r}")
        key = m.abs() if by_abs else m
        flat = key.flatten().double()
        # stable sort on -score keeps index order among ties
        order = torch.sort(-flat, stable=True).indices[:k]
        H = m.shape[1]
        return [(int(i) // H, int(i) % H, float(m.flatten()[i])) for i in order]

    def to_dataframe(self):
        """One row per (task, layer, head); the headline map has task ``"all"``."""
        import pandas as pd

        rows = []
        maps = [("all", self.scores)]
        if self.per_task is not None:
            maps += list(zip(self.task_names, self.per_task))
        for t, m in maps:
            for L in range(m.shape[0]):
                for h in range(m.shape[1]):
                    rows.append({"task": t, "layer": L, "head": h, "score": float(m[L, h])})
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        top = ", ".join(f"L{L}H{h} {s:+.3g}" for L, h, s in self.top(min(3, self.scores.numel())))
        return (f"HeadScores({self.method}, metric={self.metric}, {self.n_layers}x{self.n_heads} heads, "
                f"tasks={len(self.task_names)}; top: {top})")

    def _repr_html_(self) -> str:
        import pandas as pd

        top = pd.DataFrame(self.top(min(10, self.scores.numel())), columns=["layer", "head", "score"])
        return (f"<div><b>Head attribution</b> ({html.escape(self.method)}, metric {html.escape(self.metric)}"
                f"{', ' + html.escape(self.prompts) if self.prompts else ''})"
                + top.to_html(index=False, float_format=lambda v: f"{v:.4g}") + "</div>")

    def plot(self, per_task: bool = True):
        """A layer x head heatmap; with ``per_task`` one facet per task after the headline map."""
        from plotly.subplots import make_subplots

        maps = [("all tasks" if self.per_task is not None else "score", self.scores)]
        if per_task and self.per_task is not None:
            maps += list(zip(self.task_names, self.per_task))
        cols = min(4, len(maps))
        rows = (len(maps) + cols - 1) // cols
        fig = make_subplots(rows=rows, cols=cols, subplot_titles=[t for t, _ in maps])
        lim = max(float(torch.stack([m for _, m in maps]).abs().max()), 1e-12)
        for i, (t, m) in enumerate(maps):
            fig.add_heatmap(z=m.numpy(), x=list(range(m.shape[1])), y=list(range(m.shape[0])), colorscale="RdBu",
                            zmin=-lim, zmax=lim, showscale=i == 0, name=str(t), row=i // cols + 1, col=i % cols + 1,
                            hovertemplate="layer %{y} head %{x}: %{z:.4g}<extra>" + html.escape(str(t)) + "</extra>")
        fig.update_xaxes(title_text="head")
        fig.update_yaxes(title_text="layer", autorange="reversed")
        fig.update_layout(title=f"Head attribution: {self.method} ({self.metric})", height=260 * rows + 80)
        return fig

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """``path.safetensors`` + ``path.json`` (atomic writes)."""
        tensors = {"scores": self.scores}
        if self.per_task is not None:
            tensors["per_task"] = self.per_task
        if self.per_position is not None:
            tensors["per_position"] = self.per_position
        meta = {"kind": "HeadScores", "method": self.method, "metric": self.metric, "task_names": self.task_names,
                "prompts": self.prompts, "notes": self.notes}
        return save_tensors_with_sidecar(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> "HeadScores":
        t, m = load_tensors_with_sidecar(path, expect_kind="HeadScores")
        return cls(scores=t["scores"], per_task=t.get("per_task"), per_position=t.get("per_position"),
                   method=m["method"], metric=m["metric"], task_names=list(m["task_names"]),
                   prompts=m.get("prompts", ""), notes=dict(m.get("notes", {})))
