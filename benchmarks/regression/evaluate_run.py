"""Evaluate a sparse_regression training run (or shipped model): MSE per shot count next to dense and
basis-aware least squares, TD per layer (final and step 0) over several prompt seeds, and the
Spearman correlation between TD and the MSE drop across checkpoints.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/regression/evaluate_run.py RUN_DIR [--n 100] [--seeds 0 1 2]``
Prints a table and writes ``--json`` (optional) with every number it prints.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import tvlens
from tvlens.models import list_checkpoints, load_checkpoint
from tvlens.tasks.sparse_regression import basis_aware_baseline, least_squares_baseline


def boot_ci(x: np.ndarray, seed: int = 0, n: int = 1000) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (n, len(x)))].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


@torch.no_grad()
def mse_by_shots(model, family, shots_list, n_per_task, seed):
    rows = []
    for k in shots_list:
        p = family.sample(n_per_task, shots=k, seed=seed + 1000 * k)
        acc = tvlens.icl_accuracy(model, p)
        m = acc.per_prompt.double().numpy()
        rows.append({
            "shots": k, "model": float(m.mean()), "model_ci": boot_ci(m, seed),
            "dense_ls": float(least_squares_baseline(p).mean()),
            "basis_best_fit": float(basis_aware_baseline(p).mean()),
            "basis_bayes": float(basis_aware_baseline(p, method="bayes").mean()),
        })
    return rows


def td_seeds(model, family, shots, n_per_task, seeds):
    tds = []
    for s in seeds:
        p = family.sample(n_per_task, shots=shots, seed=777 + s)
        tds.append(tvlens.task_decodability(model, p).td.numpy())
    return np.stack(tds)  # [seed, layer]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=100, help="prompts per task")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-emergence", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    from tvlens.models import _resolve_folder

    folder = _resolve_folder(args.run)
    ckpts = list_checkpoints(folder)
    last_step, last_path = ckpts[-1]
    model = load_checkpoint(last_path)
    family = tvlens.model_info(model).task_family()
    cfg = json.loads((folder / "train_config.json").read_text()) if (folder / "train_config.json").exists() else {}
    S = int(cfg.get("shots", model.cfg.n_ctx // 2 - 1))
    out = {"run": str(args.run), "family": family.config(), "last_step": last_step, "shots": S, "seeds": args.seeds}
    print(f"== {args.run}: {family!r}, {model.cfg.n_layers} layers, d_model {model.cfg.d_model}, step {last_step}")
    rows = mse_by_shots(model, family, list(range(0, S + 1)), args.n, seed=args.seeds[0])
    out["mse_by_shots"] = rows
    print("shots  model [95% CI]          dense_LS  basis_best_fit  basis_bayes")
    for r in rows:
        print(f"{r['shots']:5d}  {r['model']:.3f} [{r['model_ci'][0]:.3f}, {r['model_ci'][1]:.3f}]   "
              f"{r['dense_ls']:8.3f}  {r['basis_best_fit']:14.3f}  {r['basis_bayes']:11.3f}")
    td = td_seeds(model, family, S, args.n, args.seeds)
    td0 = td_seeds(load_checkpoint(ckpts[0][1]), family, S, args.n, args.seeds) if ckpts[0][0] == 0 else None
    out["td_final_mean"] = td.mean(0).tolist()
    out["td_final_sd"] = td.std(0).tolist()
    print(f"TD per layer at step {last_step} ({args.n}/task, {S} shots, seeds {args.seeds}): "
          + "  ".join(f"L{i} {m:.3f}±{s:.3f}" for i, (m, s) in enumerate(zip(td.mean(0), td.std(0)))))
    if td0 is not None:
        out["td_step0_mean"] = td0.mean(0).tolist()
        out["td_step0_sd"] = td0.std(0).tolist()
        print("TD per layer at step 0: " + "  ".join(f"L{i} {m:.3f}±{s:.3f}" for i, (m, s) in
                                                    enumerate(zip(td0.mean(0), td0.std(0)))))
    if not args.no_emergence:
        em = tvlens.emergence(str(folder), shots=S, n_per_task=args.n, seed=4242, progress=False)
        out["emergence"] = {"steps": em.steps, "mse": em.mean_metric.tolist(), "td": em.td.tolist(),
                            "best_layer": em.best_layer, "spearman_best_layer": em.spearman()}
        out["spearman_by_layer"] = {int(L): em.spearman(L) for L in em.layers}
        print(f"emergence (seed 4242, {args.n}/task): best layer {em.best_layer}, Spearman(TD, -MSE) "
              + ", ".join(f"L{L} {em.spearman(L):.3f}" for L in em.layers))
        for s, m, t in zip(em.steps, em.mean_metric.tolist(), em.td.tolist()):
            print(f"  step {s:6d}  mse {m:.3f}  TD " + " ".join(f"{v:.2f}" for v in t))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(f"[{out['seconds']} s]")


if __name__ == "__main__":
    main()
