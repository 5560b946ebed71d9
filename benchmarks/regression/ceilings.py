"""What each sparse_regression design offers a model that infers the basis, before any training.

Per (D, r, shots), on fresh prompts (4 bases, noise 0.1): query MSE of dense least squares, of the
best-fit basis-aware estimator and of the Bayes posterior mean; and how often the best-fitting basis is
the true one (a ceiling for the TD any representation of the inferred basis can reach). Mean ± sd over
prompt seeds.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/regression/ceilings.py [--n 500] [--seeds 0 1 2]``
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from tvlens import tasks
from tvlens.tasks.sparse_regression import basis_aware_baseline, basis_fits, least_squares_baseline

DESIGNS = [(4, 1, [1, 2, 3]), (8, 2, [3, 5, 7, 9]), (16, 4, [5, 7, 9, 15, 19])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="prompts per basis")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("  D  r  shots  dense_LS        best_fit        bayes           best-fit basis correct")
    for D, r, shots in DESIGNS:
        fam = tasks.get("sparse_regression", D=D, r=r, n_bases=4)
        for k in shots:
            vals = []
            for s in args.seeds:
                p = fam.sample(args.n, shots=k, seed=100 * s + k)
                _, rss = basis_fits(p)
                vals.append([float(least_squares_baseline(p).mean()), float(basis_aware_baseline(p).mean()),
                             float(basis_aware_baseline(p, method="bayes").mean()),
                             float((rss.argmin(1) == p.labels).float().mean())])
            v = np.array(vals)
            print(f"{D:3d} {r:2d} {k:6d}  " + "  ".join(f"{m:6.3f} ± {sd:5.3f}" for m, sd in zip(v.mean(0), v.std(0))))


if __name__ == "__main__":
    main()
