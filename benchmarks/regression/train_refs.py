"""What the training loss of a curriculum run should be read against: for each curriculum state of a
TrainConfig, the loss (MSE averaged over every trained position, as ``answer_loss``) of predicting 0, of
dense least squares (minimum norm) and of the basis-aware estimators on that state's training prompts.

Run: ``PYTHONPATH=. python benchmarks/regression/train_refs.py benchmarks/regression/curriculum_D16.json [--n 64]``
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import torch

from tvlens.tasks.sparse_regression import basis_aware_predictions
from tvlens.train import TrainConfig, batch_for_step, curriculum_at


def position_losses(p, k: int) -> dict[str, float]:
    """Squared errors at example k (k examples before it) of the reference predictors."""
    q = replace(p, inputs=p.inputs[:, : 2 * (k + 1)], targets=p.targets[:, : 2 * (k + 1)],
                train_mask=p.train_mask[:, : 2 * (k + 1)], answers=p.targets[:, 2 * k: 2 * k + 1], shots=k,
                query_pos=p.query_pos * 0 + 2 * k)
    D = p.inputs.shape[-1] - 1
    ans = q.answers[:, 0].double()
    X, y, xq = q.inputs[:, 0:-2:2, :D].double(), q.inputs[:, 1:-2:2, D].double(), q.inputs[:, -2, :D].double()
    dense = (xq.unsqueeze(1) @ (torch.linalg.pinv(X) @ y.unsqueeze(-1))).flatten() if k else 0 * ans
    # dense LS (minimum norm) blows up near k = dims (double descent) and best-fit near k = r: medians beside means
    out = {"zero": float((ans ** 2).mean()), "dense_ls": float(((dense - ans) ** 2).mean()),
           "dense_ls_median": float(((dense - ans) ** 2).median())}
    out["bayes"] = float(((basis_aware_predictions(q, "bayes") - ans) ** 2).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--n", type=int, default=64, help="prompts per basis per state")
    args = ap.parse_args()
    cfg = TrainConfig.from_dict(json.load(open(args.config)))
    cfg = TrainConfig(**{**cfg.__dict__, "batch_size": args.n * cfg.build_family().n_tasks})
    fam = cfg.build_family()
    seen, step = [], 0
    while True:
        st = curriculum_at(cfg, step)
        if st not in seen:
            seen.append(st)
            p = batch_for_step(fam, cfg, step)
            rows = [position_losses(p, k) for k in range(p.shots + 1)]
            mean = {m: np.mean([r[m] for r in rows]) for m in rows[0]}
            print(f"from step {step:6d} {st}: loss over all positions  " +
                  "  ".join(f"{m} {v:.3f}" for m, v in mean.items()), flush=True)
        if st.get("dims", 0) >= fam.params.get("D", 0) and st["shots"] >= cfg.shots or step > 10 ** 6:
            break
        step += 100


if __name__ == "__main__":
    main()
