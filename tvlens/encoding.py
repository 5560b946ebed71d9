"""Task encoding: cached-activation extraction, task vectors and task decodability (TD).

Definitions (Han et al. 2025; DESIGN.md):

- the representation of a prompt at layer ``l`` is the residual stream at its query position (the
  last token before the answer). Layer 0 is the embedding (``blocks.0.hook_resid_pre``), layer
  ``l > 0`` the output of block ``l - 1`` (``blocks.{l-1}.hook_resid_post``): ``n_layers + 1`` layers;
- a task vector of task A at layer l is the mean representation of A's prompts;
- TD at layer l is the leave-one-out k-nearest-neighbour accuracy (k=10, Euclidean, majority vote,
  ties to the lowest task index as scikit-learn) of the prompts' latent task: each prompt is
  classified by its k nearest *other* prompts. ``DecodabilityResult`` carries a bootstrap CI over
  prompts and, on request, the shuffled-label null (``tvlens.stats``).
"""

from __future__ import annotations

import functools
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int

from tvlens.accuracy import batches, check_prompts_fit
from tvlens.backends import get_backend, resid_name
from tvlens.errors import ConfigError, TvlensError
from tvlens.io import load_tensors_with_sidecar, save_tensors_with_sidecar
from tvlens.prompts import PromptSet


# --------------------------------------------------------------------------- layers and hooks
def n_resid_layers(model) -> int:
    return get_backend(model).n_layers + 1


resid_hook_name = resid_name  # the hook whose output is the residual stream at ``layer`` (0 = embedding)


def check_layers(model, layers: Sequence[int] | int | None) -> list[int]:
    n = n_resid_layers(model)
    if layers is None:
        return list(range(n))
    if isinstance(layers, str):
        from tvlens.validate import int_list

        int_list(layers, "layers", 0, n - 1, what=" (residual layers: 0 = embedding, l = output of block l-1)")
    if isinstance(layers, (int, np.integer)):
        layers = [int(layers)]
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < n:
            raise ConfigError(
                f"layer {layer!r} is out of range: this model has layers 0..{n - 1} "
                f"(0 = embedding, l = output of block l-1)"
            )
        out.append(int(layer))
    if not out:
        raise ConfigError("layers is empty: name at least one layer")
    return out


def model_fingerprint(model) -> str:
    """A short hash of the model's shape and a sample of its weights in canonical form: which residual
    space vectors live in (the same for a HookedTransformer and a raw TransformerBridge holding the same
    weights; different for a processed copy, e.g. a bridge in compatibility mode)."""
    return get_backend(model).fingerprint()


# --------------------------------------------------------------------------- extraction
AT = ("query", "answers")


def check_at(at: str) -> str:
    if at not in AT:
        raise ConfigError(f"at must be one of {list(AT)} (where a prompt's representation is read), got {at!r}")
    return at


def representation_mask(prompts: PromptSet, at: str = "query") -> Bool[torch.Tensor, "n seq"]:
    """The positions whose residual (averaged) is a prompt's representation, up to the query.

    ``"query"``: the query position alone, the last token before the answer (the paper's definition).
    ``"answers"``: the answer tokens of the in-context examples, averaged; a model can keep its task
    there and read it from the query (the shipped default model does; see ``run_patching``).
    """
    check_at(at)
    q = prompts.query_pos
    n, width = len(prompts), int(q.max()) + 1
    pos = torch.arange(width, device=q.device)[None]
    if at == "query":
        return pos == q[:, None]
    if prompts.train_mask is None or prompts.shots == 0:
        raise ConfigError("at='answers' needs prompts with in-context examples (shots >= 1) and a train_mask; "
                          f"these have shots={prompts.shots}")
    tm = prompts.train_mask[:, : width - 1].to(q.device)
    mask = torch.zeros(n, width, dtype=torch.bool, device=q.device)
    mask[:, 1:] = tm  # position i holds an answer token when position i-1 is trained to predict it
    mask &= pos < q[:, None]  # examples only, not the query's own answer
    if not bool(mask.any(1).all()):
        raise ConfigError("at='answers': some prompts have no example answer tokens before the query")
    return mask


