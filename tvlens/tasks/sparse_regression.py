"""``sparse_regression``: the paper's mixture of sparse linear regressions (continuous inputs).

x ~ N(0, I_D); w ~ N(0, I_D) masked to one of ``n_bases`` disjoint coordinate bases of rank r
(basis b keeps coordinates b*r .. b*r+r-1); y = w.x + noise. A prompt of N = shots + 1 examples is
the sequence x_1, y_1, ..., x_N, y_N of (D+1)-dim vectors: an x-vector is [x, 0], a y-vector is
[0, ..., 0, y]. The model's scalar output at each x-vector predicts that example's y (trained at
every x, as in Garg et al. 2022); the query is x_N. The paper's defaults: D=16, r=4, 4 bases,
20 examples.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from tvlens.errors import ConfigError
from tvlens.prompts import PromptSet
from tvlens.tasks.base import TaskFamily, check_int


class SparseRegression(TaskFamily):
    name = "sparse_regression"
    continuous = True

    def __init__(self, D: int = 16, r: int = 4, n_bases: int = 4, noise_std: float = 0.1) -> None:
        D = check_int("D", D, 1, self.name)
        r = check_int("r", r, 1, self.name)
        n_bases = check_int("n_bases", n_bases, 1, self.name)
        if D % r:
            raise ConfigError(f"sparse_regression: r={r} must divide D={D} (bases are disjoint rank-r blocks)")
        if n_bases > D // r:
            raise ConfigError(
                f"sparse_regression: n_bases={n_bases} disjoint rank-{r} bases do not fit in D={D} "
                f"(at most {D // r})"
            )
        if not noise_std >= 0:
            raise ConfigError(f"sparse_regression: noise_std must be >= 0, got {noise_std}")
        super().__init__(D=D, r=r, n_bases=n_bases, noise_std=float(noise_std))
        self.D, self.r, self.n_bases, self.noise_std = D, r, n_bases, float(noise_std)

    @property
    def task_names(self) -> list[str]:
        return [f"basis{b}" for b in range(self.n_bases)]

    @property
    def d_in(self) -> int:
        return self.D + 1

    def basis_mask(self, b: int) -> torch.Tensor:
        m = torch.zeros(self.D)
        m[b * self.r : (b + 1) * self.r] = 1
        return m

    def _sample(self, labels, shots, rng):
        n, N, D = len(labels), shots + 1, self.D
        x = rng.standard_normal((n, N, D)).astype(np.float32)
        w = rng.standard_normal((n, D)).astype(np.float32)
        mask = np.zeros((n, D), dtype=np.float32)
        for i, b in enumerate(labels):
            mask[i, b * self.r : (b + 1) * self.r] = 1
        w = w * mask
        y = np.einsum("nkd,nd->nk", x, w) + self.noise_std * rng.standard_normal((n, N)).astype(np.float32)
        inputs = np.zeros((n, 2 * N, D + 1), dtype=np.float32)
        inputs[:, 0::2, :D] = x
        inputs[:, 1::2, D] = y
        targets = np.zeros((n, 2 * N), dtype=np.float32)
        targets[:, 0::2] = y
        train_mask = np.zeros((n, 2 * N), dtype=bool)
        train_mask[:, 0::2] = True
        return PromptSet(
            family=self.name,
            params=dict(self.params),
            task_names=self.task_names,
            labels=torch.as_tensor(labels, dtype=torch.long),
            query_pos=torch.full((n,), 2 * N - 2, dtype=torch.long),
            answers=torch.as_tensor(y[:, -1:]),
            targets=torch.as_tensor(targets),
            train_mask=torch.as_tensor(train_mask),
            shots=shots,
            inputs=torch.as_tensor(inputs),
            extra={"w": torch.as_tensor(w)},
        )


def restrict_dims(prompts: PromptSet, dims: int) -> PromptSet:
    """The prompts with coordinates ``dims..D-1`` set to zero in every x and in w (a curriculum's
    smaller problem, as in Garg et al. 2022): each y loses those coordinates' share of w.x and keeps
    its noise. ``dims >= D`` returns the prompts unchanged."""
    X, _, _, _, (D, _, _, _) = _regression_arrays(prompts, "restrict_dims")
    if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
        raise ConfigError(f"restrict_dims: dims must be an int >= 1 (the coordinates kept), got {dims!r}")
    if dims >= D:
        return prompts
    if "w" not in prompts.extra:
        raise ConfigError("restrict_dims needs the prompts' weights (extra['w']): sample them from the family")
    inputs, w = prompts.inputs.clone(), prompts.extra["w"].clone()
    x = inputs[:, 0::2, :D]
    y = inputs[:, 1::2, D] - torch.einsum("nkd,nd->nk", x[..., dims:], w[:, dims:])
    inputs[:, 0::2, dims:D] = 0
    inputs[:, 1::2, D] = y
    w[:, dims:] = 0
    targets = prompts.targets.clone()
    targets[:, 0::2] = y
    return replace(prompts, inputs=inputs, targets=targets, answers=y[:, -1:].clone(), extra={**prompts.extra, "w": w})


def least_squares_baseline(prompts: PromptSet, ridge: float = 0.0) -> torch.Tensor:
    """Per-prompt squared error at the query of dense least squares fit on the query's examples.

    Uses the minimum-norm solution (pseudo-inverse) when there are fewer examples than dimensions.
    """
    if prompts.inputs is None:
        raise ConfigError("least_squares_baseline needs a continuous (regression) PromptSet")
    D = prompts.inputs.shape[-1] - 1
    X = prompts.inputs[:, 0:-2:2, :D].double()  # context examples
    y = prompts.inputs[:, 1:-2:2, D].double()
    xq = prompts.inputs[:, -2, :D].double()
    if X.shape[1] == 0:
        pred = torch.zeros(len(prompts), dtype=torch.float64)
    elif ridge > 0:
        eye = torch.eye(D, dtype=torch.float64)
        w = torch.linalg.solve(X.transpose(1, 2) @ X + ridge * eye, X.transpose(1, 2) @ y.unsqueeze(-1))
        pred = (xq.unsqueeze(1) @ w).flatten()
    else:
        w = torch.linalg.pinv(X) @ y.unsqueeze(-1)
        pred = (xq.unsqueeze(1) @ w).flatten()
    return ((pred - prompts.answers[:, 0].double()) ** 2).float()


def _regression_arrays(prompts: PromptSet, what: str):
    """Context examples ``X [n, k, D]``, ``y [n, k]``, query ``xq [n, D]`` and answers (float64) of
    a ``sparse_regression`` PromptSet, and its family parameters ``(D, r, n_bases, noise_std)``."""
    if not isinstance(prompts, PromptSet):
        raise ConfigError(f"{what}: prompts must be a PromptSet, got {type(prompts).__name__}")
    if prompts.inputs is None:
        raise ConfigError(f"{what} needs a continuous (regression) PromptSet, got {prompts.family!r} token prompts")
    p = prompts.params
    missing = [k for k in ("D", "r", "n_bases") if k not in p]
    if missing:
        raise ConfigError(
            f"{what} needs sparse_regression prompts (their params name D, r and n_bases); "
            f"{prompts.family!r} prompts lack {missing}: sample them from tvlens.tasks.get('sparse_regression')"
        )
    D, r, nb = int(p["D"]), int(p["r"]), int(p["n_bases"])
    if prompts.inputs.shape[-1] != D + 1:
        raise ConfigError(f"{what}: prompts say D={D} but their vectors have {prompts.inputs.shape[-1]} entries "
                          f"(expected D+1={D + 1})")
    inp = prompts.inputs.detach().cpu().double()
    X, y, xq = inp[:, 0:-2:2, :D], inp[:, 1:-2:2, D], inp[:, -2, :D]
    return X, y, xq, prompts.answers[:, 0].detach().cpu().double(), (D, r, nb, float(p.get("noise_std", 0.0)))


def basis_fits(prompts: PromptSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares restricted to each basis, fit on each prompt's context examples.

    Returns ``(pred, rss)``, both ``[n_prompts, n_bases]`` float64: ``pred[i, b]`` is the query
    prediction of least squares on basis b's r coordinates (the minimum-norm solution when there are
    fewer examples than r; 0 with no examples), ``rss[i, b]`` its residual sum of squares on the
    examples. ``pred[i, a]`` on a basis-b prompt is "basis A's restricted least-squares solution"
    that Fig. 7's patching is scored against.
    """
    X, y, xq, _, (D, r, nb, _) = _regression_arrays(prompts, "basis_fits")
    n, k = X.shape[0], X.shape[1]
    pred = torch.zeros(n, nb, dtype=torch.float64)
    rss = torch.zeros(n, nb, dtype=torch.float64)
    if k == 0:
        return pred, rss
    for b in range(nb):
        sl = slice(b * r, (b + 1) * r)
        Xb = X[..., sl]
        w = torch.linalg.pinv(Xb) @ y.unsqueeze(-1)  # [n, r, 1]
        pred[:, b] = (xq[:, None, sl] @ w).flatten()
        rss[:, b] = ((Xb @ w).squeeze(-1) - y).pow(2).sum(-1)
    return pred, rss


