"""The early-vs-late finetuning study (Han et al. 2025, Table 1) on the shipped synthetic models.

From a partly trained checkpoint of the shipped ``bitwise`` model (default: step 605, before its
accuracy jump), finetune only the first half of the blocks or only the second half, with the same
step budget, learning rate, batches (same seed) and number of trainable parameters, and compare TD
(best layer, leave-one-out 10-NN on 100 held-out prompts per task) and 4-shot ICL accuracy (mean over
the six non-null tasks) before and after. Repeated over seeds (data order and held-out prompts).

Run: ``.venv/bin/python benchmarks/finetune_study.py`` (options: ``--step``, ``--steps``, ``--lr``,
``--seeds``, ``--lora-rank``, ``--model``); prints one row per run and the mean per arm.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

import tvlens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bitwise")
    ap.add_argument("--step", type=int, default=605, help="checkpoint step to start from")
    ap.add_argument("--steps", type=int, default=200, help="finetuning steps (the same for both arms)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lora-rank", type=int, default=None)
    ap.add_argument("--n-eval", type=int, default=100, help="held-out prompts per task")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = tvlens.load_model(args.model, step=args.step)
    family = tvlens.model_info(model).task_family()
    n = model.cfg.n_layers
    arms = {f"first half (blocks 0..{n // 2 - 1})": "first_half", f"last half (blocks {n - n // 2}..{n - 1})": "last_half"}
    how = f"LoRA rank {args.lora_rank}" if args.lora_rank else "full"
    print(f"model {args.model!r} at step {args.step} ({n} blocks), family {family.name}; {how} finetuning, "
          f"{args.steps} steps, lr {args.lr}, batch {args.batch_size}, seeds {args.seeds}", flush=True)
    rows = []
    for seed in args.seeds:
        for arm, layers in arms.items():
            t0 = time.perf_counter()
            r = tvlens.finetune(model, family, layers=layers, steps=args.steps, lr=args.lr, lora_rank=args.lora_rank,
                                batch_size=args.batch_size, n_eval_per_task=args.n_eval, seed=seed, progress=False)
            s = r.summary()
            rows.append({"arm": arm, "seed": seed, "trainable": s["n_trainable"],
                         "acc_before": s["acc_before"], "acc_after": s["acc_after"],
                         "td_before": s["td_before"], "td_after": s["td_after"],
                         "best_layer_after": s["best_layer_after"], "loss_last": s["loss_last"],
                         "seconds": time.perf_counter() - t0})
            print("  ", {k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    df = pd.DataFrame(rows)
    df["acc_gain"] = df["acc_after"] - df["acc_before"]
    df["td_gain"] = df["td_after"] - df["td_before"]
    pd.set_option("display.width", 200)
    print(df.drop(columns=["seconds"]).round(3).to_string(index=False))
    agg = df.groupby("arm", sort=False)[["acc_before", "acc_after", "acc_gain", "td_before", "td_after", "td_gain"]]
    print("\nmean over seeds:")
    print(agg.mean().round(3).to_string())
    print("\nstd over seeds:")
    print(agg.std().round(3).to_string())
    first, last = (df[df.arm == a] for a in arms)
    wins_td = sum(f > la for f, la in zip(first["td_gain"], last["td_gain"]))
    wins_acc = sum(f > la for f, la in zip(first["acc_gain"], last["acc_gain"]))
    print(f"\nfirst half improves TD more than last half in {wins_td}/{len(args.seeds)} seeds, "
          f"accuracy more in {wins_acc}/{len(args.seeds)} seeds")


if __name__ == "__main__":
    main()
