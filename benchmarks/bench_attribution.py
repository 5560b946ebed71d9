"""Attribution patching (AtP) over all heads against the exact batched head sweep, same prompts, same process.

(a) a randomly initialised GPT-2-small-shaped model (12 layers x 12 heads = 144 heads, d_model 768,
vocab 50257), 4 prompts x 16 random tokens, the corrupted prompts differing at position 3 (as in
``bench_patching.py``), metric: log-probability of the clean run's top token at the last position;
(b) the shipped default (codes) model, 8 prompts per task, corrupted = in-context labels shuffled.

The exact sweep patches each head's clean output (``hook_z``, all positions) into the corrupted run
(``head_attribution(method="patch")``, the batched engine of ``tvlens.sweeps``); AtP estimates the same
numbers from one clean forward, one corrupted forward and one backward, with the AtP* QK fix
(``atp_site="qkv", qk_fix=True``), without it, and linearised at the head output (``atp_site="z"``).
Prints wall time (best of ``--repeat``), the speed-up, and the Spearman correlation of the 144 (16) scores.

Run: ``.venv/bin/python benchmarks/bench_attribution.py`` (``--quick`` skips the GPT-2-shaped model).
"""

from __future__ import annotations

import argparse
import time

import torch
from scipy.stats import spearmanr

import tvlens
from tvlens.attribution import head_attribution

VARIANTS = {"AtP* (qkv, QK fix)": dict(atp_site="qkv", qk_fix=True),
            "AtP (qkv, linear)": dict(atp_site="qkv", qk_fix=False),
            "AtP (head output z)": dict(atp_site="z")}


def gpt2_small_shaped_case():
    from bench_patching import gpt2_small_shaped

    model = gpt2_small_shaped()
    g = torch.Generator().manual_seed(0)
    n, seq = 4, 16
    clean = torch.randint(0, 50257, (n, seq), generator=g)
    corrupted = clean.clone()
    corrupted[:, 3] = torch.randint(0, 50257, (n,), generator=g)
    with torch.no_grad():
        top = model(clean)[:, -1].argmax(-1)

    def promptset(tokens):
        return tvlens.PromptSet(family="random", params={}, task_names=["random"], labels=torch.zeros(n, dtype=torch.long),
                                query_pos=torch.full((n,), seq - 1), answers=top[:, None], targets=tokens,
                                train_mask=torch.zeros(n, seq, dtype=torch.bool), shots=0, tokens=tokens)

    return model, promptset(clean), promptset(corrupted)


def default_case():
    model = tvlens.load_model("default")
    p = tvlens.model_info(model).task_family().sample(8, shots=4, seed=3)
    return model, p, None


def timed(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def run(which: str, repeat: int) -> None:
    model, clean, corrupted = gpt2_small_shaped_case() if which == "gpt2-small-shaped" else default_case()
    kw = dict(corrupted=corrupted, metric="logprob", progress=False)
    head_attribution(model, clean, method="atp", **kw)  # warm-up
    t_exact, exact = timed(lambda: head_attribution(model, clean, method="patch", **kw), max(1, repeat // 2))
    n_heads = exact.scores.numel()
    print(f"[attribution] {which:18s} exact head sweep ({n_heads} heads, {len(clean)} prompts): {t_exact:7.3f}s  "
          f"clean {exact.notes['clean_metric']:.3f} corrupted {exact.notes['corrupted_metric']:.3f}", flush=True)
    for name, v in VARIANTS.items():
        t_atp, est = timed(lambda: head_attribution(model, clean, method="atp", **kw, **v), repeat)
        rho = float(spearmanr(est.scores.flatten().numpy(), exact.scores.flatten().numpy()).statistic)
        print(f"[attribution] {which:18s} {name:22s} {t_atp:7.3f}s  speed-up {t_exact / t_atp:6.1f}x  "
              f"Spearman {rho:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    run("default", a.repeat)
    if not a.quick:
        run("gpt2-small-shaped", a.repeat)


if __name__ == "__main__":
    main()