@torch.no_grad()
def extract(
    model,
    prompts: PromptSet,
    layers: Sequence[int] | int | None = None,
    batch_size: int | None = 256,
    progress: bool = True,
    at: str = "query",
) -> "TaskEncodings":
    """The residual stream at each prompt's query position, at every requested layer.

    Only the query position of the requested hooks is kept (never a full cache), the forward pass
    stops after the last requested layer, and positions after the query are not computed, so
    memory is ``n_prompts x n_layers x d_model`` plus one batch's forward pass.

    ``at="answers"`` reads the mean over the examples' answer tokens instead of the query position
    (``representation_mask``): where a model that does not route its task through the query keeps it.
    """
    check_prompts_fit(model, prompts, "extract")
    layers = check_layers(model, layers)
    check_at(at)
    if at != "query":
        representation_mask(prompts, at)  # refuse prompts without examples before any work
    bk = get_backend(model)
    names = {resid_hook_name(layer): i for i, layer in enumerate(layers)}
    device = bk.input_device
    out = torch.full((len(prompts), len(layers), bk.d_model), float("nan"), dtype=torch.float32)
    # layer l is the input of block l: run blocks 0..l-1 only (layer 0 is read by a hook at the start of
    # block 0, so that block runs; and never the unembedding)
    stop = min(max(max(layers), 1), bk.n_layers)
    it, bs = batches(len(prompts), batch_size, "extract", progress)
    for s in it:
        sub = prompts.subset(slice(s, s + bs)).to(device)
        rows = torch.arange(len(sub), device=device)
        q = sub.query_pos

        # hooks close over their layer's column (a bridge's hook.name is its own spelling)
        if at == "query":
            def keep(act, hook, _rows=rows, _q=q, _s=s, _col=0):
                out[_s : _s + len(_rows), _col] = act[_rows.to(act.device), _q.to(act.device)].float().cpu()
        else:
            w = representation_mask(sub, at).float()
            w = w / w.sum(1, keepdim=True)

            def keep(act, hook, _w=w, _s=s, _col=0):
                out[_s : _s + len(_w), _col] = torch.einsum("bp,bpd->bd", _w.to(act.device),
                                                             act[:, : _w.shape[1]].float()).cpu()

        fwd_hooks = [(n, functools.partial(keep, _col=col)) for n, col in names.items()]
        x = sub.model_input[:, : int(q.max()) + 1]
        bk.run_with_hooks(x, fwd_hooks=fwd_hooks, stop_at_layer=stop)
    if bool(out.isnan().any()):  # a hook that never fired (or a model that produced NaN): never return garbage
        raise TvlensError(f"extract: no residual was read (or it is NaN) at some of layers {layers}; "
                          "the model's forward pass did not run the hooks these layers need")
    return TaskEncodings(
        acts=out,
        layers=layers,
        labels=prompts.labels.cpu().clone(),
        task_names=list(prompts.task_names),
        fingerprint=model_fingerprint(model),
        d_model=bk.d_model,
        family=prompts.family,
        read_at=at,
    )


