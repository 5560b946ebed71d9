"""Circuits: speed and faithfulness of the fast estimates against the exact sweeps, side by side, one run.

Heads (nodes): on the three shipped models (``default`` = codes, ``categories``, ``bitwise``), 8 fresh prompts per
task (seed 2027, not used in any test), corrupted = in-context labels shuffled (``shuffle``; on ``categories`` this
leaves the task visible and no head's patch moves the metric), and corrupted = the examples of a prompt of another
task, query kept (``swap``, ``tvlens.circuits.swap_contexts``); metric: the answer's log-probability. The
reference is the exact clean -> corrupted head sweep (``head_attribution(method="patch")``,
the batched engine of ``tvlens.sweeps``); each estimate is timed (best of ``--repeat``) and compared by Spearman
over the heads and top-5 overlap. The same on a random GPT-2-small-shaped model (144 heads, 4 x 16 random
tokens, one position corrupted; ``--quick`` skips it). MLP nodes: EAP-IG's MLP scores against the exact MLP
sweep (``activation_patching(site="mlp_out", by=("layer",))``).

Edges (default model only, ``--no-edges`` skips): EAP and EAP-IG over all edges against exact path patching
(``tvlens.circuits.path_patching``), with and without AtP*'s QK fix on edges into queries and keys, Spearman
overall and per receiver kind; then the faithfulness curve of the
EAP-IG circuit (top-k edges, everything else patched to corrupted) against 20 random circuits per size, and
the number of edges the circuit needs to recover 80% of the clean - corrupted gap.

Run: ``.venv/bin/python benchmarks/bench_circuits.py`` (one thread by default; progress bars off).
"""

from __future__ import annotations

import argparse
import time

import torch
from scipy.stats import spearmanr

import tvlens
from tvlens.attribution import head_attribution

SEED = 2027
NODE_METHODS = {
    "AtP (z)": dict(method="atp", atp_site="z"),
    "AtP* (qkv, QK fix)": dict(method="atp", atp_site="qkv", qk_fix=True),
    "AtP + GradDrop (z)": dict(method="atp", grad_drop=True),
    "EAP-IG m=1 (=EAP)": dict(method="eap-ig", ig_steps=1),
    "EAP-IG m=3": dict(method="eap-ig", ig_steps=3),
    "EAP-IG m=5 (default)": dict(method="eap-ig", ig_steps=5),
    "EAP-IG m=10": dict(method="eap-ig", ig_steps=10),
}


def timed(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 5) -> int:
    return len(set(a.flatten().argsort(descending=True)[:k].tolist()) & set(b.flatten().argsort(descending=True)[:k].tolist()))


def rho(a, b) -> float:
    return float(spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic)


def case(which: str, corruption: str = "shuffle"):
    if which == "gpt2-small-shaped":
        from bench_attribution import gpt2_small_shaped_case

        return gpt2_small_shaped_case()
    model = tvlens.load_model(which)
    p = tvlens.model_info(model).task_family().sample(8, shots=4, seed=SEED)
    if corruption == "swap":
        from tvlens.circuits import swap_contexts

        clean, corrupted = swap_contexts(p, seed=SEED)
        return model, clean, corrupted
    return model, p, None