def basis_aware_predictions(prompts: PromptSet, method: str = "best_fit") -> torch.Tensor:
    """Query predictions (float64, ``[n_prompts]``) of an estimator that knows the family's bases.

    - ``"best_fit"``: the basis whose restricted least squares leaves the smallest residual on the
      examples, then that fit's prediction. Bases whose residuals agree within 1e-9 (relative; e.g.
      all fit exactly when there are at most r examples) are tied and the lowest index wins.
    - ``"bayes"``: the posterior mean under the family's own prior (uniform basis, w ~ N(0, I_r) on
      it, Gaussian noise of ``noise_std``, floored at 1e-3): the lowest expected squared error any
      estimator can reach on these prompts.
    """
    if method not in ("best_fit", "bayes"):
        raise ConfigError(f"basis_aware_predictions: method must be 'best_fit' or 'bayes', got {method!r}")
    X, y, xq, _, (D, r, nb, noise) = _regression_arrays(prompts, "basis_aware_predictions")
    n, k = X.shape[0], X.shape[1]
    if k == 0:
        return torch.zeros(n, dtype=torch.float64)
    if method == "best_fit":
        pred, rss = basis_fits(prompts)
        tol = 1e-9 * (1.0 + rss.max(1, keepdim=True).values)
        tied = rss <= rss.min(1, keepdim=True).values + tol
        pick = tied.double().argmax(1)  # the first (lowest-index) tied basis
        return pred[torch.arange(n), pick]
    s2 = max(noise, 1e-3) ** 2
    logml = torch.zeros(n, nb, dtype=torch.float64)
    mean = torch.zeros(n, nb, dtype=torch.float64)
    eye_k = torch.eye(k, dtype=torch.float64)
    eye_r = torch.eye(r, dtype=torch.float64)
    for b in range(nb):
        sl = slice(b * r, (b + 1) * r)
        Xb = X[..., sl]
        cov = Xb @ Xb.transpose(1, 2) + s2 * eye_k  # marginal covariance of y under basis b
        chol = torch.linalg.cholesky(cov)
        alpha = torch.cholesky_solve(y.unsqueeze(-1), chol)
        logml[:, b] = -0.5 * (y.unsqueeze(1) @ alpha).flatten() - torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(-1)
        w = torch.linalg.solve(Xb.transpose(1, 2) @ Xb + s2 * eye_r, Xb.transpose(1, 2) @ y.unsqueeze(-1))
        mean[:, b] = (xq[:, None, sl] @ w).flatten()
    post = torch.softmax(logml, dim=1)
    return (post * mean).sum(1)


def basis_aware_baseline(prompts: PromptSet, method: str = "best_fit") -> torch.Tensor:
    """Per-prompt squared error at the query of ``basis_aware_predictions`` (float32), the companion of
    ``least_squares_baseline`` (dense): a model that infers the basis approaches this one."""
    pred = basis_aware_predictions(prompts, method=method)
    _, _, _, ans, _ = _regression_arrays(prompts, "basis_aware_baseline")
    return ((pred - ans) ** 2).float()
