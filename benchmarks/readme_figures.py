"""Every figure the README quotes about the shipped models, over several prompt seeds, with its CI.

For each figure: its value at every prompt seed, the spread over seeds (min-max) and each seed's 95%
bootstrap CI over prompts (stratified by task, 1000 resamples, bootstrap seed 0; ``tvlens.stats``).
TD is leave-one-out 10-NN with scikit-learn's tie-break (``tie_break="lowest"``, the default).

Run: ``.venv/bin/python benchmarks/readme_figures.py`` (``--seeds 0 777 2024``, ``--json out.json``,
``--only table transition patching td_accuracy``). One torch thread; about 6 minutes of CPU time on
one core (half of it the 36 checkpoints x 3 seeds of the default run's transition; 19 minutes of
wall time on a shared, loaded 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch

import tvlens

N_PER_TASK = 100
SHOTS = 4
LOG_AND_250 = {0, 1, 2, 5, 11, 25, 55, 122, 272, 605, 1347, 3000, 250, 500, 750, 1000, 1250, 1500, 1750, 2000,
               2250, 2500, 2750}
OUT: dict[str, dict] = {}


def show(name: str, values: list[float], cis: list[tuple[float, float]] | None, seeds: list[int], digits: int = 3):
    """One figure: per seed value [CI], and the spread over seeds."""
    v = np.asarray(values, dtype=float)
    per = ", ".join(f"{s}: {x:.{digits}f}" + ("" if cis is None else f" [{c[0]:.{digits}f}, {c[1]:.{digits}f}]")
                    for s, x, c in zip(seeds, v, cis or [None] * len(v)))
    print(f"  {name}: {v.min():.{digits}f}-{v.max():.{digits}f} over seeds (mean {v.mean():.{digits}f}); {per}")
    OUT[name] = {"values": v.tolist(), "seeds": seeds, "cis": cis, "min": float(v.min()), "max": float(v.max()),
                 "mean": float(v.mean())}


def acc_and_td(model, prompts):
    acc = tvlens.icl_accuracy(model, prompts).with_ci()
    td = tvlens.task_decodability(tvlens.extract(model, prompts, progress=False))
    return acc, td


def shipped_table(seeds):
    print("== shipped models: 4-shot accuracy (non-null tasks) and TD by layer, trained and at step 0")
    for name in ("codes", "categories", "bitwise"):
        final, step0 = tvlens.load_model(name), tvlens.load_model(name, step=0)
        fam = tvlens.model_info(final).task_family()
        rows: dict[str, list] = {}
        for s in seeds:
            p = fam.sample(N_PER_TASK, shots=SHOTS, seed=s)
            acc, td = acc_and_td(final, p)
            td0 = tvlens.task_decodability(tvlens.extract(step0, p, progress=False))
            real = [j for j, t in enumerate(acc.task_names) if t != "null"]
            rows.setdefault("acc mean", []).append((acc.mean, acc.mean_ci))
            worst = min(real, key=lambda j: acc.per_task[acc.task_names[j]])
            rows.setdefault("acc worst task", []).append(
                (acc.per_task[acc.task_names[worst]], tuple(float(x) for x in acc.per_task_ci[:, worst])))
            for i, L in enumerate(td.layers):
                rows.setdefault(f"TD L{L} trained", []).append((float(td.td[i]), tuple(float(x) for x in td.td_ci[:, i])))
            for i, L in enumerate(td0.layers):
                rows.setdefault(f"TD L{L} step 0", []).append((float(td0.td[i]), tuple(float(x) for x in td0.td_ci[:, i])))
        print(f" {name} ({len(fam.task_names)} tasks, chance {1 / len(fam.task_names):.3f})")
        for k, vals in rows.items():
            show(f"{name} {k}", [v for v, _ in vals], [c for _, c in vals], seeds, 2)
    # the finetuning section's starting points (bitwise, partly trained checkpoints)
    for step in (272, 605):
        m = tvlens.load_model("bitwise", step=step)
        fam = tvlens.model_info(m).task_family()
        a, t = [], []
        for s in seeds:
            acc, td = acc_and_td(m, fam.sample(N_PER_TASK, shots=SHOTS, seed=s))
            a.append((acc.mean, acc.mean_ci))
            b = td.layers.index(td.best_layer)
            t.append((td.best_td, tuple(float(x) for x in td.td_ci[:, b])))
        show(f"bitwise step {step} acc mean", [v for v, _ in a], [c for _, c in a], seeds, 2)
        show(f"bitwise step {step} best TD", [v for v, _ in t], [c for _, c in t], seeds, 2)


def _subset(em, keep):
    idx = [i for i, s in enumerate(em.steps) if s in keep]
    it = torch.tensor(idx)
    return replace(em, steps=[em.steps[i] for i in idx], per_task_metric=em.per_task_metric[it],
                   mean_metric=em.mean_metric[it], td=em.td[it], td_per_task=em.td_per_task[it],
                   per_prompt_metric=em.per_prompt_metric[it], td_correct=em.td_correct[it], mean_metric_ci=None,
                   per_task_metric_ci=None, td_ci=None, spearman_ci=None)


def transition(seeds):
    print("== default (codes) run: accuracy and TD (best layer) through the transition; Spearman over steps")
    rows: dict[str, list] = {}
    for s in seeds:
        em = tvlens.emergence("default", n_per_task=N_PER_TASK, shots=SHOTS, seed=s, progress=False).with_ci()
        b = em.layers.index(em.best_layer)
        for step in (1000, 1150, 1300, 1500):
            i = em.steps.index(step)
            rows.setdefault(f"step {step} acc", []).append(
                (float(em.mean_metric[i]), tuple(float(x) for x in em.mean_metric_ci[:, i])))
            rows.setdefault(f"step {step} TD L{em.best_layer}", []).append(
                (float(em.td[i, b]), tuple(float(x) for x in em.td_ci[:, i, b])))
        rows.setdefault(f"Spearman all {len(em.steps)} steps", []).append((em.spearman(), em.spearman_ci))
        sub = _subset(em, LOG_AND_250).with_ci()
        rows.setdefault(f"Spearman {len(sub.steps)} log-spaced + every-250 steps", []).append(
            (sub.spearman(), sub.spearman_ci))
    for k, vals in rows.items():
        show(f"default {k}", [v for v, _ in vals], [c for _, c in vals], seeds, 2)


def patching(seeds):
    print("== task-vector patching (vectors from the same prompts; 50 prompts per task)")
    rows: dict[str, list] = {}
    for s in seeds:
        model = tvlens.load_model("default")
        fam = tvlens.model_info(model).task_family()
        p = fam.sample(50, shots=SHOTS, seed=s)
        vq = tvlens.extract(model, p, progress=False).task_vectors()
        for mode in ("swap", "replace"):
            r = tvlens.run_patching(model, p, vq, mode=mode, progress=False).with_ci()
            li = int(torch.argmax(r.flip_rate))
            rows.setdefault(f"default query {mode}: max flip rate over layers", []).append(
                (float(r.flip_rate[li]), tuple(float(x) for x in r.flip_rate_ci[:, li])))
            lc = int(torch.argmin(r.control))
            rows.setdefault(f"default query {mode}: min own-task control", []).append(
                (float(r.control[lc]), tuple(float(x) for x in r.control_ci[:, lc])))
        va = tvlens.extract(model, p, progress=False, at="answers").task_vectors()
        r = tvlens.run_patching(model, p, va, layers=[1], mode="replace", progress=False).with_ci()
        li = r.layers.index(1)
        rows.setdefault("default answers replace: layer 1 flip rate", []).append(
            (float(r.flip_rate[li]), tuple(float(x) for x in r.flip_rate_ci[:, li])))
        rows.setdefault("default answers replace: layer 1 control", []).append(
            (float(r.control[li]), tuple(float(x) for x in r.control_ci[:, li])))
        cats = tvlens.load_model("categories")
        pc = tvlens.model_info(cats).task_family().sample(50, shots=SHOTS, seed=s)
        vc = tvlens.extract(cats, pc, progress=False).task_vectors()
        for mode in ("swap", "replace"):
            r = tvlens.run_patching(cats, pc, vc, layers=[0, 1], mode=mode, progress=False).with_ci()
            for L in (0, 1):
                li = r.layers.index(L)
                rows.setdefault(f"categories {mode} layer {L} flip rate", []).append(
                    (float(r.flip_rate[li]), tuple(float(x) for x in r.flip_rate_ci[:, li])))
                rows.setdefault(f"categories {mode} layer {L} control", []).append(
                    (float(r.control[li]), tuple(float(x) for x in r.control_ci[:, li])))
    for k, vals in rows.items():
        show(k, [v for v, _ in vals], [c for _, c in vals], seeds, 3)


def td_accuracy(seeds):
    print("== TD vs accuracy on bitwise (shots 1-4, per task; R² of the linear fit, CI over the points)")
    for step in (605, 1347, 3000):
        model = tvlens.load_model("bitwise", step=step)
        fam = tvlens.model_info(model).task_family()
        vals = []
        for s in seeds:
            res = tvlens.td_vs_accuracy(model, fam, shots=(1, 2, 3, 4), n_per_task=N_PER_TASK, seed=s, progress=False)
            f = res.fits[fam.name]
            vals.append((f["r2"], (f["r2_lo"], f["r2_hi"])))
        show(f"bitwise step {step} R²", [v for v, _ in vals], [c for _, c in vals], seeds, 2)


PARTS = {"table": shipped_table, "transition": transition, "patching": patching, "td_accuracy": td_accuracy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 777, 2024])
    ap.add_argument("--only", nargs="+", choices=sorted(PARTS), default=list(PARTS))
    ap.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for part in args.only:
        t = time.perf_counter()
        PARTS[part](args.seeds)
        print(f"  ({part}: {time.perf_counter() - t:.0f} s)")
    print(f"total {time.perf_counter() - t0:.0f} s; seeds {args.seeds}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(OUT, f, indent=1)


if __name__ == "__main__":
    main()
