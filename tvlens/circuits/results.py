"""Results of head and edge attribution: ``HeadScores``, ``EdgeScores`` and ``Faithfulness`` curves."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float

from tvlens.circuits.graph import Graph, _receiver_kind
from tvlens.errors import ConfigError
from tvlens.io import load_tensors_with_sidecar, save_tensors_with_sidecar


@dataclass
class HeadScores:
    """A layer x head score map (larger = more important), per task where the method has one.

    - ``scores[l, h]``: the headline map (mean of ``per_task`` over the non-null tasks);
    - ``per_task[t, l, h]``: the same per task (``None`` when ``per_task=False``);
    - ``per_position[p, l, h]``: by position where the method has one (``"atp"``: the estimate for the
      head's output at position p, linearised at ``hook_z`` whatever ``atp_site``; ``"dla"``: the part of
      the query's output read from source position p), else ``None``; the mean over all prompts;
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
    # per prompt (what the CIs are computed from): every prompt's score ``[n, layer, head]`` and its task ``[n]``
    per_prompt: Float[torch.Tensor, "n layer head"] | None = None
    labels: torch.Tensor | None = None
    # bootstrap CIs over prompts, stratified by task (``with_ci``; filled on first use with the defaults)
    scores_ci: torch.Tensor | None = None  # [2, layer, head]: lo, hi
    per_task_ci: torch.Tensor | None = None  # [2, task, layer, head]
    ci_info: dict = field(default_factory=dict)

    def with_ci(self, ci: float = 0.95, n_boot: int = 1000, seed: int = 0) -> "HeadScores":
        """Fill ``scores_ci`` and ``per_task_ci``: percentile bootstrap over prompts, stratified by task;
        the headline map is resampled as the mean of the resampled per-task maps (``tvlens.stats``).
        Returns ``self``."""
        from tvlens import stats

        ci, n_boot, seed = stats.check_ci_args(ci, n_boot, seed)
        if self.per_prompt is None or self.labels is None:
            raise ConfigError("these HeadScores hold no per-prompt scores: recompute them with "
                              "tvlens.head_attribution to get CIs")
        T = len(self.task_names)
        lab = self.labels.numpy()
        v = self.per_prompt.double().numpy()  # [n, layer, head]
        gm = stats.group_means_boot(np.moveaxis(v, 0, -1), lab, T,
                                    stats.bootstrap_counts(len(lab), n_boot, seed, lab))  # [boot, layer, head, task]
        present = [t for t in range(T) if bool((self.labels == t).any())]
        real = [t for t in present if self.task_names[t] != "null"] or present
        self.scores_ci = torch.tensor(np.stack(stats.percentile_ci(gm[..., real].mean(-1), ci)), dtype=torch.float32)
        self.per_task_ci = torch.tensor(np.stack(stats.percentile_ci(np.moveaxis(gm, -1, 1), ci)), dtype=torch.float32)
        self.ci_info = {"ci": ci, "n_boot": n_boot, "seed": seed}
        return self

    def _ensure_ci(self) -> None:
        if self.scores_ci is None and self.per_prompt is not None and self.labels is not None:
            self.with_ci()

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
        flat = torch.nan_to_num(key.flatten().double(), nan=-float("inf"))  # unscored heads last
        # stable sort on -score keeps index order among ties
        order = torch.sort(-flat, stable=True).indices[:k]
        H = m.shape[1]
        return [(int(i) // H, int(i) % H, float(m.flatten()[i])) for i in order]

    def to_dataframe(self):
        """One row per (task, layer, head); the headline map has task ``"all"``."""
        import pandas as pd

        self._ensure_ci()
        rows = []
        maps = [("all", self.scores, self.scores_ci)]
        if self.per_task is not None:
            maps += [(t, m, None if self.per_task_ci is None else self.per_task_ci[:, i])
                     for i, (t, m) in enumerate(zip(self.task_names, self.per_task))]
        for t, m, c in maps:
            for L in range(m.shape[0]):
                for h in range(m.shape[1]):
                    row = {"task": t, "layer": L, "head": h, "score": float(m[L, h])}
                    if c is not None:
                        row.update(score_lo=float(c[0, L, h]), score_hi=float(c[1, L, h]))
                    rows.append(row)
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        top = ", ".join(f"L{L}H{h} {s:+.3g}" for L, h, s in self.top(min(3, self.scores.numel())))
        return (f"HeadScores({self.method}, metric={self.metric}, {self.n_layers}x{self.n_heads} heads, "
                f"tasks={len(self.task_names)}; top: {top})")

    def _repr_html_(self) -> str:
        import pandas as pd

        from tvlens.plotting import figure_fragment, result_html

        top = pd.DataFrame(self.top(min(10, self.scores.numel())), columns=["layer", "head", "score"])
        return result_html(f"<div><b>Head attribution</b> ({html.escape(self.method)}, metric {html.escape(self.metric)}"
                           f"{', ' + html.escape(self.prompts) if self.prompts else ''})"
                           + top.to_html(index=False, float_format=lambda v: f"{v:.4g}") + "</div>",
                           [figure_fragment(self.plot())])

    def plot(self, per_task: bool = True):
        """A layer x head heatmap; with ``per_task`` one facet per task after the headline map
        (``tvlens.views.head_scores_figure``; ``tvlens.views.circuit_view`` adds each head's attention)."""
        from tvlens.plotting import head_scores_figure

        return head_scores_figure(self, per_task=per_task)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """``path.safetensors`` + ``path.json`` (atomic writes)."""
        tensors = {"scores": self.scores}
        if self.per_task is not None:
            tensors["per_task"] = self.per_task
        if self.per_position is not None:
            tensors["per_position"] = self.per_position
        for name in ("per_prompt", "labels", "scores_ci", "per_task_ci"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        meta = {"kind": "HeadScores", "method": self.method, "metric": self.metric, "task_names": self.task_names,
                "prompts": self.prompts, "notes": self.notes, "ci_info": self.ci_info}
        return save_tensors_with_sidecar(path, tensors, meta, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> "HeadScores":
        t, m = load_tensors_with_sidecar(path, expect_kind="HeadScores")
        return cls(scores=t["scores"], per_task=t.get("per_task"), per_position=t.get("per_position"),
                   method=m["method"], metric=m["metric"], task_names=list(m["task_names"]),
                   prompts=m.get("prompts", ""), notes=dict(m.get("notes", {})), per_prompt=t.get("per_prompt"),
                   labels=t.get("labels"), scores_ci=t.get("scores_ci"), per_task_ci=t.get("per_task_ci"),
                   ci_info=dict(m.get("ci_info", {})))



def _per_task(values: torch.Tensor, labels: torch.Tensor, task_names: list[str]):
    """``values [b, ...]`` -> per-task means ``[T, ...]`` and their mean over non-null tasks present."""
    T = len(task_names)
    out = torch.full((T, *values.shape[1:]), float("nan"))
    present = []
    for t in range(T):
        m = labels == t
        if bool(m.any()):
            out[t] = values[m].mean(0)
            if task_names[t] != "null":
                present.append(t)
    if not present:
        present = [t for t in range(T) if bool((labels == t).any())]
    return out, out[present].mean(0)




# --------------------------------------------------------------------------- EdgeScores
@dataclass
class EdgeScores:
    """One score per edge ``sender -> receiver`` (larger = patching it restores more of the clean metric).

    - ``scores[e]``: mean over prompts; ``edges[e]``: ``(sender, receiver)``;
    - ``per_prompt[n, e]`` where kept, and ``ci[2, e]`` (bootstrap 95% interval over prompts, where computed);
    - ``method`` (``"eap"``, ``"eap-ig"``, ``"path-patch"``), ``metric``, ``n_layers``, ``n_heads``,
      ``prompts`` (a description), ``notes`` (clean/corrupted metric, ig_steps, ...).
    """

    scores: torch.Tensor
    edges: list[tuple[str, str]]
    method: str
    metric: str
    n_layers: int
    n_heads: int
    per_prompt: torch.Tensor | None = None
    ci: torch.Tensor | None = None
    prompts: str = ""
    notes: dict = field(default_factory=dict)
    n_key_value_heads: int | None = None  # grouped-query attention (k/v receivers are key/value heads)

    def __post_init__(self) -> None:
        """Scores, edges and graph agree (checked on every construction, so also on ``load``)."""
        E = len(self.edges)
        if not torch.is_tensor(self.scores) or self.scores.ndim != 1 or len(self.scores) != E:
            got = tuple(self.scores.shape) if torch.is_tensor(self.scores) else type(self.scores).__name__
            raise ConfigError(f"EdgeScores: scores must hold one value per edge ({E} edges), got {got}")
        for name, want in (("per_prompt", (None, E)), ("ci", (2, E))):
            t = getattr(self, name)
            if t is not None and (not torch.is_tensor(t) or t.ndim != 2 or t.shape[1] != E
                                  or (want[0] is not None and t.shape[0] != want[0])):
                raise ConfigError(f"EdgeScores: {name} must be [{'n' if want[0] is None else want[0]}, {E}], got "
                                  f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
        edges = [tuple(e) for e in self.edges]
        if len(set(edges)) != E:
            raise ConfigError("EdgeScores: an edge is listed twice")
        mlps = any(str(s).startswith("MLP") or str(r).startswith("MLP") for s, r in edges)
        kv = None if self.n_key_value_heads is None else int(self.n_key_value_heads)
        graph = Graph(int(self.n_layers), int(self.n_heads), mlps, kv)
        for s, r in edges:
            graph.check_edge(s, r)  # names of a graph of n_layers x n_heads
        self.edges = edges

    def __len__(self) -> int:
        return len(self.edges)

    @property
    def graph(self) -> Graph:
        return Graph(self.n_layers, self.n_heads, any(s.startswith("MLP") for s, _ in self.edges),
                     self.n_key_value_heads)

    def receiver_kinds(self) -> list[str]:
        return [_receiver_kind(r) for _, r in self.edges]

    def score(self, sender: str, receiver: str) -> float:
        try:
            return float(self.scores[self.edges.index((sender, receiver))])
        except ValueError:
            self.graph.check_edge(sender, receiver)
            raise ConfigError(f"edge ({sender!r}, {receiver!r}) was not scored") from None

    def order(self, by_abs: bool = True) -> list[int]:
        """Edge indices best first (ties: graph order)."""
        key = self.scores.abs() if by_abs else self.scores
        key = torch.nan_to_num(key.double(), nan=-float("inf"))
        return torch.sort(-key, stable=True).indices.tolist()

    def top(self, k: int = 10, by_abs: bool = True) -> list[tuple[str, str, float]]:
        """The ``k`` highest-scoring edges as ``(sender, receiver, score)``, by ``|score|`` unless ``by_abs=False``."""
        n = len(self.edges)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ConfigError(f"k must be an integer in 1..{n} (the number of edges in the graph), got {k!r}")
        return [(*self.edges[i], float(self.scores[i])) for i in self.order(by_abs)[:k]]

    def to_dataframe(self):
        import pandas as pd

        df = pd.DataFrame({"sender": [s for s, _ in self.edges], "receiver": [r for _, r in self.edges],
                           "receiver_kind": self.receiver_kinds(), "score": self.scores.double().numpy()})
        if self.ci is not None:
            df["ci_low"] = self.ci[0].double().numpy()
            df["ci_high"] = self.ci[1].double().numpy()
        return df

    def with_ci(self, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> "EdgeScores":
        """Bootstrap (over prompts) interval of every edge's mean score; needs ``per_prompt``."""
        from tvlens.checks import check_probability, check_seed
        from tvlens.stats import check_n_boot

        seed = check_seed(seed, where="EdgeScores.with_ci")
        level = check_probability(level, "level", where="EdgeScores.with_ci", what="a confidence level")
        if self.per_prompt is None:
            raise ConfigError("these scores keep no per-prompt values; compute them with per_prompt=True")
        x = self.per_prompt.double()
        n = x.shape[0]
        n_boot = check_n_boot(n_boot, n=n, cells=x.shape[1] * 2, where="EdgeScores.with_ci")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, n, (n_boot, n), generator=g)
        means = torch.stack([x[i].mean(0) for i in idx])
        a = (1 - level) / 2
        ci = torch.quantile(means, torch.tensor([a, 1 - a], dtype=torch.float64), dim=0).float()
        return replace(self, ci=ci, notes={**self.notes, "ci": f"{level:.0%} bootstrap over {n} prompts, "
                                                               f"{n_boot} resamples, seed {seed}"})

    def __repr__(self) -> str:
        top = ", ".join(f"{s}->{r} {v:+.3g}" for s, r, v in self.top(min(3, len(self.edges))))
        return (f"EdgeScores({self.method}, metric={self.metric}, {len(self.edges)} edges, "
                f"{self.n_layers}x{self.n_heads} heads; top: {top})")

    def _repr_html_(self) -> str:
        from tvlens.plotting import result_html

        df = self.to_dataframe().iloc[self.order()[:10]]
        return result_html(f"<div><b>Edge attribution</b> ({html.escape(self.method)}, metric "
                           f"{html.escape(self.metric)}{', ' + html.escape(self.prompts) if self.prompts else ''})"
                           + df.to_html(index=False, float_format=lambda v: f"{v:.4g}") + "</div>", [self.plot()])

    def plot(self, model=None, prompts=None, prompt: int = 0, k: int = 20, title: str = ""):
        """The interactive circuit graph (``tvlens.views.circuit_graph_view``); with ``model`` and ``prompts``
        a click on a head shows its attention on that prompt."""
        from tvlens.plotting import circuit_graph_view

        return circuit_graph_view(self, model=model, prompts=prompts, prompt=prompt, k=k, title=title)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """safetensors + JSON sidecar, atomically; an existing artifact is refused unless ``overwrite=True``."""
        tensors = {"scores": self.scores.float().contiguous()}
        if self.per_prompt is not None:
            tensors["per_prompt"] = self.per_prompt.float().contiguous()
        if self.ci is not None:
            tensors["ci"] = self.ci.float().contiguous()
        meta = {"kind": "EdgeScores", "method": self.method, "metric": self.metric, "n_layers": self.n_layers,
                "n_heads": self.n_heads, "n_key_value_heads": self.n_key_value_heads,
                "edges": [list(e) for e in self.edges], "prompts": self.prompts, "notes": self.notes}
        return save_tensors_with_sidecar(path, tensors, meta, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> "EdgeScores":
        t, m = load_tensors_with_sidecar(path, expect_kind="EdgeScores")
        return cls(scores=t["scores"], edges=[tuple(e) for e in m["edges"]], method=m["method"], metric=m["metric"],
                   n_layers=int(m["n_layers"]), n_heads=int(m["n_heads"]), per_prompt=t.get("per_prompt"),
                   ci=t.get("ci"), prompts=m.get("prompts", ""), notes=dict(m.get("notes", {})),
                   n_key_value_heads=m.get("n_key_value_heads"))


# --------------------------------------------------------------------------- faithfulness
@dataclass
class Faithfulness:
    """Recovered fraction of the clean - corrupted metric gap by the circuit of the top-k edges (everything
    else patched to ``ablation``), as a curve over ``k``, against random circuits of the same size."""

    ks: list[int]
    recovered: torch.Tensor  # [len(ks)]
    random: torch.Tensor  # [len(ks), n_random]
    n_edges: int
    clean_metric: float
    corrupted_metric: float
    ablation: str
    method: str
    notes: dict = field(default_factory=dict)

    def edges_for(self, fraction: float = 0.8) -> int | None:
        """The smallest ``k`` on the curve whose circuit recovers at least ``fraction`` (None if none does)."""
        for k, v in zip(self.ks, self.recovered.tolist()):
            if v >= fraction:
                return k
        return None

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"k": self.ks, "recovered": self.recovered.numpy(),
                             "random_mean": self.random.mean(1).numpy(),
                             "random_q95": self.random.quantile(0.95, dim=1).numpy() if self.random.shape[1] else math.nan})

    def __repr__(self) -> str:
        k80 = self.edges_for(0.8)
        warn = f"; WARNING: {self.notes['gap_warning']}" if self.notes.get("gap_warning") else ""
        return (f"Faithfulness({self.method}, {self.ablation}-ablated, {self.n_edges} edges; 80% recovered at "
                f"k={k80}; clean {self.clean_metric:.4g}, corrupted {self.corrupted_metric:.4g}{warn})")

    def _repr_html_(self) -> str:
        from tvlens.plotting import figure_fragment, result_html

        return result_html(f"<div><b>Faithfulness</b> <code>{html.escape(repr(self))}</code>"
                           + self.to_dataframe().to_html(index=False, float_format=lambda v: f"{v:.3f}") + "</div>",
                           [figure_fragment(self.plot())])

    def plot(self):
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_scatter(x=self.ks, y=self.recovered.tolist(), mode="lines+markers", name=f"top-k ({self.method})")
        if self.random.shape[1]:
            fig.add_scatter(x=self.ks, y=self.random.mean(1).tolist(), mode="lines", name="random circuits (mean)")
            fig.add_scatter(x=self.ks, y=self.random.quantile(0.95, dim=1).tolist(), mode="lines",
                            line=dict(dash="dot"), name="random circuits (95th percentile)")
        fig.add_hline(y=0.8, line=dict(dash="dash", color="grey"))
        fig.update_layout(title=f"Faithfulness: fraction of the clean-corrupted gap recovered ({self.ablation} "
                                f"ablation outside the circuit)", xaxis_title="edges in the circuit (k)",
                          xaxis_type="log", yaxis_title="recovered")
        return fig