def nodes(which: str, repeat: int, corruption: str = "shuffle") -> None:
    model, clean, corrupted = case(which, corruption)
    if which != "gpt2-small-shaped":
        which = f"{which} ({corruption})"
    kw = dict(corrupted=corrupted, metric="logprob", progress=False, seed=SEED)
    head_attribution(model, clean, method="atp", atp_site="z", **kw)  # warm-up
    t_exact, exact = timed(lambda: head_attribution(model, clean, method="patch", **kw), max(1, repeat // 2))
    print(f"[circuits] {which:18s} exact head sweep ({exact.scores.numel()} heads, {len(clean)} prompts): "
          f"{t_exact:7.3f}s  (clean {exact.notes['clean_metric']:.3f}, corrupted {exact.notes['corrupted_metric']:.3f}, "
          f"largest |head effect| {float(exact.scores.abs().max()):.3f})", flush=True)
    for name, v in NODE_METHODS.items():
        t, est = timed(lambda: head_attribution(model, clean, **kw, **v), repeat)
        extra = ""
        if v.get("grad_drop"):  # GradDrop estimates magnitudes: also against |exact|
            extra = f"  (vs |exact|: Spearman {rho(est.scores, exact.scores.abs()):.3f}, " \
                    f"top-5 {top_overlap(est.scores, exact.scores.abs())}/5)"
        print(f"[circuits] {which:18s} {name:22s} {t:7.3f}s  speed-up {t_exact / t:5.1f}x  Spearman "
              f"{rho(est.scores, exact.scores):6.3f}  top-5 {top_overlap(est.scores, exact.scores)}/5{extra}", flush=True)
    if not which.startswith("gpt2"):
        mlp_vs_exact(model, clean, corrupted)


def mlp_vs_exact(model, p, c=None) -> None:
    from tvlens.positions import prompt_answer_positions, shuffle_labels, trim_to_answers
    from tvlens.sweeps import activation_patching

    c = shuffle_labels(p, SEED) if c is None else c
    P, C = trim_to_answers(p), trim_to_answers(c)
    ans = P.answers

    def metric(logits):
        return logits.log_softmax(-1).gather(-1, ans[..., None])[..., 0].sum(-1)

    ex = activation_patching(model, P.tokens, C.tokens, metric, site="mlp_out", by=("layer",),
                             read_positions=prompt_answer_positions(P), progress=False)
    exact = ex.values - ex.corrupted_metric
    est = head_attribution(model, p, method="eap-ig", corrupted=c, progress=False, per_task=False)
    mlp = torch.tensor(est.notes["mlp"])
    print(f"[circuits]   MLP nodes: exact {[round(float(x), 3) for x in exact]}  EAP-IG {[round(float(x), 3) for x in mlp]}"
          f"  Spearman {rho(mlp, exact):.3f}", flush=True)


def edges(repeat: int) -> None:
    from tvlens.circuits import edge_attribution, faithfulness, path_patching

    model = tvlens.load_model("default")
    p = tvlens.model_info(model).task_family().sample(4, shots=4, seed=SEED)
    kw = dict(metric="logprob", seed=SEED, progress=False)
    t_pp, pp = timed(lambda: path_patching(model, p, **kw), 1)
    print(f"[circuits] default edges: exact path patching of {len(pp)} edges, {len(p)} prompts: {t_pp:.2f}s  "
          f"(clean {pp.notes['clean_metric']:.3f}, corrupted {pp.notes['corrupted_metric']:.3f})", flush=True)
    kinds = pp.receiver_kinds()
    best = None
    for name, v in {"EAP": dict(method="eap"), "EAP + QK fix": dict(method="eap", qk_fix=True),
                    "EAP-IG m=5, no QK fix": dict(method="eap-ig", ig_steps=5, qk_fix=False),
                    "EAP-IG m=5 (default)": dict(method="eap-ig", ig_steps=5),
                    "EAP-IG m=10": dict(method="eap-ig", ig_steps=10)}.items():
        t, est = timed(lambda: edge_attribution(model, p, **kw, **v), repeat)
        per = []
        for k in ("q", "k", "v", "mlp", "logits"):
            idx = [i for i, x in enumerate(kinds) if x == k]
            if len(idx) > 2:
                per.append(f"{k} {rho(est.scores[idx], pp.scores[idx]):.3f} (n={len(idx)})")
        print(f"[circuits] default edges {name:22s} {t:6.2f}s  speed-up {t_pp / t:5.1f}x  Spearman all "
              f"{rho(est.scores, pp.scores):.3f}; by receiver: {', '.join(per)}", flush=True)
        if name == "EAP-IG m=5 (default)":
            best = est
    f = faithfulness(model, p, best, n_random=20, seed=SEED, metric="logprob")
    rows = ", ".join(f"k={k}: {r:.2f} (random {q:.2f})" for k, r, q in
                     zip(f.ks, f.recovered.tolist(), f.random.mean(1).tolist()))
    print(f"[circuits] default faithfulness (EAP-IG default top-k, corrupted outside): {rows}", flush=True)
    print(f"[circuits] default: the EAP-IG circuit needs k={f.edges_for(0.8)} of {f.n_edges} edges for 80% "
          f"(full graph {f.notes['full_graph_recovered']:.3f}, empty {f.notes['empty_graph_recovered']:.3f})", flush=True)
    k80 = f.edges_for(0.8)
    if k80:  # refine between the last size below 80% and the first above, every 4 edges
        lo = max(k for k in f.ks if k < k80)
        fine = faithfulness(model, p, best, ks=list(range(lo, k80 + 1, 4)), n_random=0, seed=SEED, metric="logprob")
        print(f"[circuits] default: refined, k={fine.edges_for(0.8)} edges recover "
              f"{float(fine.recovered[fine.ks.index(fine.edges_for(0.8))]):.3f} (k={lo}..{k80} every 4: "
              f"{', '.join(f'{r:.2f}' for r in fine.recovered.tolist())})", flush=True)
    fp = faithfulness(model, p, pp, n_random=0, seed=SEED, metric="logprob")
    print(f"[circuits] default: the exact path-patching ranking needs k={fp.edges_for(0.8)} edges for 80% "
          f"(curve: {', '.join(f'k={k}: {r:.2f}' for k, r in zip(fp.ks, fp.recovered.tolist()))})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the GPT-2-small-shaped model")
    ap.add_argument("--no-edges", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--corruption", choices=["shuffle", "swap", "both"], default="both",
                    help="shuffled in-context labels, the examples of another task's prompt (swap), or both")
    ap.add_argument("--no-nodes", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for corruption in (["shuffle", "swap"] if a.corruption == "both" else [a.corruption]) if not a.no_nodes else []:
        for which in ("default", "categories", "bitwise"):
            nodes(which, a.repeat, corruption)
    if not a.quick and not a.no_nodes:
        nodes("gpt2-small-shaped", max(1, a.repeat // 2))
    if not a.no_edges:
        edges(a.repeat)


if __name__ == "__main__":
    main()
