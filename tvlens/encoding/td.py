"""Task decodability (TD): leave-one-out kNN of the prompts' latent task, per layer, with CIs and a null."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int

from tvlens.encoding.extraction import TaskEncodings, extract
from tvlens.errors import ConfigError
from tvlens.io import load_tensors_with_sidecar, save_tensors_with_sidecar
from tvlens.prompts import PromptSet
from tvlens.stats import knn_vote
from tvlens.validate import _given, _where, check_finite


def check_encodings(enc, where: str = "") -> None:
    """TaskEncodings with finite activations and labels that index their task names."""
    acts = getattr(enc, "acts", None)
    if not torch.is_tensor(acts) or not acts.is_floating_point() or acts.ndim != 3:
        raise ConfigError(f"{_where(where)}encodings.acts must be a float tensor [n, layer, d_model], got {_given(acts)}")
    if len(enc.layers) != acts.shape[1]:
        raise ConfigError(f"{_where(where)}encodings hold {acts.shape[1]} layers of activations but list "
                          f"{len(enc.layers)} layers ({enc.layers})")
    lab = enc.labels
    if lab.shape != (acts.shape[0],):
        raise ConfigError(f"{_where(where)}encodings.labels must have one label per prompt ({acts.shape[0]}), "
                          f"got {_given(lab)}")
    if lab.is_floating_point() or (len(lab) and (int(lab.min()) < 0 or int(lab.max()) >= len(enc.task_names))):
        raise ConfigError(f"{_where(where)}encodings.labels must be integer indices into task_names "
                          f"(0..{len(enc.task_names) - 1}), got {_given(lab)}")
    check_finite(acts, "encodings.acts", where, " (the representations)")



# --------------------------------------------------------------------------- decodability
def knn_loo_neighbors(
    X: Float[torch.Tensor, "n d"],
    k: int = 10,
    metric: str = "euclidean",
    chunk: int = 2048,
    return_ties: bool = False,
    seed: int | None = None,
):
    """Each point's ``k`` nearest *other* points (leave-one-out), nearest first; neighbours at equal
    distance are taken in index order, or, with ``seed``, in a seeded random order (so which of several
    equally distant prompts join a neighbourhood does not depend on the prompts' order). The labels play no
    part, so one call serves every relabelling (the shuffled-label null, ``tvlens.stats.knn_permutation_null``).
    With ``return_ties`` also a ``[n]`` bool: the k-th and (k+1)-th neighbours are at the same distance (so
    the tie rule, not distance, chose the neighbourhood)."""
    n = X.shape[0]
    if k >= n:
        raise ConfigError(f"k={k} needs more than k prompts, got {n}")
    X = X.double()
    if metric == "cosine":
        X = X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)
    elif metric != "euclidean":
        raise ConfigError(f"unknown metric {metric!r}; use 'euclidean' or 'cosine'")
    out = torch.empty(n, k, dtype=torch.long)
    ties = torch.zeros(n, dtype=torch.bool)
    sq = (X * X).sum(1)
    for s in range(0, n, chunk):
        xb = X[s : s + chunk]
        if metric == "cosine":
            d = 1 - xb @ X.T
        else:
            d = (sq[s : s + chunk, None] + sq[None] - 2 * xb @ X.T).clamp_min(0)
        rows = torch.arange(len(xb))
        d[rows, rows + s] = float("inf")  # leave one out
        if seed is None:
            srt = torch.sort(d, dim=1, stable=True)
            idx = srt.indices
        else:  # a random order first, then a stable sort by distance: ties end up in random order
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + s)
            perm = torch.argsort(torch.rand(d.shape, generator=g, dtype=torch.float64), dim=1)
            srt = torch.sort(d.gather(1, perm), dim=1, stable=True)
            idx = perm.gather(1, srt.indices)
        out[s : s + len(xb)] = idx[:, :k]
        if k + 1 < n:
            ties[s : s + len(xb)] = srt.values[:, k - 1] == srt.values[:, k]
    return (out, ties) if return_ties else out


def knn_loo_predict(
    X: Float[torch.Tensor, "n d"],
    y: Int[torch.Tensor, "n"],
    k: int = 10,
    metric: str = "euclidean",
    tie_break: str = "lowest",
    seed: int = 0,
    chunk: int = 2048,
) -> Int[torch.Tensor, "n"]:
    """Leave-one-out kNN predictions: each point is classified by its k nearest *other* points.

    Neighbours at equal distance are taken in index order. Vote ties go to the lowest class index
    (``"lowest"``, the default: scikit-learn's ``KNeighborsClassifier``, whose vote is a mode with ties
    to the smallest label, so this equals ``cross_val_predict(KNeighborsClassifier(k), X, y,
    cv=LeaveOneOut())``), to the tied class with the nearest neighbour (``"nearest"``), or to a seeded
    random tied class (``"random"``).
    """
    from tvlens.stats import TIE_BREAKS

    if tie_break not in TIE_BREAKS:
        raise ConfigError(f"unknown tie_break {tie_break!r}; use 'lowest', 'nearest' or 'random'")
    nn_idx = knn_loo_neighbors(X, k, metric, chunk)
    n_cls = int(y.max()) + 1
    return torch.from_numpy(knn_vote(y.cpu()[nn_idx].numpy(), n_cls, tie_break, seed)).long()


@dataclass
class DecodabilityResult:
    """Task decodability per layer (and per task), with the task-by-task confusion."""

    layers: list[int]
    task_names: list[str]
    td: Float[torch.Tensor, "layer"]
    per_task: Float[torch.Tensor, "layer task"]
    confusion: Float[torch.Tensor, "layer task task"]  # row: true task, column: decoded task (fractions)
    k: int = 10
    metric: str = "euclidean"
    n_prompts: int = 0
    notes: dict[str, Any] = field(default_factory=dict)
    # per prompt (what the CIs and the null are computed from; ``tvlens.stats``)
    correct: torch.Tensor | None = None  # [layer, n] bool: the prompt's task was decoded (leave-one-out)
    labels: torch.Tensor | None = None  # [n] the prompts' tasks
    neighbors: torch.Tensor | None = None  # [layer, n, k] each prompt's k nearest other prompts
    tie_break: str = "lowest"
    # bootstrap CIs over prompts (stratified by task; ``with_ci``) and the shuffled-label null (``with_null``)
    td_ci: torch.Tensor | None = None  # [2, layer]: lo, hi
    per_task_ci: torch.Tensor | None = None  # [2, layer, task]
    null_mean: torch.Tensor | None = None  # [layer] mean TD with permuted task labels
    null_quantile: torch.Tensor | None = None  # [layer] its ``null_q`` quantile
    p_value: torch.Tensor | None = None  # [layer] (1 + #{null >= TD}) / (1 + n_perm)
    ci_info: dict[str, Any] = field(default_factory=dict)  # ci, n_boot, seed; n_perm, q, null_seed

    def with_ci(self, ci: float = 0.95, n_boot: int = 1000, seed: int = 0) -> "DecodabilityResult":
        """Fill ``td_ci`` and ``per_task_ci``: percentile bootstrap over prompts, stratified by task,
        resampling each prompt's leave-one-out verdict (the neighbours stay fixed; ``tvlens.stats``).
        Returns ``self``."""
        from tvlens import stats

        ci, n_boot, seed = stats.check_ci_args(ci, n_boot, seed)
        if self.correct is None or self.labels is None:
            raise ConfigError("this DecodabilityResult holds no per-prompt verdicts (correct, labels): recompute it "
                              "with tvlens.task_decodability to get CIs")
        T = len(self.task_names)
        ok, lab = self.correct.double().numpy(), self.labels.numpy()
        W = stats.bootstrap_counts(ok.shape[-1], n_boot, seed, lab)
        gm = stats.group_means_boot(ok, lab, T, W)  # [boot, layer, task]
        counts = np.bincount(lab, minlength=T)
        overall = (np.nan_to_num(gm) * counts).sum(-1) / counts.sum()
        self.td_ci = torch.tensor(np.stack(stats.percentile_ci(overall, ci)), dtype=torch.float32)
        self.per_task_ci = torch.tensor(np.stack(stats.percentile_ci(gm, ci)), dtype=torch.float32)
        self.ci_info.update(ci=ci, n_boot=n_boot, seed=seed)
        return self

    def with_null(self, n_perm: int = 1000, q: float = 0.95, seed: int = 0) -> "DecodabilityResult":
        """Fill the shuffled-label null: TD per layer when the task labels are permuted over prompts
        (votes recomputed from the stored neighbours), its mean, ``q`` quantile and the p-value of the
        observed TD. Returns ``self``."""
        from tvlens import stats

        if self.neighbors is None or self.labels is None:
            raise ConfigError("this DecodabilityResult holds no neighbours: recompute it with tvlens.task_decodability "
                              "to get the shuffled-label null")
        nr = stats.knn_permutation_null(self.neighbors.numpy(), self.labels.numpy(), len(self.task_names),
                                        self.td.double().numpy(), n_perm=n_perm, q=q, seed=seed,
                                        tie_break=self.tie_break)
        self.null_mean = torch.tensor(nr.mean, dtype=torch.float32)
        self.null_quantile = torch.tensor(nr.quantile, dtype=torch.float32)
        p = nr.p_value.copy()
        # where a random draw among equidistant prompts, not distance, picked most neighbourhoods (e.g. every
        # prompt at the same point), TD and its null measure that draw: no p-value
        ties = self.notes.get("boundary_ties", {})
        degenerate = [i for i, L in enumerate(self.layers) if ties.get(L, ties.get(str(L), 0.0)) > 0.5]
        p[degenerate] = np.nan
        if degenerate:
            self.notes["no_p_value"] = (f"layers {[self.layers[i] for i in degenerate]}: for most prompts the k-th "
                                        "and (k+1)-th neighbours are equidistant (e.g. identical representations), "
                                        "so the tie rule (a seeded random draw among them), not distance, chose the "
                                        "neighbours; p-value left NaN")
        self.p_value = torch.tensor(p, dtype=torch.float32)
        self.ci_info.update(n_perm=nr.n_perm, q=nr.q, null_seed=nr.seed)
        return self

    @property
    def best_layer(self) -> int:
        return self.layers[int(torch.argmax(self.td))]

    @property
    def best_td(self) -> float:
        return float(self.td.max())

    @property
    def chance(self) -> float:
        """1 / the number of tasks with prompts (prompts of a subset of a family's tasks: that subset)."""
        present = len(torch.unique(self.labels)) if self.labels is not None and len(self.labels) else 0
        return 1.0 / (present or len(self.task_names))

    def at(self, layer: int) -> float:
        return float(self.td[self.layers.index(layer)])

    def to_dataframe(self):
        import pandas as pd

        rows = []
        for i, layer in enumerate(self.layers):
            row = {"layer": layer, "td": float(self.td[i])}
            if self.td_ci is not None:
                row.update(td_lo=float(self.td_ci[0, i]), td_hi=float(self.td_ci[1, i]))
            if self.null_mean is not None:
                q = self.ci_info.get("q", 0.95)
                row.update({"null_mean": float(self.null_mean[i]), f"null_q{round(100 * q)}": float(self.null_quantile[i]),
                            "p_value": float(self.p_value[i])})
            for j, t in enumerate(self.task_names):
                row[f"td[{t}]"] = float(self.per_task[i, j])
                if self.per_task_ci is not None:
                    row[f"td[{t}]_lo"] = float(self.per_task_ci[0, i, j])
                    row[f"td[{t}]_hi"] = float(self.per_task_ci[1, i, j])
            rows.append(row)
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        tds = ", ".join(f"{L}: {float(v):.3f}" for L, v in zip(self.layers, self.td))
        b = self.layers.index(self.best_layer)
        ci = "" if self.td_ci is None else (f" [{float(self.td_ci[0, b]):.3f}, {float(self.td_ci[1, b]):.3f}] "
                                            f"({round(100 * self.ci_info.get('ci', 0.95))}% CI)")
        null = "" if self.null_mean is None else (f", shuffled-label null {float(self.null_mean[b]):.3f} "
                                                  f"(p {float(self.p_value[b]):.3g})")
        return (f"DecodabilityResult(k={self.k}, {self.metric}, n={self.n_prompts}, best layer {self.best_layer} "
                f"TD {self.best_td:.3f}{ci}, chance {self.chance:.3f}{null}; by layer {{{tds}}})")

    def _repr_html_(self) -> str:
        from tvlens.plotting import figure_fragment, result_html, td_heatmap_figure

        return result_html(f"<div><b>Task decodability</b> (leave-one-out {self.k}-NN, {html.escape(self.metric)}, "
                           f"{self.n_prompts} prompts; chance {self.chance:.3f}; best layer {self.best_layer}: "
                           f"{self.best_td:.3f})" + self.to_dataframe().to_html(index=False, float_format=lambda v: f"{v:.3f}")
                           + "</div>", [figure_fragment(self.plot()), figure_fragment(td_heatmap_figure(self))])

    def plot(self):
        """TD by layer (all tasks, and each task thinner): ``tvlens.views.td_by_layer_figure``."""
        from tvlens.plotting import td_by_layer_figure

        return td_by_layer_figure(self)

    _OPTIONAL = ("correct", "labels", "neighbors", "td_ci", "per_task_ci", "null_mean", "null_quantile", "p_value")

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        meta = {"kind": "DecodabilityResult", "layers": self.layers, "task_names": self.task_names, "k": self.k,
                "metric": self.metric, "n_prompts": self.n_prompts, "tie_break": self.tie_break,
                "ci_info": self.ci_info, "notes": self.notes}
        tensors = {"td": self.td, "per_task": self.per_task, "confusion": self.confusion}
        for name in self._OPTIONAL:
            v = getattr(self, name)
            if v is not None:
                tensors[name] = v.to(torch.uint8) if v.dtype == torch.bool else v
        return save_tensors_with_sidecar(path, tensors, meta, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> "DecodabilityResult":
        t, m = load_tensors_with_sidecar(path, expect_kind="DecodabilityResult")
        opt = {name: t.get(name) for name in cls._OPTIONAL}
        if opt["correct"] is not None:
            opt["correct"] = opt["correct"].bool()
        return cls(layers=m["layers"], task_names=m["task_names"], k=m["k"], metric=m["metric"],
                   n_prompts=m["n_prompts"], td=t["td"], per_task=t["per_task"], confusion=t["confusion"],
                   tie_break=m.get("tie_break", "nearest"), ci_info=dict(m.get("ci_info", {})),
                   notes=dict(m.get("notes", {})), **opt)


def _tie_note(layers, tie_frac, k: int, seed: int) -> dict:
    """A note when equally distant prompts competed for a neighbourhood (e.g. identical encodings)."""
    tied = {L: f for L, f in zip(layers, tie_frac) if f > 0}
    if not tied:
        return {}
    worst = max(tied, key=tied.get)
    return {"ties": f"at {len(tied)} layer(s) some prompts' {k}-th and {k + 1}-th neighbours are equally distant "
                    f"(most at layer {worst}: {tied[worst]:.0%} of prompts); those neighbourhoods were drawn at random "
                    f"among the equally distant prompts (seed {seed}), so TD there does not depend on the prompts' "
                    "order but varies with the seed"}


def task_decodability(
    encodings: TaskEncodings | Any,
    prompts: PromptSet | None = None,
    *,
    k: int = 10,
    metric: str = "euclidean",
    layers: Sequence[int] | None = None,
    tie_break: str = "lowest",
    seed: int = 0,
    batch_size: int | None = 256,
    progress: bool = False,
    ci: float | None = 0.95,
    n_boot: int = 1000,
    null: int = 0,
    ci_seed: int = 0,
) -> DecodabilityResult:
    """TD per layer: ``task_decodability(encodings)`` or ``task_decodability(model, prompts)``.

    ``tie_break``: how a tied vote is decided, ``"lowest"`` (default; scikit-learn's
    ``KNeighborsClassifier``), ``"nearest"`` or ``"random"`` (``knn_loo_predict``). ``ci``: the level
    of the bootstrap CIs over prompts (``td_ci``, ``per_task_ci``; None for none), from ``n_boot``
    resamples seeded by ``ci_seed``. ``null``: the number of label permutations of the shuffled-label
    null (0 = none; ``result.with_null()`` computes it later from the stored neighbours).
    """
    null, seed = _check_td_args(ci, n_boot, ci_seed, null, tie_break, seed)
    enc, layers = _encodings_of(encodings, prompts, layers, batch_size, progress)
    counts = _check_decodable(enc, k)
    sel = enc.layers if layers is None else list(layers)
    if null:  # its cost (permutations x prompts x layers x k), refused before any work
        from tvlens import stats

        stats.check_n_boot(null, "null", n=len(enc), cells=len(sel) * k, where="task_decodability")
    T = len(enc.task_names)
    td, per_task, conf, oks, nbrs, tie_frac = [], [], [], [], [], []
    for layer in sel:
        nn_idx, ties = knn_loo_neighbors(enc.at(layer), k, metric, return_ties=True, seed=seed)
        tie_frac.append(float(ties.float().mean()))
        pred = torch.from_numpy(knn_vote(enc.labels.cpu()[nn_idx].numpy(), T, tie_break, seed)).long()
        ok = (pred == enc.labels).float()
        oks.append(ok.bool())
        nbrs.append(nn_idx.int())
        td.append(ok.mean())
        per_task.append(torch.stack([ok[enc.labels == t].mean() if counts[t] else torch.tensor(float("nan"))
                                     for t in range(T)]))
        c = torch.zeros(T, T)
        c.index_put_((enc.labels, pred), torch.ones(len(pred)), accumulate=True)
        conf.append(c / counts.clamp_min(1)[:, None])
    res = DecodabilityResult(layers=sel, task_names=list(enc.task_names), td=torch.stack(td).float(),
                             per_task=torch.stack(per_task).float(), confusion=torch.stack(conf), k=k,
                             metric=metric, n_prompts=len(enc), correct=torch.stack(oks),
                             labels=enc.labels.cpu().clone(), neighbors=torch.stack(nbrs), tie_break=tie_break,
                             notes={"boundary_ties": dict(zip(sel, tie_frac)), **_tie_note(sel, tie_frac, k, seed)})
    if ci is not None:
        res.with_ci(ci, n_boot, ci_seed)
    if null:
        res.with_null(null, seed=ci_seed)
    return res


def _check_td_args(ci, n_boot, ci_seed, null, tie_break, seed) -> tuple[int, int]:
    """Refuse bad CI/null/tie-break arguments of ``task_decodability``; the checked ``null`` and ``seed``."""
    from tvlens import stats
    from tvlens.validate import check_seed

    if ci is not None:
        stats.check_ci_args(ci, n_boot, ci_seed, ("ci", "n_boot", "ci_seed"))
    from tvlens.checks import check_int

    null = check_int(null, "null", minimum=0, where="task_decodability",
                     hint="the number of label permutations of the shuffled-label null; 0 = none")
    if tie_break not in stats.TIE_BREAKS:
        raise ConfigError(f"tie_break must be one of {list(stats.TIE_BREAKS)}, got {tie_break!r}")
    return null, check_seed(seed, where="task_decodability")


def _encodings_of(encodings, prompts, layers, batch_size, progress) -> tuple[TaskEncodings, list[int] | None]:
    """Checked encodings (extracted when given a model and prompts) and the layers to decode (None: all)."""
    from tvlens.validate import int_list

    if not isinstance(encodings, TaskEncodings):
        if torch.is_tensor(encodings) or isinstance(encodings, (np.ndarray, list, tuple)):
            raise ConfigError("task_decodability: encodings must be TaskEncodings (tvlens.extract(model, prompts)) "
                              f"or a model (with prompts), got {type(encodings).__name__}")
        if prompts is None:
            raise ConfigError("task_decodability(model, prompts): give the prompts, or pass TaskEncodings")
        encodings = extract(encodings, prompts, layers=layers, batch_size=batch_size, progress=progress)
        layers = None
    enc = encodings
    check_encodings(enc, "task_decodability")
    if layers is not None:
        layers = int_list(layers, "layers", 0, 10**9, "task_decodability")
        missing = [L for L in layers if L not in enc.layers]
        if missing:
            raise ConfigError(f"task_decodability: layers {missing} were not extracted; these encodings hold layers "
                              f"{enc.layers}")
    return enc, layers


def _check_decodable(enc: TaskEncodings, k) -> torch.Tensor:
    """Prompts of at least two tasks and ``k`` below every task's count; the prompts per task."""
    if len(enc) == 0:
        raise ConfigError("no prompts to decode: the encodings are empty")
    counts = torch.bincount(enc.labels, minlength=len(enc.task_names))
    present = int((counts > 0).sum())
    if present < 2:
        raise ConfigError(f"task decodability needs prompts of at least two tasks; got tasks {counts.tolist()}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be an integer >= 1, got {k!r}")
    smallest = int(counts[counts > 0].min())
    if k >= smallest:
        raise ConfigError(
            f"k={k} must be smaller than the number of prompts of every task (smallest task has {smallest}): "
            "sample more prompts per task or lower k"
        )
    return counts
