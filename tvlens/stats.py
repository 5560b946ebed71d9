"""Uncertainty for every figure tvlens reports: seeded bootstrap CIs over prompts and permutation nulls.

A low module (numpy and scipy only; nothing higher in tvlens): results compute their CIs from the
per-prompt arrays their analyses already produce.

**What is resampled.** Prompts, with replacement, *within each task* (a stratified bootstrap): tvlens
samples the same number of prompts per task, so each resample keeps that design and a task is never
absent from a resample. A resample is a matrix of counts ``W[b, i]`` (how often prompt ``i`` is drawn
in resample ``b``, multinomial within its task), so every statistic that is a mean over prompts is a
matrix product, and one ``W`` serves every layer, cell and head at once (``group_means_boot``). For
statistics with no task (a sweep's mean over prompt pairs) the strata are one group.

**TD.** The leave-one-out kNN verdict of each prompt (decoded right / wrong) is computed once, and the
bootstrap resamples that per-prompt verdict vector; the neighbours are not recomputed. Refitting the
kNN on a resample would be wrong, not just slow: a prompt drawn twice is its own nearest neighbour at
distance 0, which leave-one-out exists to prevent. So TD's CI is the uncertainty of "the fraction of
prompts whose task is recovered" over prompts, with the classifier's neighbourhoods held fixed.

**The shuffled-label null of TD** (``knn_permutation_null``): the TD a classifier gets when the task
labels are permuted over prompts. The neighbours do not depend on the labels, so the k nearest
neighbours of every prompt are found once and each permutation only recomputes the votes; the
p-value is ``(1 + #{null >= observed}) / (1 + n_perm)``.

**Intervals** are percentile intervals (``percentile_ci``) at level ``ci`` (0.95 by default) from
``n_boot`` resamples (1000 by default), seeded (``seed``): the same seed gives the same interval.
``scipy.stats.bootstrap`` computes the same percentile interval for one mean (tests compare the two),
but it redraws indices per statistic and has no strata; the count-matrix product here bootstraps all
of a result's cells together in one pass (e.g. 1000 resamples of a 4-layer x 7 x 7 patching grid over
700 prompts in ~0.05 s) and keeps the cells' joint resampling, which derived figures (a flip rate is a
mean of cells) need.

**Spearman and R²** (``spearman_ci``, ``r2_ci``) resample the (x, y) points in pairs, unless a caller
gives resampled series (``spearman_rows``: the emergence Spearman resamples prompts, which changes
every step's value at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tvlens.errors import ConfigError

DEFAULT_N_BOOT = 1000
DEFAULT_CI = 0.95
DEFAULT_N_PERM = 1000
TIE_BREAKS = ("lowest", "nearest", "random")


# --------------------------------------------------------------------------- argument checks
def check_n_boot(n_boot: Any, name: str = "n_boot", *, n: int = 0, cells: int = 1, where: str = "") -> int:
    """A number of resamples: an integer >= 1 (numpy integers welcome), whose cost is checked with tvlens'
    one work/memory estimate (``tvlens.checks.check_size``) before any work: the ``[n_boot, n]`` count
    matrix and the ``[n_boot, cells]`` resampled statistics (8 bytes each, twice for temporaries)."""
    from tvlens.checks import check_size

    return check_size(n_boot, name, minimum=1, where=where,
                      bytes_each=8.0 * 2 * (max(int(n), 1) + max(int(cells), 1)),
                      flops_each=2.0 * max(int(n), 1) * max(int(cells), 1),
                      what=f"{name}={n_boot!r} resamples of {n} prompts x {cells} statistics",
                      hint="the number of resamples; 1000 is the default")


def check_ci(ci: Any, name: str = "ci") -> float:
    """A confidence level strictly between 0 and 1 (``0.95``)."""
    from tvlens.checks import check_probability

    return check_probability(ci, name, what="a confidence level")


def check_seed(seed: Any, name: str = "seed") -> int:
    """A seed: an integer >= 0 (a string or a bool is refused, naming ``name``)."""
    from tvlens.checks import check_seed as _check

    return _check(seed, name)


def check_ci_args(ci: Any = DEFAULT_CI, n_boot: Any = DEFAULT_N_BOOT, seed: Any = 0,
                  names: tuple[str, str, str] = ("ci", "n_boot", "seed"), *, n: int = 0,
                  cells: int = 1) -> tuple[float, int, int]:
    """Validate the three CI knobs together (with the cost of ``n_boot`` resamples of ``n`` prompts x ``cells``
    statistics when given); returns them as (float, int, int)."""
    return check_ci(ci, names[0]), check_n_boot(n_boot, names[1], n=n, cells=cells), check_seed(seed, names[2])


def _labels(labels: Any, n: int, n_groups: int, name: str = "labels") -> np.ndarray:
    """Group labels: one integer in ``0..n_groups-1`` per prompt (a label outside would be dropped silently)."""
    lab = _np(labels).reshape(-1)
    if lab.shape[0] != n:
        raise ConfigError(f"{name} must hold one label per value ({n}), got {lab.shape[0]}")
    if lab.dtype.kind not in "iu":
        if lab.dtype.kind == "f" and len(lab) and np.all(np.isfinite(lab)) and np.all(lab == np.round(lab)):
            lab = lab.astype(np.int64)
        else:
            raise ConfigError(f"{name} must be integer group indices 0..{n_groups - 1}, got dtype {lab.dtype}")
    lab = lab.astype(np.int64)
    if len(lab) and (lab.min() < 0 or lab.max() >= n_groups):
        bad = sorted(set(lab[(lab < 0) | (lab >= n_groups)].tolist()))[:5]
        raise ConfigError(f"{name} {bad} outside 0..{n_groups - 1}: with n_groups={n_groups} those values would be "
                          "dropped; pass n_groups large enough to hold every label")
    return lab


# --------------------------------------------------------------------------- resampling
def _np(x: Any, dtype=None) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def bootstrap_counts(n: int, n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
                     strata: Any = None) -> np.ndarray:
    """``[n_boot, n]`` counts: how often each of ``n`` prompts is drawn in each resample.

    With ``strata`` (one label per prompt) each stratum is resampled within itself (its size is kept);
    without, all ``n`` prompts are one stratum. Seeded: the same arguments give the same counts.
    """
    n_boot = check_n_boot(n_boot, n=n)
    seed = check_seed(seed)
    if n < 1:
        raise ConfigError("bootstrap over prompts needs at least one prompt, got none")
    rng = np.random.default_rng(seed)
    W = np.zeros((n_boot, n), dtype=np.float64)
    if strata is None:
        groups = [np.arange(n)]
    else:
        s = _np(strata).reshape(-1)
        if len(s) != n:
            raise ConfigError(f"strata must hold one label per prompt ({n}), got {len(s)}")
        groups = [np.flatnonzero(s == g) for g in np.unique(s)]
    rows = np.arange(n_boot)[:, None]
    for idx in groups:  # draw m of the stratum's m prompts, with replacement, per resample
        m = len(idx)
        draws = rng.integers(0, m, size=(n_boot, m))
        W[:, idx] = np.bincount((rows * m + draws).ravel(), minlength=n_boot * m).reshape(n_boot, m)
    return W


def percentile_ci(boot: Any, ci: float = DEFAULT_CI) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval over axis 0 of bootstrap statistics ``[n_boot, ...]``: ``(lo, hi)``.

    NaN resamples (a statistic undefined on that resample) are left out; all-NaN gives NaN.
    """
    ci = check_ci(ci)
    b = np.asarray(boot, dtype=np.float64)
    a = (1 - ci) / 2
    if not np.isnan(b).any():
        q = np.quantile(b, [a, 1 - a], axis=0)
        return q[0], q[1]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices -> NaN
        q = np.nanquantile(b, [a, 1 - a], axis=0)
    return q[0], q[1]


