"""Is the basis linearly readable where kNN TD is at chance? A cross-validated logistic-regression probe
of the basis on the query representation, per layer, next to kNN TD, on fresh prompts.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/regression/probe.py RUN_DIR [--steps 0 6655] [--seeds 0 1 2]``
(``--at answers``: the mean over the examples' y tokens). 5-fold CV accuracy, 200 prompts per basis per seed;
chance 0.25. Also probes the prompts' raw
sufficient statistic g = sum_k x_k y_k (what a model that inferred the basis would need) as a ceiling.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import tvlens
from tvlens.models import _resolve_folder, list_checkpoints, load_checkpoint


def probe_acc(X: np.ndarray, y: np.ndarray, seed: int) -> float:
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=seed))
    return float(cross_val_score(clf, X, y, cv=5).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--steps", type=int, nargs="*", default=None, help="default: first and last checkpoint")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--at", default="query", choices=["query", "answers"],
                    help="read the query position, or the mean over the examples' answer (y) tokens")
    ap.add_argument("--null", type=int, default=200, help="label permutations for the shuffled-label null (0: none)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ckpts = dict(list_checkpoints(_resolve_folder(args.run)))
    steps = args.steps or [min(ckpts), max(ckpts)]
    for step in steps:
        model = load_checkpoint(ckpts[step])
        fam = tvlens.model_info(model).task_family()
        S = model.cfg.n_ctx // 2 - 1
        D = int(fam.params["D"])
        probes, tds, raw, nulls, cis = [], [], [], [], []
        for s in args.seeds:
            p = fam.sample(args.n, shots=S, seed=31000 + s)
            enc = tvlens.extract(model, p, progress=False, at=args.at)
            y = p.labels.numpy()
            probes.append([probe_acc(enc.at(L).numpy(), y, s) for L in enc.layers])
            res = tvlens.task_decodability(enc, null=args.null, ci_seed=s)
            tds.append(res.td.numpy())
            cis.append(res.td_ci.numpy())
            if args.null:
                nulls.append(res.null_quantile.numpy())
            X, Y = p.inputs[:, 0:-2:2, :D], p.inputs[:, 1:-2:2, D]
            g = (X * Y[..., None]).sum(1).numpy()
            raw.append(probe_acc(np.concatenate([g, np.abs(g)], 1), y, s))
        pr, td = np.array(probes), np.array(tds)
        print(f"== {args.run} step {step}, read at {args.at} ({S} shots, {args.n}/basis, seeds {args.seeds}); mean ± sd over seeds")
        for i in range(pr.shape[1]):
            ci = np.array(cis)[0][:, i]
            nl = f"   shuffled-label null q95 {np.mean([n[i] for n in nulls]):.3f}" if nulls else ""
            print(f"  layer {i}: linear probe {pr[:, i].mean():.3f} ± {pr[:, i].std():.3f}   kNN TD "
                  f"{td[:, i].mean():.3f} ± {td[:, i].std():.3f} (seed {args.seeds[0]} 95% CI [{ci[0]:.3f}, {ci[1]:.3f}]){nl}")
        print(f"  probe on the prompts' statistic [g, |g|], g = sum_k x_k y_k: {np.mean(raw):.3f} ± {np.std(raw):.3f}")


if __name__ == "__main__":
    main()