@dataclass
class TaskEncodings:
    """Representations ``[n_prompts, n_layers, d_model]`` with the prompts' task labels."""

    acts: Float[torch.Tensor, "n layer d_model"]
    layers: list[int]
    labels: Int[torch.Tensor, "n"]
    task_names: list[str]
    fingerprint: str = ""
    d_model: int = 0
    family: str = ""
    read_at: str = "query"  # where each prompt's representation was read (``representation_mask``)

    def __len__(self) -> int:
        return int(self.acts.shape[0])

    def __repr__(self) -> str:
        return (f"TaskEncodings(n={len(self)}, layers={self.layers}, d_model={self.acts.shape[-1]}, "
                f"tasks={self.task_names})")

    def at(self, layer: int) -> Float[torch.Tensor, "n d_model"]:
        if layer not in self.layers:
            raise ConfigError(f"layer {layer} was not extracted; these encodings hold layers {self.layers}")
        return self.acts[:, self.layers.index(layer)]

    def task_vectors(self, layer: int | Sequence[int] | None = None) -> "TaskVectors":
        """Per-task mean representation at ``layer`` (all extracted layers when None)."""
        layers = self.layers if layer is None else ([layer] if isinstance(layer, int) else list(layer))
        idx = [self.layers.index(L) if L in self.layers else -1 for L in layers]
        if -1 in idx:
            raise ConfigError(f"layers {layers} not all extracted; these encodings hold layers {self.layers}")
        # a task without prompts has no mean: NaN (``counts`` 0), never a zero vector that patches as one
        vecs = torch.full((len(layers), len(self.task_names), self.acts.shape[-1]), float("nan"))
        counts = torch.zeros(len(self.task_names), dtype=torch.long)
        for t in range(len(self.task_names)):
            m = self.labels == t
            counts[t] = int(m.sum())
            if counts[t]:
                vecs[:, t] = self.acts[m][:, idx].mean(0)
        return TaskVectors(vectors=vecs, layers=layers, task_names=list(self.task_names), counts=counts,
                           fingerprint=self.fingerprint, d_model=self.acts.shape[-1], family=self.family, read_at=self.read_at)

    def project(self, layer: int, method: str = "pca", n_components: int = 2, seed: int = 0):
        """Low-dimensional projection at ``layer`` (``pca``, ``tsne``; ``umap`` with umap-learn) as a DataFrame."""
        import pandas as pd

        X = self.at(layer).numpy()
        if method == "pca":
            from sklearn.decomposition import PCA

            Y = PCA(n_components=n_components, random_state=seed).fit_transform(X)
        elif method == "tsne":
            from sklearn.manifold import TSNE

            Y = TSNE(n_components=n_components, random_state=seed, perplexity=min(30.0, len(X) / 4)).fit_transform(X)
        elif method == "umap":
            try:
                import umap
            except ImportError as e:
                raise ConfigError("method='umap' needs umap-learn: pip install 'tvlens[umap]'") from e
            Y = umap.UMAP(n_components=n_components, random_state=seed).fit_transform(X)
        else:
            raise ConfigError(f"unknown projection method {method!r}; use 'pca', 'tsne' or 'umap'")
        df = pd.DataFrame(Y, columns=[f"{method}{i + 1}" for i in range(n_components)])
        df["task"] = [self.task_names[int(t)] for t in self.labels]
        return df

    def plot_projection(self, layer: int, method: str = "pca", seed: int = 0):
        """A 2-D projection coloured by task: ``tvlens.views.encodings_scatter_figure``."""
        from tvlens.views.plots import encodings_scatter_figure

        return encodings_scatter_figure(self, layer, method, seed)

    def plot(self, layer: int | None = None, method: str = "pca", seed: int = 0):
        """The encodings scatter at ``layer`` (default: the last extracted layer)."""
        return self.plot_projection(self.layers[-1] if layer is None else layer, method, seed)


