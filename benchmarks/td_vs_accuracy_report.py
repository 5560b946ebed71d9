"""TD vs ICL accuracy on the shipped ``bitwise`` model (the paper's Fig. on Llama-3.1-8B, synthetic scale).

Per task and shot count (1-4; the model's context fits 4 shots): 4-shot-style exact-match accuracy
and TD at the best layer on 100 prompts per task, the linear fit and its R², at three checkpoints.

Run: ``.venv/bin/python benchmarks/td_vs_accuracy_report.py`` (``--steps``, ``--n``).
"""

from __future__ import annotations

import argparse

import torch

import tvlens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bitwise")
    ap.add_argument("--steps", type=int, nargs="+", default=[605, 1347, 3000])
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--n", type=int, default=100, help="prompts per task")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for step in args.steps:
        model = tvlens.load_model(args.model, step=step)
        family = tvlens.model_info(model).task_family()
        res = tvlens.td_vs_accuracy(model, family, shots=args.shots, n_per_task=args.n, progress=False)
        f = res.fits[family.name]
        print(f"== {args.model} step {step}: accuracy = {f['slope']:.3f} * TD + {f['intercept']:.3f}, "
              f"R² {f['r2']:.3f} over {f['n']} (task, shots) points")
        df = res.to_dataframe()
        print(df.pivot(index="task", columns="shots", values=["td", "accuracy"]).round(3).to_string())


if __name__ == "__main__":
    main()