def group_means_boot(values: Any, labels: Any, n_groups: int, W: np.ndarray) -> np.ndarray:
    """Per-group (per-task) means of ``values [..., n]`` in every resample ``W [n_boot, n]``:
    ``[n_boot, ..., n_groups]``; a group with no prompts is NaN. ``W`` must keep each group's size
    (``bootstrap_counts(..., strata=labels)``), so the means divide by the group's size."""
    v = _np(values, np.float64)
    n = v.shape[-1]
    lab = _labels(labels, n, n_groups)
    if W.shape[1] != n:
        raise ConfigError(f"group_means_boot: values hold {n} prompts, labels {lab.shape[0]}, resamples {W.shape[1]}")
    lead = v.shape[:-1]
    flat = v.reshape(-1, n)  # [cells, n]
    from tvlens.checks import check_memory

    check_memory(8.0 * 2 * W.shape[0] * flat.shape[0] * n_groups,  # the resampled means, before allocating them
                 f"n_boot={W.shape[0]} resamples of {flat.shape[0]} x {n_groups} group means", "n_boot")
    out = np.full((W.shape[0], flat.shape[0], n_groups), np.nan)
    for g in range(n_groups):
        idx = np.flatnonzero(lab == g)
        if len(idx):
            out[:, :, g] = W[:, idx] @ flat[:, idx].T / len(idx)
    return out.reshape(W.shape[0], *lead, n_groups)