@dataclass
class TaskVectors:
    """Per-task mean representations ``[n_layers, n_tasks, d_model]``, tied to the model they came from."""

    vectors: Float[torch.Tensor, "layer task d_model"]
    layers: list[int]
    task_names: list[str]
    counts: torch.Tensor | None = None
    fingerprint: str = ""
    d_model: int = 0
    family: str = ""
    read_at: str = "query"  # where they were read, and so where ``run_patching`` patches them

    def __repr__(self) -> str:
        where = "" if self.read_at == "query" else f", read_at={self.read_at!r}"
        return f"TaskVectors(layers={self.layers}, tasks={self.task_names}, d_model={self.d_model}{where})"

    def get(self, task: str | int, layer: int) -> Float[torch.Tensor, "d_model"]:
        if isinstance(task, str) and task not in self.task_names:
            from tvlens.errors import UnknownNameError

            raise UnknownNameError(f"no task vector of task {task!r}; these hold tasks {self.task_names}")
        t = self.task_names.index(task) if isinstance(task, str) else int(task)
        if layer not in self.layers:
            raise ConfigError(f"no task vector at layer {layer}; these hold layers {self.layers}")
        return self.vectors[self.layers.index(layer), t]

    def check_model(self, model) -> None:
        """Refuse a model whose residual space these vectors do not live in (``tvlens.validate.check_vectors``:
        width, dtype, finite, and the model's fingerprint; vectors without one need ``unchecked("fingerprint")``)."""
        from tvlens.validate import check_vectors

        check_vectors(self, model, where="TaskVectors.check_model")

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        tensors = {"vectors": self.vectors}
        if self.counts is not None:
            tensors["counts"] = self.counts
        meta = {"kind": type(self).__name__, "layers": self.layers, "task_names": self.task_names,
                "fingerprint": self.fingerprint, "d_model": self.d_model, "family": self.family, "read_at": self.read_at,
                **self._extra_meta()}
        return save_tensors_with_sidecar(path, tensors, meta, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> "TaskVectors":
        t, m = load_tensors_with_sidecar(path, expect_kind=cls.__name__)
        _check_vectors_artifact(t, m, f"{cls.__name__}.load({str(path)!r})")
        return cls(vectors=t["vectors"], counts=t.get("counts"), layers=list(m["layers"]),
                   task_names=list(m["task_names"]), fingerprint=m["fingerprint"], d_model=int(m["d_model"]),
                   family=m.get("family", ""), read_at=m.get("read_at", "query"), **cls._extra_from_meta(m))

    def _extra_meta(self) -> dict[str, Any]:
        """Sidecar fields a subclass adds (``FunctionVectors``: its heads)."""
        return {}

    @classmethod
    def _extra_from_meta(cls, meta: dict[str, Any]) -> dict[str, Any]:
        return {}


def _check_vectors_artifact(t: dict[str, torch.Tensor], m: dict[str, Any], where: str) -> None:
    """A TaskVectors file whose sidecar labels do not fit its stored rows is refused, never mislabelled."""
    from tvlens.errors import CheckpointError
    from tvlens.io import require_keys

    require_keys(m, {"layers": list, "task_names": list, "fingerprint": str, "d_model": int}, where)
    if "vectors" not in t or t["vectors"].ndim != 3:
        raise CheckpointError(f"{where}: the weights file holds no [layer, task, d_model] 'vectors' tensor")
    n_l, n_t, d = t["vectors"].shape
    layers, names = m["layers"], m["task_names"]
    if any(isinstance(x, bool) or not isinstance(x, int) for x in layers) or len(set(layers)) != len(layers):
        raise CheckpointError(f"{where}: sidecar 'layers' must be distinct integers, got {layers}")
    if any(not isinstance(x, str) for x in names) or len(set(names)) != len(names):
        raise CheckpointError(f"{where}: sidecar 'task_names' must be distinct strings, got {names}")
    if (len(layers), len(names), m["d_model"]) != (n_l, n_t, d):
        raise CheckpointError(
            f"{where}: the sidecar describes {len(layers)} layers x {len(names)} tasks x d_model {m['d_model']} "
            f"but the stored vectors are {n_l} x {n_t} x {d}; the sidecar was edited or belongs to another file"
        )
    if "counts" in t and tuple(t["counts"].shape) not in ((n_t,), (n_l, n_t)):
        raise CheckpointError(f"{where}: stored counts {tuple(t['counts'].shape)} do not fit {n_t} tasks")


# --------------------------------------------------------------------------- decodability
def knn_loo_neighbors(
    X: Float[torch.Tensor, "n d"],
    k: int = 10,
    metric: str = "euclidean",
    chunk: int = 2048,
    return_ties: bool = False,
):
    """Each point's ``k`` nearest *other* points (leave-one-out), nearest first; neighbours at equal
    distance are taken in index order. The labels play no part, so one call serves every relabelling
    (the shuffled-label null, ``tvlens.stats.knn_permutation_null``). With ``return_ties`` also a
    ``[n]`` bool: the k-th and (k+1)-th neighbours are at the same distance (so index order, not
    distance, chose the neighbourhood)."""
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
        srt = torch.sort(d, dim=1, stable=True)
        out[s : s + len(xb)] = srt.indices[:, :k]
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
    from tvlens.stats import TIE_BREAKS, knn_vote

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
        # where index order, not distance, picked most neighbourhoods (e.g. every prompt at the same point),
        # TD and its null measure the prompts' order: no p-value
        ties = self.notes.get("boundary_ties", {})
        degenerate = [i for i, L in enumerate(self.layers) if ties.get(L, ties.get(str(L), 0.0)) > 0.5]
        p[degenerate] = np.nan
        if degenerate:
            self.notes["no_p_value"] = (f"layers {[self.layers[i] for i in degenerate]}: for most prompts the k-th "
                                        "and (k+1)-th neighbours are equidistant (e.g. identical representations), "
                                        "so index order chose the neighbours; p-value left NaN")
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
        return 1.0 / len(self.task_names)

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
        from tvlens.views.page import figure_fragment, result_html
        from tvlens.views.plots import td_heatmap_figure

        return result_html(f"<div><b>Task decodability</b> (leave-one-out {self.k}-NN, {html.escape(self.metric)}, "
                           f"{self.n_prompts} prompts; chance {self.chance:.3f}; best layer {self.best_layer}: "
                           f"{self.best_td:.3f})" + self.to_dataframe().to_html(index=False, float_format=lambda v: f"{v:.3f}")
                           + "</div>", [figure_fragment(self.plot()), figure_fragment(td_heatmap_figure(self))])

    def plot(self):
        """TD by layer (all tasks, and each task thinner): ``tvlens.views.td_by_layer_figure``."""
        from tvlens.views.plots import td_by_layer_figure

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
    from tvlens import stats

    if ci is not None:
        stats.check_ci_args(ci, n_boot, ci_seed, ("ci", "n_boot", "ci_seed"))
    if isinstance(null, bool) or not isinstance(null, int) or null < 0:
        raise ConfigError(f"null must be the number of label permutations (an integer >= 0; 0 = no null), got {null!r}")
    if tie_break not in stats.TIE_BREAKS:
        raise ConfigError(f"tie_break must be one of {list(stats.TIE_BREAKS)}, got {tie_break!r}")
    from tvlens.validate import check_encodings, check_seed, int_list

    seed = check_seed(seed, where="task_decodability")

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
    sel = enc.layers if layers is None else list(layers)
    T = len(enc.task_names)
    td, per_task, conf, oks, nbrs, tie_frac = [], [], [], [], [], []
    for layer in sel:
        nn_idx, ties = knn_loo_neighbors(enc.at(layer), k, metric, return_ties=True)
        tie_frac.append(float(ties.float().mean()))
        pred = torch.from_numpy(stats.knn_vote(enc.labels.cpu()[nn_idx].numpy(), T, tie_break, seed)).long()
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
                             notes={"boundary_ties": dict(zip(sel, tie_frac))})
    if ci is not None:
        res.with_ci(ci, n_boot, ci_seed)
    if null:
        res.with_null(null, seed=ci_seed)
    return res


