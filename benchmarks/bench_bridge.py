"""tvlens on a TransformerBridge: the batched sweep engine and extraction, against TransformerLens on the
same bridge, in one run (and next to a HookedTransformer with the same weights where TL 3.x has one).

A GPT-2-small-shaped ``GPT2LMHeadModel`` (12 layers, 12 heads, d_model 768, vocab 50257, random weights,
seed 0) booted with ``TransformerBridge.boot_transformers(hf_model=...)``; batch 4 x 16 tokens:
- resid_pre layer x position sweep and per-head (z) all-positions sweep: tvlens vs
  ``transformer_lens.patching`` (wall time, speed-up, max |difference|);
- ``tvlens.extract`` of every layer at the last position vs a bare forward pass (logits).
Run: ``.venv-tl4/bin/python benchmarks/bench_bridge.py`` (``--quick``: 4 layers).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore")

import torch  # noqa: E402
import transformer_lens.patching as tlp  # noqa: E402

import tvlens  # noqa: E402
from tvlens.backends import get_backend, has_hooked_transformer, tl_version  # noqa: E402
from tvlens.prompts import PromptSet  # noqa: E402
from tvlens.sweeps import activation_patching  # noqa: E402


def models(n_layers: int):
    import tests_tokenizer
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layers, n_embd=768, n_head=12, n_positions=1024)).eval()
    out = {"bridge": TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=tests_tokenizer.make(50257),
                                                         device="cpu")}
    if has_hooked_transformer():
        from transformer_lens import HookedTransformer

        out["hooked"] = HookedTransformer.from_pretrained_no_processing("gpt2", hf_model=hf, tokenizer=out["bridge"].tokenizer,
                                                                        device="cpu")
    return out


def timed(fn, reps=1):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50257, (4, 16), generator=g)
    corrupted = clean.clone()
    corrupted[:, 3] = torch.randint(0, 50257, (4,), generator=g)

    def metric(logits):
        return logits[:, -1, 11] - logits[:, -1, 12]

    print(f"[bridge] TransformerLens {tl_version()}, one thread", flush=True)
    for kind, model in models(4 if args.quick else 12).items():
        with torch.no_grad():
            _, cache = model.run_with_cache(clean)
        for name, site, by, tl_fn in [("resid_pre layer x pos", "resid_pre", ("layer", "pos"), tlp.get_act_patch_resid_pre),
                                      ("head (z) all positions", "z", ("layer", "head"),
                                       tlp.get_act_patch_attn_head_out_all_pos)]:
            with torch.no_grad():
                t_tl, ref = timed(lambda: tl_fn(model, corrupted, cache, lambda lg: metric(lg).mean()))
                t_us, ours = timed(lambda: activation_patching(model, clean, corrupted, metric, site=site, by=by,
                                                               read_positions=[-1], batch_size=256, progress=False))
            diff = float((ours.values - ref.cpu()).abs().max())
            print(f"[bridge] {kind:7s} {name:24s} TransformerLens {t_tl:7.2f}s  tvlens {t_us:7.2f}s  "
                  f"speed-up {t_tl / t_us:5.2f}x  max|diff| {diff:.2e}", flush=True)
        n = 64
        toks = torch.randint(0, 50257, (n, 16), generator=g)
        p = PromptSet(family="bench", params={}, task_names=["a", "b"], tokens=toks, query_pos=torch.full((n,), 15),
                      answers=torch.zeros(n, 1, dtype=torch.long), labels=torch.arange(n) % 2,
                      targets=toks.clone(), train_mask=torch.zeros_like(toks, dtype=torch.bool), shots=0)
        with torch.no_grad():
            t_fwd, _ = timed(lambda: get_backend(model).logits(toks), reps=3)
            t_ex, _ = timed(lambda: tvlens.extract(model, p, progress=False, batch_size=64), reps=3)
        print(f"[bridge] {kind:7s} extract all {get_backend(model).n_layers + 1} layers, {n} x 16 tokens: {t_ex:6.3f}s; "
              f"bare forward {t_fwd:6.3f}s; extract / forward speed {t_fwd / t_ex:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