def group_means(values: Any, labels: Any, n_groups: int) -> np.ndarray:
    """Per-group means of ``values [..., n]``: ``[..., n_groups]`` (NaN for an empty group)."""
    v = _np(values, np.float64)
    lab = _labels(labels, v.shape[-1], n_groups)
    out = np.full((*v.shape[:-1], n_groups), np.nan)
    for g in range(n_groups):
        m = lab == g
        if m.any():
            out[..., g] = v[..., m].mean(-1)
    return out


@dataclass
class Interval:
    """A point estimate with its percentile interval (arrays of one shape) and how it was computed."""

    estimate: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    ci: float = DEFAULT_CI
    n_boot: int = DEFAULT_N_BOOT
    seed: int = 0
    note: str = ""  # why the interval is NaN, when it is (too few points, NaN inputs)

    def __iter__(self):  # lo, hi = interval
        return iter((self.lo, self.hi))

    def fmt(self, i: Any = (), digits: int = 3) -> str:
        """``"0.812 [0.771, 0.850]"`` for element ``i``."""
        e, lo, hi = (float(np.asarray(a)[i]) for a in (self.estimate, self.lo, self.hi))
        return f"{e:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def mean_ci(values: Any, strata: Any = None, *, n_boot: int = DEFAULT_N_BOOT, ci: float = DEFAULT_CI,
            seed: int = 0) -> Interval:
    """The mean over prompts (last axis) of ``values [..., n]`` with its bootstrap CI (stratified by
    ``strata`` when given)."""
    v = _np(values, np.float64)
    if v.ndim == 0:
        raise ConfigError(f"mean_ci: values must be an array of per-prompt values [..., n], got the scalar {v}")
    n = v.shape[-1]
    ci, n_boot, seed = check_ci_args(ci, n_boot, seed, n=n, cells=max(v.size // max(n, 1), 1))
    W = bootstrap_counts(n, n_boot, seed, strata)
    boot = (v.reshape(-1, n) @ W.T / n).T.reshape(n_boot, *v.shape[:-1])
    lo, hi = percentile_ci(boot, ci)
    return Interval(v.mean(-1), lo, hi, ci, n_boot, seed)


def per_group_ci(values: Any, labels: Any, n_groups: int, *, n_boot: int = DEFAULT_N_BOOT,
                 ci: float = DEFAULT_CI, seed: int = 0) -> Interval:
    """Per-group (per-task) means of ``values [..., n]`` with stratified bootstrap CIs: ``[..., n_groups]``."""
    from tvlens.checks import check_int

    n_groups = check_int(n_groups, "n_groups", minimum=1, where="per_group_ci")
    v = _np(values, np.float64)
    if v.ndim == 0:
        raise ConfigError(f"per_group_ci: values must be an array of per-prompt values [..., n], got the scalar {v}")
    labels = _labels(labels, v.shape[-1], n_groups)
    ci, n_boot, seed = check_ci_args(ci, n_boot, seed, n=v.shape[-1], cells=max(v.size // max(v.shape[-1], 1), 1) * n_groups)
    W = bootstrap_counts(v.shape[-1], n_boot, seed, labels)
    boot = group_means_boot(v, labels, n_groups, W)
    lo, hi = percentile_ci(boot, ci)
    return Interval(group_means(v, labels, n_groups), lo, hi, ci, n_boot, seed)


# --------------------------------------------------------------------------- kNN votes and the TD null
def knn_vote(nn_lab: Any, n_classes: int, tie_break: str = "lowest", seed: int = 0) -> np.ndarray:
    """Majority vote of neighbour labels ``[..., n, k]`` (nearest first) -> predicted class ``[..., n]``.

    Ties: ``"lowest"`` (the tied class with the lowest index, as scikit-learn's ``KNeighborsClassifier``,
    whose vote is a mode with ties to the smallest label), ``"nearest"`` (the tied class whose nearest
    neighbour comes first), ``"random"`` (a seeded random tied class).
    """
    if tie_break not in TIE_BREAKS:
        raise ConfigError(f"tie_break must be one of {list(TIE_BREAKS)}, got {tie_break!r}")
    lab = _np(nn_lab).astype(np.int64)
    k = lab.shape[-1]
    rows = lab.reshape(-1, k)
    flat = (np.arange(len(rows))[:, None] * n_classes + rows).ravel()
    votes = np.bincount(flat, minlength=len(rows) * n_classes).reshape(*lab.shape[:-1], n_classes)
    tied = votes == votes.max(-1, keepdims=True)
    if tie_break == "lowest":
        return tied.argmax(-1)
    if tie_break == "nearest":
        rank = np.full(len(rows) * n_classes, k)  # rank of each class's nearest neighbour
        np.minimum.at(rank, flat, np.tile(np.arange(k), len(rows)))
        return np.where(tied, rank.reshape(votes.shape), k + 1).argmin(-1)
    r = np.random.default_rng(seed).random(tied.shape)
    return np.where(tied, r, -1.0).argmax(-1)


@dataclass
class NullResult:
    """The shuffled-label null of a kNN decodability: per layer its mean, its ``q`` quantile and the
    p-value of the observed TD; ``samples [n_perm, layer]`` holds every permutation's TD."""

    mean: np.ndarray
    quantile: np.ndarray
    p_value: np.ndarray
    q: float
    n_perm: int
    seed: int
    samples: np.ndarray


def knn_permutation_null(neighbors: Any, labels: Any, n_classes: int, observed: Any = None, *,
                         n_perm: int = DEFAULT_N_PERM, q: float = 0.95, seed: int = 0,
                         tie_break: str = "lowest", chunk: int = 64, name: str = "n_perm") -> NullResult:
    """TD when the task labels are permuted over prompts, from precomputed neighbours.

    ``neighbors [layer, n, k]`` (or ``[n, k]``): each prompt's k nearest other prompts, nearest first.
    One permutation of the labels per resample is shared by all layers. ``observed [layer]``: the real
    TD, for the p-value ``(1 + #{null >= observed}) / (1 + n_perm)`` (NaN when not given).
    """
    q = check_ci(q, "q")
    seed = check_seed(seed)
    nn = _np(neighbors).astype(np.int64)
    squeeze = nn.ndim == 2
    if squeeze:
        nn = nn[None]
    n_perm = check_n_boot(n_perm, name, n=nn.shape[1], cells=nn.shape[0] * max(nn.shape[2], 1))
    y = _np(labels).reshape(-1).astype(np.int64)
    if nn.shape[1] != len(y):
        raise ConfigError(f"neighbors hold {nn.shape[1]} prompts but labels {len(y)}")
    rng = np.random.default_rng(seed)
    perms = np.stack([rng.permutation(y) for _ in range(n_perm)])  # [n_perm, n]
    out = np.empty((n_perm, nn.shape[0]))
    for s in range(0, n_perm, chunk):
        P = perms[s : s + chunk]  # [c, n]
        for li in range(nn.shape[0]):
            nn_lab = P[:, nn[li]]  # [c, n, k]
            pred = knn_vote(nn_lab, n_classes, tie_break, seed + s + li)
            out[s : s + len(P), li] = (pred == P).mean(-1)
    obs = np.full(nn.shape[0], np.nan) if observed is None else _np(observed, np.float64).reshape(-1)
    p = (1 + (out >= obs[None] - 1e-12).sum(0)) / (1 + n_perm)
    p = np.where(np.isnan(obs), np.nan, p)
    res = NullResult(out.mean(0), np.quantile(out, q, axis=0), p, q, n_perm, seed, out)
    if squeeze:
        res = NullResult(res.mean[0], res.quantile[0], res.p_value[0], q, n_perm, seed, out[:, 0])
    return res


# --------------------------------------------------------------------------- correlations and fits
def _rank_rows(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a, axis=-1)


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xc = x - x.mean(-1, keepdims=True)
    yc = y - y.mean(-1, keepdims=True)
    den = np.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1))
    with np.errstate(all="ignore"):
        return np.where(den > 0, (xc * yc).sum(-1) / np.where(den > 0, den, 1), np.nan)


def spearman_rows(x: Any, y: Any) -> np.ndarray:
    """Spearman correlation of each row pair of ``x, y [..., m]`` (NaN for a constant row)."""
    return _pearson_rows(_rank_rows(_np(x, np.float64)), _rank_rows(_np(y, np.float64)))


def _nan_note(x: np.ndarray, y: np.ndarray, ci: float, n_boot: int, seed: int) -> Interval | None:
    """A NaN interval with a note when x or y holds NaN/inf (a correlation over the other points would be
    another statistic; resamples that miss the bad point would give a CI of a number never computed)."""
    bad = ~(np.isfinite(x) & np.isfinite(y))
    if not bad.any():
        return None
    idx = np.flatnonzero(bad)[:5].tolist()
    nan = np.array(np.nan)
    return Interval(nan, nan, nan, ci, n_boot, seed,
                    note=f"{int(bad.sum())} of {len(x)} points hold NaN or inf (indices {idx}): the estimate and its "
                         "CI are NaN; drop those points to correlate the rest")


def spearman_ci(x: Any, y: Any, *, n_boot: int = DEFAULT_N_BOOT, ci: float = DEFAULT_CI,
                seed: int = 0) -> Interval:
    """Spearman correlation of paired points with a bootstrap CI over the points (pairs resampled)."""
    x, y = _np(x, np.float64).reshape(-1), _np(y, np.float64).reshape(-1)
    if len(x) != len(y):
        raise ConfigError(f"spearman_ci: x has {len(x)} points, y {len(y)}")
    ci, n_boot, seed = check_ci_args(ci, n_boot, seed, n=len(x), cells=len(x))
    bad = _nan_note(x, y, ci, n_boot, seed)
    if bad is not None:
        return bad
    est = float(spearman_rows(x, y)) if len(x) >= 2 else float("nan")
    if len(x) < 3:
        return Interval(np.array(est), np.array(np.nan), np.array(np.nan), ci, n_boot, seed,
                        note=f"{len(x)} point(s): a CI needs at least 3")
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    lo, hi = percentile_ci(spearman_rows(x[idx], y[idx]), ci)
    return Interval(np.array(est), lo, hi, ci, n_boot, seed)


def r2_rows(x: Any, y: Any) -> np.ndarray:
    """R² of the least-squares line of y on x, per row (the squared Pearson correlation)."""
    return _pearson_rows(_np(x, np.float64), _np(y, np.float64)) ** 2


def r2_ci(x: Any, y: Any, *, n_boot: int = DEFAULT_N_BOOT, ci: float = DEFAULT_CI, seed: int = 0) -> Interval:
    """R² of the linear fit of y on x with a bootstrap CI over the points (pairs resampled)."""
    x, y = _np(x, np.float64).reshape(-1), _np(y, np.float64).reshape(-1)
    if len(x) != len(y):
        raise ConfigError(f"r2_ci: x has {len(x)} points, y {len(y)}")
    ci, n_boot, seed = check_ci_args(ci, n_boot, seed, n=len(x), cells=len(x))
    bad = _nan_note(x, y, ci, n_boot, seed)
    if bad is not None:
        return bad
    est = float(r2_rows(x, y)) if len(x) >= 2 else float("nan")
    if len(x) < 3:
        return Interval(np.array(est), np.array(np.nan), np.array(np.nan), ci, n_boot, seed,
                        note=f"{len(x)} point(s): a CI needs at least 3")
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    lo, hi = percentile_ci(r2_rows(x[idx], y[idx]), ci)
    return Interval(np.array(est), lo, hi, ci, n_boot, seed)


__all__ = [
    "DEFAULT_CI",
    "DEFAULT_N_BOOT",
    "DEFAULT_N_PERM",
    "Interval",
    "NullResult",
    "bootstrap_counts",
    "check_ci",
    "check_ci_args",
    "check_n_boot",
    "check_seed",
    "group_means",
    "group_means_boot",
    "knn_permutation_null",
    "knn_vote",
    "mean_ci",
    "per_group_ci",
    "percentile_ci",
    "r2_ci",
    "r2_rows",
    "spearman_ci",
    "spearman_rows",
]
