"""TD per layer at step 0 and at the last step for every shipped model, and the emergence coupling.

Run: ``.venv/bin/python benchmarks/encoding_report.py`` (prints one block per shipped model).
"""

from __future__ import annotations

import torch

import tvlens


def main() -> None:
    torch.set_num_threads(2)
    for name in tvlens.shipped_models():
        em = tvlens.emergence(name, n_per_task=100, shots=4, seed=12345, progress=False)
        chance = 1 / len(em.task_names)
        print(f"== {name}: {len(em.task_names)} tasks (chance {chance:.3f}), checkpoints {em.steps}")
        print("   TD by layer, step 0:    ", [round(float(v), 3) for v in em.td[0]])
        print(f"   TD by layer, step {em.steps[-1]}: ", [round(float(v), 3) for v in em.td[-1]])
        print(f"   best layer (last step) {em.best_layer}; mean {em.metric} {float(em.mean_metric[0]):.3f} -> "
              f"{float(em.mean_metric[-1]):.3f}; Spearman(TD best layer, mean {em.metric}) over steps = "
              f"{em.spearman():.3f}")
        print("   per step: ", [(s, round(float(t), 3), round(float(a), 3))
                               for s, t, a in zip(em.steps, em.td_at(), em.mean_metric)])


if __name__ == "__main__":
    main()
