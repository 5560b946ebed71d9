"""Circuits on a real language model: EAP-IG edges of SmolLM2-135M (Llama architecture, grouped-query attention:
9 query heads, 3 key/value heads, 30 layers) on a subset of layers, timed, with the top edges, their bootstrap
95% intervals, and exact path patching of the top edges beside their estimates.

Prompts: the ``lexical`` family (``--tasks``, default three of its tasks), ``--n`` prompts per task, 4-shot,
tokenized by the model's own tokenizer, prompt seed ``--seed``; corrupted = each prompt's in-context answers
permuted among its examples (none left in place; seed ``--seed``), tokenized with the clean prompts, keeping the
pairs whose query stays at the same position; metric: the log-probability of the answer's first token.
Edges: those whose ends are the embedding, the logits, or heads / MLPs of ``--layers`` (a key/value head's
input is one receiver ``L{l}KV{g}.k|v`` shared by its 3 query heads, see docs/circuits.md).

Run: ``.venv-tl4/bin/python benchmarks/bench_circuits_llm.py`` (one thread by default; progress bars off). The
model: ``tvlens.load_model("smollm2-135m")`` unless ``--model`` names another (a folder, a .gguf).
"""

from __future__ import annotations

import argparse
import time

import torch
from scipy.stats import spearmanr

import tvlens
from tvlens.backends import tl_version
from tvlens.circuits import edge_attribution, graph_of, path_patching


def parse_layers(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(x) for x in text.split(",")]


def shuffled_pairs(fam, texts, tokenizer, seed: int):
    """Clean prompts and corrupted counterparts with the in-context answers permuted among the examples (no
    answer left in place), tokenized together; only pairs whose query lands at the same position are kept."""
    import random
    from dataclasses import replace as dc_replace

    from tvlens.tasks.text import tokenize_prompts

    rng = random.Random(seed)
    corr = []
    for t in texts:
        n = len(t.examples)
        perm = list(range(n))
        while any(i == j for i, j in enumerate(perm)):
            rng.shuffle(perm)
        corr.append(dc_replace(t, examples=[(x, t.examples[j][1]) for (x, _), j in zip(t.examples, perm)]))
    both = tokenize_prompts(fam, list(texts) + corr, tokenizer, scoring="first_token")
    n = len(texts)
    keep = [i for i in range(n) if int(both.query_pos[i]) == int(both.query_pos[n + i])]
    clean = both.subset(keep)
    corrupted = both.subset([n + i for i in keep])
    return clean, dc_replace(corrupted, answers=clean.answers, labels=clean.labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="country_capital,antonym,present_past")
    ap.add_argument("--n", type=int, default=4, help="prompts per task")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--layers", default="18-21", help="e.g. 18-21 or 3,10,20")
    ap.add_argument("--ig-steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=12, help="top edges printed and path-patched exactly")
    ap.add_argument("--seed", type=int, default=2027)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=15,
                    help="sequences per gradient pass (prompts x IG steps): bounds memory (the q/k/v fork copies the "
                         "residual per head in every layer)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model = tvlens.load_model(args.model)
    t_load = time.perf_counter() - t0
    graph = graph_of(model)
    fam = tvlens.tasks.get("lexical")
    tasks = args.tasks.split(",")
    texts = fam.sample_text(args.n, shots=args.shots, seed=args.seed, tasks=tasks)
    prompts, corrupted = shuffled_pairs(fam, texts, model.tokenizer, args.seed)
    layers = parse_layers(args.layers)
    print(f"model {args.model}: {graph.n_layers} layers x {graph.n_heads} heads, {graph.n_kv_heads or graph.n_heads} "
          f"key/value heads; {len(graph.edges)} edges in the full graph; loaded in {t_load:.1f} s")
    print(f"prompts: lexical {tasks}, {args.n} per task ({len(prompts)} kept with the same layout once their answers "
          f"are shuffled), {args.shots}-shot, {prompts.tokens.shape[1]} tokens, seed {args.seed}; corrupted = "
          f"in-context answers shuffled among the examples (seed {args.seed}); metric log-prob of the "
          f"answer's first token; threads {args.threads}; TransformerLens {tl_version()}")

    t = time.perf_counter()
    ig = edge_attribution(model, prompts, method="eap-ig", ig_steps=args.ig_steps, layers=layers, ci=True,
                          corrupted=corrupted, seed=args.seed, batch_size=args.batch_size, progress=False)
    t_ig = time.perf_counter() - t
    print(f"EAP-IG (m={args.ig_steps}, QK fix) on layers {layers}: {len(ig)} edges in {t_ig:.1f} s")
    top = ig.top(args.top)
    t = time.perf_counter()
    exact = path_patching(model, prompts, edges=[(s, r) for s, r, _ in top], corrupted=corrupted, seed=args.seed,
                          ci=True, progress=False)
    t_pp = time.perf_counter() - t
    print(f"exact path patching of those top {args.top} edges: {t_pp:.1f} s; clean metric "
          f"{exact.notes['clean_metric']:.3f}, corrupted {exact.notes['corrupted_metric']:.3f}")
    print(f"\n{'edge':<24} {'EAP-IG':>8} {'95% CI':>20} {'exact':>8} {'95% CI':>20}")
    for i, (s, r, v) in enumerate(top):
        j = ig.edges.index((s, r))
        print(f"{s + ' -> ' + r:<24} {v:>8.4f} [{float(ig.ci[0, j]):>8.4f}, {float(ig.ci[1, j]):>8.4f}] "
              f"{float(exact.scores[i]):>8.4f} [{float(exact.ci[0, i]):>8.4f}, {float(exact.ci[1, i]):>8.4f}]")
    rho = spearmanr([v for _, _, v in top], exact.scores.numpy()).statistic
    same = sum((v > 0) == (float(e) > 0) for (_, _, v), e in zip(top, exact.scores))
    print(f"\non these {args.top} edges: Spearman(EAP-IG, exact) {rho:.3f}; same sign {same}/{args.top}")
    kinds = {}
    for _s, r, _v in ig.top(min(50, len(ig))):
        k = r.rsplit(".", 1)[-1] if "." in r else r.rstrip("0123456789")
        kinds[k] = kinds.get(k, 0) + 1
    print(f"receiver kinds among the top 50: {kinds}")


if __name__ == "__main__":
    main()
