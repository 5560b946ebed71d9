"""Issue 14's bars on a sparse_regression run or shipped model, on fresh prompts, with their spread.

1. TD of the basis at an inner layer >= 0.8 at the last checkpoint; <= 0.35 at step 0 (mean and sd over
   prompt seeds; 100 prompts per basis, leave-one-out 10-NN);
2. Spearman >= 0.8 between TD (that layer) and the drop of query MSE across checkpoints;
3. query MSE below dense least squares at every shot count where dense LS is underdetermined
   (1 <= shots < D), with a bootstrap CI of the difference;
4. Fig. 7: ``tvlens.regression_patching`` at every inner layer (vectors from other prompts than the
   patched ones), swap and replace: cross-basis ``toward_source`` >= 0.5 at the best layer while the
   own-basis control stays within 10%.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/regression/check_bars.py RUN_DIR_OR_MODEL [--seeds 0 1 2]``
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import tvlens
from tvlens.models import _resolve_folder, list_checkpoints, load_checkpoint
from tvlens.tasks.sparse_regression import least_squares_baseline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", default=None)
    ap.add_argument("--toward", type=float, default=0.5,
                    help="bar 4's toward-source threshold (issue 14: 0.5; issue 18: 0.8, control within 10%%)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    folder = _resolve_folder(args.run)
    ckpts = list_checkpoints(folder)
    model = load_checkpoint(ckpts[-1][1])
    fam = tvlens.model_info(model).task_family()
    S = model.cfg.n_ctx // 2 - 1
    D = int(fam.params["D"])
    L = model.cfg.n_layers
    out: dict = {"run": args.run, "step": ckpts[-1][0], "shots": S, "seeds": args.seeds}

    def td_over_seeds(m):
        return np.stack([tvlens.task_decodability(m, fam.sample(args.n, shots=S, seed=9000 + s)).td.numpy()
                         for s in args.seeds])

    td = td_over_seeds(model)
    td0 = td_over_seeds(load_checkpoint(ckpts[0][1]))
    inner = list(range(1, L))
    best = inner[int(np.argmax(td.mean(0)[1:L]))]
    out.update(td_mean=td.mean(0).tolist(), td_sd=td.std(0).tolist(), td0_mean=td0.mean(0).tolist(),
               td0_sd=td0.std(0).tolist(), best_inner_layer=best)
    b1 = td.mean(0)[best] >= 0.8 and td0.mean(0)[best] <= 0.35
    print(f"[1] TD at inner layer {best}: {td.mean(0)[best]:.3f} ± {td.std(0)[best]:.3f} (step {ckpts[-1][0]}), "
          f"{td0.mean(0)[best]:.3f} ± {td0.std(0)[best]:.3f} at step 0 -> {'PASS' if b1 else 'FAIL'} (>= 0.8, <= 0.35)")

    em = tvlens.emergence(str(folder), shots=S, n_per_task=args.n, seed=4242, progress=False)
    rho = em.spearman(best)
    out["spearman"] = rho
    out["emergence_td_best_layer"] = em.td_at(best).tolist()
    print(f"[2] Spearman(TD at layer {best}, -MSE) over {len(em.steps)} checkpoints: {rho:.3f} -> "
          f"{'PASS' if rho >= 0.8 else 'FAIL'} (>= 0.8)")

    rows, b3 = [], True
    for k in range(1, min(D, S + 1)):
        p = fam.sample(250, shots=k, seed=5000 + k)
        m = tvlens.icl_accuracy(model, p).per_prompt.double().numpy()
        dls = least_squares_baseline(p).double().numpy()
        rng = np.random.default_rng(k)
        idx = rng.integers(0, len(m), (1000, len(m)))
        diff = (m[idx] - dls[idx]).mean(1)
        lo, hi = np.quantile(diff, [0.025, 0.975])
        ok = hi < 0
        b3 &= bool(ok)
        rows.append({"shots": k, "model": float(m.mean()), "dense_ls": float(dls.mean()), "diff_ci": [lo, hi]})
        print(f"    shots {k}: model {m.mean():.3f}, dense LS {dls.mean():.3f}, model - dense 95% CI [{lo:.3f}, {hi:.3f}]")
    out["mse_vs_dense"] = rows
    print(f"[3] model MSE below dense LS at every underdetermined shot count -> {'PASS' if b3 else 'FAIL'}")

    fig7 = {}
    for mode in ("swap", "replace"):
        tw, ctl = [], []
        for s in args.seeds:
            vec_p = fam.sample(args.n, shots=S, seed=7000 + s)
            tgt_p = fam.sample(args.n, shots=S, seed=8000 + s)
            vecs = tvlens.extract(model, vec_p, progress=False).task_vectors()
            res = tvlens.regression_patching(model, tgt_p, vecs, layers=inner, mode=mode)
            tw.append(res.cross_toward_source.numpy())
            ctl.append(res.control.numpy())
            floor = float(res.zero_floor[~torch.eye(4, dtype=torch.bool)].mean())
        tw, ctl = np.stack(tw), np.stack(ctl)
        fig7[mode] = {"zero_floor_last_seed": floor, "toward_source_mean": tw.mean(0).tolist(), "toward_source_sd": tw.std(0).tolist(),
                      "control_mean": ctl.mean(0).tolist(), "control_sd": ctl.std(0).tolist(), "layers": inner}
        cells = "  ".join(f"L{layer} toward {tw.mean(0)[i]:+.3f}±{tw.std(0)[i]:.3f} control {ctl.mean(0)[i]:+.3f}"
                          for i, layer in enumerate(inner))
        print(f"    {mode:8s} (predicting 0 scores {floor:+.3f}): {cells}")
    ok_layers = [(mode, i) for mode in fig7 for i in range(len(inner))
                 if abs(fig7[mode]["control_mean"][i]) <= 0.1 and fig7[mode]["toward_source_mean"][i] >= args.toward]
    out["fig7"] = fig7
    print(f"[4] Fig. 7: toward source >= {args.toward} with own-basis control within 10% at some inner layer -> "
          f"{'PASS ' + str([(m, inner[i]) for m, i in ok_layers]) if ok_layers else 'FAIL'}")
    out["bars_met"] = bool(b1 and rho >= 0.8 and b3 and ok_layers)
    print(f"all bars met: {out['bars_met']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=float)


if __name__ == "__main__":
    main()
