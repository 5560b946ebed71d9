"""``sparse_regression``: the paper's mixture of sparse linear regressions (continuous inputs).

x ~ N(0, I_D); w ~ N(0, I_D) masked to one of ``n_bases`` disjoint coordinate bases of rank r
(basis b keeps coordinates b*r .. b*r+r-1); y = w.x + noise. A prompt of N = shots + 1 examples is
the sequence x_1, y_1, ..., x_N, y_N of (D+1)-dim vectors: an x-vector is [x, 0], a y-vector is
[0, ..., 0, y]. The model's scalar output at each x-vector predicts that example's y (trained at
every x, as in Garg et al. 2022); the query is x_N. The paper's defaults: D=16, r=4, 4 bases,
20 examples.
"""

from __future__ import annotations

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
