"""Scoring text prompts: today's code path against the one before this change, side by side.

Scores ``--n`` lexical prompts (``--shots`` shots, ``scoring="greedy"``: exact match of the whole answer)
with ``tvlens.text_accuracy``, and, as the unit, one plain forward pass of the same model over the same
prompts (``model(tokens)``, logits included, same batches). Each contender runs in its own subprocess
(the model loaded there; load time not counted), rounds interleaved: before, after, before, after ...;
medians. "before" is tvlens at git revision ``--before`` (default: the last commit before greedy scoring
became teacher-forced: a greedy loop of one forward pass per answer token, each new input length adding a
recording pass on a bridge, then a log-probability pass); "after" is this checkout. Forwards are counted
(runs of block 0's MLP) with the positions unembedded, and the verdicts of both are compared prompt by
prompt.

Run (TL 4.3 leg, SmolLM2-135M once ``tvlens.load_model("smollm2-135m")`` works)::

    PYTHONPATH=$PWD .venv-tl4/bin/python benchmarks/bench_scoring.py --model smollm2-135m

``--model smollm2-shaped`` builds SmolLM2's shape (30 layers, d_model 576, 9 heads / 3 key-value heads,
49152 tokens) with random weights and a word tokenizer, offline (no package needed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE_REV = "9a9fdb1"  # main before this change (greedy scoring by generation)


def word_tokenizer():
    """A word-level tokenizer covering the lexical family's words (digits one per token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tvlens.tasks import lexical, pos

    ws = ["<|endoftext|>", "[UNK]", "->", "\n", "0", "1"]
    for _, words in pos.LEXICON.values():
        ws += words
    for pairs in lexical.TASKS.values():
        for a, b in pairs:
            ws += [a, b]
    ws = list(dict.fromkeys(ws))
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(ws)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", behavior="removed"),
                                                pre_tokenizers.Split("\n", behavior="isolated"),
                                                pre_tokenizers.Digits(individual_digits=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="[UNK]")


def smollm2_shaped_folder(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=1536, max_position_embeddings=2048, vocab_size=49152, bos_token_id=0,
                      eos_token_id=0, tie_word_embeddings=True, rope_theta=100000.0)
    cfg.n_ctx = 2048
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def child(args) -> None:
    """One contender in this process: ``args.which`` is "before" or "after" (the tvlens on sys.path)."""
    import torch

    torch.set_num_threads(args.threads)
    import tvlens
    from tvlens.backends import get_backend

    model = tvlens.load_model(args.model_path, **({"backend": args.backend} if args.backend else {}))
    bk = get_backend(model)
    fam = tvlens.tasks.get("lexical")
    p = fam.sample(args.n // len(fam.task_names), shots=args.shots, seed=args.seed, tokenizer=model.tokenizer,
                   scoring="greedy")
    counts = {"passes": 0, "unembedded_positions": 0}
    model.blocks[0].mlp.register_forward_pre_hook(lambda m, a: counts.__setitem__("passes", counts["passes"] + 1))
    model.unembed.hook_in.register_forward_pre_hook(
        lambda m, a: counts.__setitem__("unembedded_positions", counts["unembedded_positions"] + a[0].shape[:-1].numel()))
    last = int((p.query_pos + p.extra["answer_len"]).max())
    toks = p.tokens[:, :last]
    bs = args.batch_size

    @torch.no_grad()
    def forward():
        for s in range(0, len(toks), bs):
            model(toks[s : s + bs])

    def score():
        return tvlens.text_accuracy(model, p, scoring="greedy", batch_size=bs)

    out: dict = {"which": args.which, "tvlens": tvlens.__file__, "kind": bk.kind, "n": len(p),
                 "seq": int(toks.shape[1]), "answer_len_max": int(p.extra["answer_len"].max())}
    for name, fn in (("forward", forward), ("score", score)):
        counts.update(passes=0, unembedded_positions=0)
        t = time.perf_counter()
        r = fn()
        out[f"{name}_s"] = time.perf_counter() - t
        out[f"{name}_passes"], out[f"{name}_unembedded"] = counts["passes"], counts["unembedded_positions"]
        if r is not None:
            out["verdicts"] = r.per_prompt.int().tolist()
            out["accuracy"] = r.mean
    print("RESULT " + json.dumps(out))


def before_tree(rev: str) -> Path:
    """tvlens at git revision ``rev``, unpacked into a temporary folder (its package only)."""
    dst = Path(tempfile.mkdtemp(prefix="tvlens-before-"))
    tar = dst / "src.tar"
    with open(tar, "wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev, "tvlens"], stdout=f, check=True)
    with tarfile.open(tar) as t:
        t.extractall(dst, filter="data")
    return dst


def run_child(which: str, src: Path, a) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--model-path", str(a.model_path), "--n", str(a.n),
           "--shots", str(a.shots), "--seed", str(a.seed), "--batch-size", str(a.batch_size),
           "--threads", str(a.threads)] + (["--backend", a.backend] if a.backend else [])
    env = {**os.environ, "PYTHONPATH": str(src), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(src))
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode or not line:
        raise SystemExit(f"{which} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", help="a tvlens model name, a folder, or 'smollm2-shaped'")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--before", default=BEFORE_REV)
    ap.add_argument("--child", default=None)
    ap.add_argument("--model-path", default=None)
    a = ap.parse_args()
    if a.child:
        child(argparse.Namespace(**{**vars(a), "which": a.child}))
        return
    if a.model == "smollm2-shaped":
        a.model_path = smollm2_shaped_folder(Path(tempfile.gettempdir()) / "tvlens-smollm2-shaped")
    else:
        from tvlens import gguf_models

        # a named GGUF model: its dequantized folder (the tvlens before this change loads folders)
        a.model_path = gguf_models.prepare(a.model).folder if gguf_models.is_gguf_request(a.model) else a.model
    trees = {"before": before_tree(a.before), "after": ROOT}
    res: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(a.rounds):
        for which in ("before", "after"):
            res[which].append(run_child(which, trees[which], a))
    med = {w: {k: statistics.median(r[k] for r in rs) for k in ("forward_s", "score_s")} for w, rs in res.items()}
    first = {w: rs[0] for w, rs in res.items()}
    agree = sum(x == y for x, y in zip(first["before"]["verdicts"], first["after"]["verdicts"]))
    info = first["after"]
    print(f"[scoring] model {a.model} ({info['kind']}), {info['n']} lexical prompts, {a.shots}-shot, greedy, "
          f"seq {info['seq']}, answers up to {info['answer_len_max']} tokens, batch {a.batch_size}, "
          f"{a.threads} thread(s), medians of {a.rounds} interleaved rounds; load {os.getloadavg()[0]:.1f}")
    for w in ("before", "after"):
        r, m = first[w], med[w]
        print(f"[scoring] {w:6s}: one forward {m['forward_s']:7.2f} s ({r['forward_passes']} passes, "
              f"{r['forward_unembedded']} positions unembedded) | scoring {m['score_s']:7.2f} s "
              f"({r['score_passes']} passes, {r['score_unembedded']} positions unembedded) | "
              f"ratio scoring/forward {m['score_s'] / m['forward_s']:.2f}x | accuracy {r['accuracy']:.3f}")
    print(f"[scoring] speed-up after vs before: {med['before']['score_s'] / med['after']['score_s']:.1f}x; "
          f"verdicts agree on {agree}/{len(first['after']['verdicts'])} prompts")


if __name__ == "__main__":
    main()