# --------------------------------------------------------------------------- emergence
@dataclass
class EmergenceResult:
    """Per-task ICL metric and TD per layer across training steps."""

    steps: list[int]
    task_names: list[str]
    metric: str  # "accuracy" or "mse"
    per_task_metric: Float[torch.Tensor, "step task"]
    mean_metric: Float[torch.Tensor, "step"]
    layers: list[int]
    td: Float[torch.Tensor, "step layer"]
    td_per_task: Float[torch.Tensor, "step layer task"]
    k: int = 10
    n_per_task: int = 100
    # per prompt (the same prompts at every step): what the CIs are computed from
    per_prompt_metric: torch.Tensor | None = None  # [step, n]: correct (0/1) or squared error
    td_correct: torch.Tensor | None = None  # [step, layer, n]: leave-one-out verdicts
    labels: torch.Tensor | None = None  # [n]
    # bootstrap CIs over prompts, stratified by task (``with_ci``; filled on first use with the defaults)
    mean_metric_ci: torch.Tensor | None = None  # [2, step]
    per_task_metric_ci: torch.Tensor | None = None  # [2, step, task]
    td_ci: torch.Tensor | None = None  # [2, step, layer]
    spearman_ci: tuple[float, float] | None = None  # of ``spearman()`` at the best layer
    ci_info: dict = field(default_factory=dict)

    def with_ci(self, ci: float = 0.95, n_boot: int = 1000, seed: int = 0) -> "EmergenceResult":
        """Fill the CIs: percentile bootstrap over prompts, stratified by task. One resample of the prompts
        applies to every step (the same prompts are scored at each), so the Spearman correlation over
        steps is recomputed on each resample's series of TD (best layer, held fixed) and mean metric
        (``tvlens.stats``). Returns ``self``."""
        from tvlens import stats

        ci, n_boot, seed = stats.check_ci_args(ci, n_boot, seed)
        if self.per_prompt_metric is None or self.td_correct is None or self.labels is None:
            raise ConfigError("this EmergenceResult holds no per-prompt values: recompute it with tvlens.emergence "
                              "to get CIs")
        T = len(self.task_names)
        lab = self.labels.numpy()
        W = stats.bootstrap_counts(len(lab), n_boot, seed, lab)
        gm = stats.group_means_boot(self.per_prompt_metric.double().numpy(), lab, T, W)  # [boot, step, task]
        real = [j for j, t in enumerate(self.task_names) if t != "null"]
        mm = gm[..., real].mean(-1)  # [boot, step]
        counts = np.bincount(lab, minlength=T)
        gt = stats.group_means_boot(self.td_correct.double().numpy(), lab, T, W)  # [boot, step, layer, task]
        td = (np.nan_to_num(gt) * counts).sum(-1) / counts.sum()  # [boot, step, layer]
        self.per_task_metric_ci = torch.tensor(np.stack(stats.percentile_ci(gm, ci)), dtype=torch.float32)
        self.mean_metric_ci = torch.tensor(np.stack(stats.percentile_ci(mm, ci)), dtype=torch.float32)
        self.td_ci = torch.tensor(np.stack(stats.percentile_ci(td, ci)), dtype=torch.float32)
        if len(self.steps) >= 3:
            b = self.layers.index(self.best_layer)
            rho = stats.spearman_rows(td[:, :, b], -mm if self.metric == "mse" else mm)
            lo, hi = stats.percentile_ci(rho, ci)
            self.spearman_ci = (float(lo), float(hi))
        else:
            self.spearman_ci = (float("nan"), float("nan"))
        self.ci_info = {"ci": ci, "n_boot": n_boot, "seed": seed}
        return self

    def _ensure_ci(self) -> None:
        if self.mean_metric_ci is None and self.per_prompt_metric is not None and self.td_correct is not None:
            self.with_ci()

    @property
    def best_layer(self) -> int:
        """The layer whose TD is highest at the last step."""
        return self.layers[int(torch.argmax(self.td[-1]))]

    def td_at(self, layer: int | None = None) -> Float[torch.Tensor, "step"]:
        return self.td[:, self.layers.index(self.best_layer if layer is None else layer)]

    def spearman(self, layer: int | None = None) -> float:
        """Spearman correlation over steps between TD (best layer) and the mean ICL metric
        (for MSE the sign is flipped, so positive means encoding improves as loss falls)."""
        from scipy.stats import spearmanr

        m = self.mean_metric.numpy()
        if self.metric == "mse":
            m = -m
        t = self.td_at(layer).numpy()
        if len(t) < 2 or t.std() == 0 or m.std() == 0:
            return float("nan")  # undefined for a constant series
        return float(spearmanr(t, m).statistic)

    def to_dataframe(self):
        import pandas as pd

        self._ensure_ci()
        m = self.metric
        rows = []
        for i, s in enumerate(self.steps):
            row = {"step": s, f"mean_{m}": float(self.mean_metric[i])}
            if self.mean_metric_ci is not None:
                row.update({f"mean_{m}_lo": float(self.mean_metric_ci[0, i]),
                            f"mean_{m}_hi": float(self.mean_metric_ci[1, i])})
            for j, t in enumerate(self.task_names):
                row[f"{m}[{t}]"] = float(self.per_task_metric[i, j])
                if self.per_task_metric_ci is not None:
                    row[f"{m}[{t}]_lo"] = float(self.per_task_metric_ci[0, i, j])
                    row[f"{m}[{t}]_hi"] = float(self.per_task_metric_ci[1, i, j])
            for j, L in enumerate(self.layers):
                row[f"td[L{L}]"] = float(self.td[i, j])
                if self.td_ci is not None:
                    row[f"td[L{L}]_lo"] = float(self.td_ci[0, i, j])
                    row[f"td[L{L}]_hi"] = float(self.td_ci[1, i, j])
            rows.append(row)
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        self._ensure_ci()
        sp = "" if self.spearman_ci is None else f" [{self.spearman_ci[0]:.3f}, {self.spearman_ci[1]:.3f}]"
        return (f"EmergenceResult({len(self.steps)} steps {self.steps[0]}..{self.steps[-1]}, best layer "
                f"{self.best_layer}: TD {float(self.td_at()[0]):.3f} -> {float(self.td_at()[-1]):.3f}, mean "
                f"{self.metric} {float(self.mean_metric[0]):.3f} -> {float(self.mean_metric[-1]):.3f}, "
                f"Spearman {self.spearman():.3f}{sp})")

    def _repr_html_(self) -> str:
        from tvlens.views.page import figure_fragment, result_html
        from tvlens.views.plots import td_by_layer_figure

        return result_html(f"<div><b>Emergence of task encoding</b><pre>{html.escape(repr(self))}</pre>"
                           + self.to_dataframe().to_html(index=False, float_format=lambda v: f"{v:.3f}") + "</div>",
                           [figure_fragment(self.plot()), figure_fragment(td_by_layer_figure(self))])

    def plot(self):
        """Per-task ICL metric and TD per layer against training step: ``tvlens.views.emergence_figure``."""
        from tvlens.views.plots import emergence_figure

        return emergence_figure(self)


