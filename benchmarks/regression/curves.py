"""Print the learning and TD curves of sparse_regression runs from their logs (``log.jsonl`` as written
by ``tvlens train --track-encoding``; the copies under ``benchmarks/regression/runs/``).

Run: ``python benchmarks/regression/curves.py benchmarks/regression/runs/*/log.jsonl [--every 2000]``
Each eval row: step, held-out query MSE (eval prompts: 64 per basis, seed 1_000_003 + run seed), dense
least squares and the basis-aware estimator on the same prompts, TD per layer (50 prompts per basis,
seed 424242), training seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--every", type=int, default=0, help="print only steps divisible by this (and the last)")
    args = ap.parse_args()
    for log in args.logs:
        rows = [json.loads(ln) for ln in Path(log).read_text().splitlines() if ln.strip()]
        cfg_path = Path(log).with_name("train_config.json")
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        print(f"== {log}: family {cfg.get('family')}, shots {cfg.get('shots')}, {cfg.get('n_layers')} layers, "
              f"d_model {cfg.get('d_model')}, lr {cfg.get('lr')}, batch {cfg.get('batch_size')}, seed {cfg.get('seed')}")
        print("   step  query_mse  dense_ls  basis_aware  TD per layer                 seconds")
        for i, r in enumerate(rows):
            if args.every and r["step"] % args.every and i != len(rows) - 1:
                continue
            td = " ".join(f"{v:.2f}" for v in r.get("td", []))
            ba = r.get("basis_aware_mse")
            print(f"{r['step']:7d}  {r['mean']:9.3f}  {r.get('least_squares_mse', float('nan')):8.3f}  "
                  f"{(ba if ba is not None else float('nan')):11.3f}  {td:28s} {r.get('train_seconds', 0):7.0f}")


if __name__ == "__main__":
    main()
