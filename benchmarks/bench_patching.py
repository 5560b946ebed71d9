"""Activation-patching sweeps: tvlens against transformer_lens.patching, same process, same inputs.

(a) the shipped bitwise model, (b) a randomly initialised GPT-2-small-shaped model (12 layers,
12 heads, d_model 768, vocab 50257), batch 4 x 16 tokens; a resid_pre layer x position sweep and
a per-head all-positions (z) sweep. Prints wall time, speed-up and the largest |difference|; the
resid_pre sweep runs two ways: ``skip_prefix=False`` (the default: every patched run recomputes all
positions, patches stacked in few calls) and ``True`` (one call per patched position, positions
before it taken from the corrupted run's key/value cache).

Run: ``.venv/bin/python benchmarks/bench_patching.py`` (``--quick`` skips the GPT-2-shaped model).
"""

from __future__ import annotations

import argparse
import time

import torch
import transformer_lens.patching as tlp

import tvlens
from tvlens.backends.loading import build
from tvlens.sweeps import activation_patching


def gpt2_small_shaped():
    cfg = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024,
               d_vocab=50257, act_fn="gelu_new", normalization_type="LN", seed=0)
    return build(cfg, False).eval()  # a HookedTransformer on TL 3.x, a boot_native bridge on 4.x


def inputs(which):
    g = torch.Generator().manual_seed(0)
    if which == "bitwise":
        model = tvlens.load_model("bitwise")
        fam = tvlens.model_info(model).task_family()
        p = fam.sample(2, shots=4, seed=0, tasks=["and", "xor"])
        clean, corrupted = p.tokens[:2].repeat(2, 1), p.tokens[2:].repeat(2, 1)  # batch 4
        clean, corrupted = clean[:, :16], corrupted[:, :16]
    else:
        model = gpt2_small_shaped()
        clean = torch.randint(0, 50257, (4, 16), generator=g)
        corrupted = clean.clone()
        corrupted[:, 3] = torch.randint(0, 50257, (4,), generator=g)
    return model, clean, corrupted


def run(which: str) -> None:
    model, clean, corrupted = inputs(which)
    v = tvlens.backends.get_backend(model).d_vocab_out
    t1, t2 = int(clean[0, -1]) % v, (int(clean[0, -1]) + 1) % v

    def metric(logits):
        return logits[:, -1, t1] - logits[:, -1, t2]

    def tl_metric(logits):
        return metric(logits).mean()

    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
    for name, site, by, tl_fn in [
        ("resid_pre layer x pos", "resid_pre", ("layer", "pos"), tlp.get_act_patch_resid_pre),
        ("head (z) all positions", "z", ("layer", "head"), tlp.get_act_patch_attn_head_out_all_pos),
    ]:
        t = time.perf_counter()
        with torch.no_grad():
            ref = tl_fn(model, corrupted, cache, tl_metric)
        t_tl = time.perf_counter() - t
        # resid_pre by position: also with the unchanged prefix skipped (True)
        variants = [None] if "pos" not in by else [False, True]
        for skip in variants:
            t = time.perf_counter()
            ours = activation_patching(model, clean, corrupted, metric, site=site, by=by, read_positions=[-1],
                                       batch_size=256, progress=False, skip_prefix=skip)
            t_us = time.perf_counter() - t
            diff = float((ours.values - ref.cpu()).abs().max())
            label = name if skip is None and "pos" not in by else f"{name} skip_prefix={skip}"
            print(f"[patching] {which:18s} {label:40s} TransformerLens {t_tl:7.2f}s  tvlens {t_us:7.2f}s  "
                  f"speed-up {t_tl / t_us:5.2f}x  max|diff| {diff:.2e}  ({ours.notes['forward_calls']} calls)",
                  flush=True)

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(2)
    run("bitwise")
    if not a.quick:
        run("gpt2-small-shaped")


if __name__ == "__main__":
    main()
