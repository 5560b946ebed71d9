"""Where does the shipped default (codes) model read its task? A swap-patching probe by position.

For each layer, swap the prompts' own task component for task A's (per-position task means,
``r - mean_own + mean_A``) at a set of positions, and report the fraction of other tasks' prompts
that then answer by A's rule (flip) and the own-task control. Positions: the query's arrow only
(what ``run_patching`` does), the examples' answer tokens, and every position.

Run: ``.venv/bin/python benchmarks/patching_sites_report.py``.
"""

from __future__ import annotations

import torch

import tvlens
from tvlens.encoding import resid_hook_name


def main() -> None:
    torch.set_num_threads(2)
    model = tvlens.load_model("default")
    fam = tvlens.model_info(model).task_family()
    p = fam.sample(50, shots=4, seed=7)
    T, rows, q = p.n_tasks, torch.arange(len(p)), int(p.query_pos[0])
    names = [resid_hook_name(layer) for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(p.tokens, names_filter=lambda n: n in names)
    answer_pos = [i for i in range(q) if bool(p.train_mask[0, i - 1]) and i - 1 != q] if q else []

    @torch.no_grad()
    def probe(layer: int, pos: list[int]) -> tuple[float, float]:
        X = cache[resid_hook_name(layer)][:, pos]
        mu = torch.stack([X[p.labels == t].mean(0) for t in range(T)])
        flips = others = kept = own_n = 0
        for a in range(T):
            def hook(act, hook):
                act = act.clone()
                act[:, pos] = act[:, pos] - mu[p.labels] + mu[a]
                return act

            logits = model.run_with_hooks(p.tokens, fwd_hooks=[(resid_hook_name(layer), hook)])
            ok = logits[rows, q].argmax(-1) == p.task_answers[:, a, 0]
            own = p.labels == a
            flips, others = flips + int(ok[~own].sum()), others + int((~own).sum())
            kept, own_n = kept + int(ok[own].sum()), own_n + int(own.sum())
        return flips / others, kept / own_n

    print(f"examples' answer positions: {answer_pos}; query arrow: {q}")
    for layer in range(1, model.cfg.n_layers):
        cells = []
        for label, pos in (("arrow", [q]), ("answers", answer_pos), ("all", list(range(q + 1)))):
            f, c = probe(layer, pos)
            cells.append(f"{label}: flip {f:.3f} control {c:.3f}")
        print(f"layer {layer}:  " + "  |  ".join(cells))


if __name__ == "__main__":
    main()
