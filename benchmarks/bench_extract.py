"""Extraction throughput and peak memory against TransformerLens, in one run.

- throughput: ``tvlens.extract`` (all n_layers+1 layers at the query position) against a bare forward
  pass of the same model over the same prompts (``model(tokens)``), prompts/s and the ratio;
- peak memory: ``tvlens.extract`` against ``model.run_with_cache(tokens)`` without a filter (then
  indexing the query position), each in a fresh subprocess, as the rise of the process's peak RSS.

Run: ``.venv/bin/python benchmarks/bench_extract.py`` (``--quick`` for a smaller run).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

import tvlens
from tvlens.encoding import extract
from tvlens.models import build_model


def setup(which: str, n_per_task: int):
    fam = tvlens.tasks.get("codes")
    if which == "default":
        model = tvlens.load_model("default")
    else:  # a GPT-2-small-shaped random model on the same prompts
        model = build_model(fam, n_layers=12, d_model=768, n_heads=12, d_mlp=3072, seed=0)
    prompts = fam.sample(n_per_task, shots=4, seed=1)
    return model, prompts


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def throughput(which: str, n_per_task: int, batch_size: int, repeats: int) -> dict:
    model, prompts = setup(which, n_per_task)
    toks = prompts.tokens

    @torch.no_grad()
    def bare():
        for s in range(0, len(toks), batch_size):
            model(toks[s : s + batch_size])

    def ours():
        extract(model, prompts, batch_size=batch_size, progress=False)

    bare(), ours()  # warm-up
    tb, to = best_of(bare, repeats), best_of(ours, repeats)
    n = len(prompts)
    return {"model": which, "prompts": n, "bare_forward_prompts_per_s": n / tb, "extract_prompts_per_s": n / to,
            "ratio_extract_over_bare": tb / to}


def memory_child(which: str, method: str, n_per_task: int) -> None:
    model, prompts = setup(which, n_per_task)
    torch.set_grad_enabled(False)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if method == "extract":
        acts = extract(model, prompts, batch_size=None, progress=False).acts
    else:
        _, cache = model.run_with_cache(prompts.tokens)
        rows = torch.arange(len(prompts))
        names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)]
        acts = torch.stack([cache[n][rows, prompts.query_pos] for n in names], 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rise_mb": (peak - base) / 1024, "shape": list(acts.shape)}))


def memory(which: str, n_per_task: int) -> dict:
    out = {}
    for method in ("extract", "run_with_cache"):
        r = subprocess.run([sys.executable, __file__, "--child", which, method, str(n_per_task)],
                           capture_output=True, text=True, check=True)
        out[method] = json.loads(r.stdout.strip().splitlines()[-1])
    e, c = out["extract"]["peak_rise_mb"], out["run_with_cache"]["peak_rise_mb"]
    return {"model": which, "extract_peak_rise_mb": e, "run_with_cache_peak_rise_mb": c,
            "ratio_cache_over_extract": c / max(e, 1e-9)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=3)
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.child:
        memory_child(a.child[0], a.child[1], int(a.child[2]))
        return
    n = 20 if a.quick else 100
    for which in ("default", "gpt2-small-shaped"):
        t = throughput(which, n, batch_size=100, repeats=2 if a.quick else 3)
        print(f"[extract] {which}: {t['prompts']} prompts  bare forward {t['bare_forward_prompts_per_s']:.0f}/s  "
              f"extract {t['extract_prompts_per_s']:.0f}/s  ratio extract/bare = {t['ratio_extract_over_bare']:.2f}x")
        m = memory(which, n)
        print(f"[extract] {which}: peak RSS rise  extract {m['extract_peak_rise_mb']:.1f} MB  run_with_cache "
              f"{m['run_with_cache_peak_rise_mb']:.1f} MB  ratio cache/extract = {m['ratio_cache_over_extract']:.1f}x")


if __name__ == "__main__":
    main()