def emergence(
    checkpoints,
    family=None,
    *,
    n_per_task: int = 100,
    shots: int = 4,
    seed: int = 12345,
    k: int = 10,
    steps: Sequence[int] | None = None,
    progress: bool = True,
) -> EmergenceResult:
    """TD per layer and per-task ICL metric at every checkpoint of a run.

    ``checkpoints``: a shipped model name or a run folder (as written by ``tvlens train``), or a
    list of ``(step, model)`` pairs where ``model`` is a loaded model, a local Hugging Face checkpoint
    folder, or ``"name@revision"`` of a revision already in the local Hugging Face cache (pretrained
    checkpoints, e.g. OLMo's ``step1000-tokens4B``; loaded one at a time, as a TransformerBridge where
    TransformerLens has no HookedTransformer). The same fresh prompts are used at every step; a text
    family is tokenized with the first checkpoint's tokenizer.
    """
    from tqdm.auto import tqdm

    from tvlens import tasks as _tasks
    from tvlens.accuracy import icl_accuracy
    from tvlens.models import list_checkpoints, load_checkpoint, model_info

    if isinstance(checkpoints, (str, Path)):
        from tvlens.models import _resolve_folder

        pairs = list_checkpoints(_resolve_folder(checkpoints))
        if steps is not None:
            pairs = [(s, p) for s, p in pairs if s in set(steps)]
        held: list = []  # one model for the whole run: each checkpoint's weights are loaded into it

        def load_next(p):
            held[:] = [load_checkpoint(p, into=held[0] if held else None)]
            return held[0]
        items = [(s, (lambda p=p: load_next(p))) for s, p in pairs]
    else:
        items = []
        for item in checkpoints:
            if not (isinstance(item, (tuple, list)) and len(item) == 2) or isinstance(item[0], bool) \
                    or not isinstance(item[0], (int, np.integer)):
                raise ConfigError(f"checkpoints: expected (step, model or folder) pairs with integer steps, got {item!r}")
            s, m = item
            items.append((s, (lambda m=m: _load_checkpoint_item(m))))
    if not items:
        raise ConfigError("emergence needs at least one checkpoint")
    prompts = None
    rows_m, rows_td, rows_tdt, step_list, pp_m, pp_td = [], [], [], [], [], []
    for s, get in tqdm(items, desc="emergence", disable=not progress):
        model = get()
        if prompts is None:
            fam = _tasks.get(family) if isinstance(family, str) else family
            if fam is None:
                fam = model_info(model).task_family()
                if fam is None:
                    raise ConfigError("the checkpoints record no task family: pass family=")
            from tvlens.tasks.text import TextTaskFamily

            if isinstance(fam, TextTaskFamily):
                prompts = fam.sample(n_per_task, shots=shots, seed=seed, tokenizer=getattr(model, "tokenizer", None))
            else:
                prompts = fam.sample(n_per_task, shots=shots, seed=seed)
        acc = icl_accuracy(model, prompts)
        dec = task_decodability(model, prompts, k=k, ci=None)
        step_list.append(int(s))
        rows_m.append(torch.tensor([acc.per_task[t] for t in acc.task_names]))
        rows_td.append(dec.td)
        rows_tdt.append(dec.per_task)
        pp_m.append(acc.per_prompt.float())
        pp_td.append(dec.correct)
    assert prompts is not None
    per_task = torch.stack(rows_m)
    non_null = [j for j, t in enumerate(prompts.task_names) if t != "null"]
    return EmergenceResult(
        steps=step_list, task_names=list(prompts.task_names), metric=acc.metric, per_task_metric=per_task,
        mean_metric=per_task[:, non_null].mean(1), layers=dec.layers, td=torch.stack(rows_td),
        td_per_task=torch.stack(rows_tdt), k=k, n_per_task=n_per_task, per_prompt_metric=torch.stack(pp_m),
        td_correct=torch.stack(pp_td), labels=prompts.labels.cpu().clone(),
    )


def _load_checkpoint_item(m):
    """A model from an ``emergence`` checkpoint item: a model, a local folder, or ``"name@revision"``."""
    if not isinstance(m, (str, Path)):
        return m
    from tvlens.models import load_model

    s = str(m)
    if "@" in s and not Path(s).exists():
        name, rev = s.rsplit("@", 1)
        return load_model(name, backend="bridge", revision=rev)
    return load_model(s)


def encoding_callback(config, n_per_task: int = 50, k: int = 10, seed: int = 424242):
    """A ``train(callback=...)`` that logs TD per layer at each evaluation (``tvlens train --track-encoding``)."""
    fam = config.build_family()
    prompts = fam.sample(n_per_task, shots=config.shots, seed=seed)

    def cb(step: int, model, record: dict) -> dict:
        res = task_decodability(model, prompts, k=k, ci=None)
        return {"td": [round(float(v), 4) for v in res.td], "td_best_layer": res.best_layer}

    return cb
