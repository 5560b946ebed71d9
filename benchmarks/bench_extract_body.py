"""Extraction against the Hugging Face body alone, on the same weights, in one run.

``tvlens.extract`` (every residual layer at the query position, through the model tvlens loads: a
TransformerBridge on TL 4.x) against the bare Hugging Face body (``model.model`` / ``model.transformer``,
SDPA attention, no unembedding) over the same prompts in the same batches: the floor any hook-based
extraction can reach. Contenders interleaved, medians; max |diff| of the representations against the
body's ``output_hidden_states`` (layers 0..n_layers-1; HF's last hidden state is after the final norm).

Run::

    PYTHONPATH=$PWD .venv-tl4/bin/python benchmarks/bench_extract_body.py --model smollm2-shaped
    PYTHONPATH=$PWD .venv-tl4/bin/python benchmarks/bench_extract_body.py --model gpt2-small-shaped

(``--model`` also takes a local Hugging Face folder, or a tvlens name such as ``smollm2-135m``.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def folder_for(name: str) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_scoring import smollm2_shaped_folder, word_tokenizer

    tmp = Path(tempfile.gettempdir())
    if name == "smollm2-shaped":
        return smollm2_shaped_folder(tmp / "tvlens-smollm2-shaped")
    if name == "gpt2-small-shaped":
        folder = tmp / "tvlens-gpt2-small-shaped"
        if not (folder / "config.json").exists():
            from transformers import GPT2Config, GPT2LMHeadModel

            torch.manual_seed(0)
            cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257, bos_token_id=0,
                             eos_token_id=0)
            GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
            word_tokenizer().save_pretrained(folder)
        return folder
    return Path(name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-shaped")
    ap.add_argument("--family", default="pos")
    ap.add_argument("--n-per-task", type=int, default=8)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    import tvlens
    from tvlens import gguf_models

    folder = gguf_models.prepare(a.model).folder if gguf_models.is_gguf_request(a.model) else folder_for(a.model)
    model = tvlens.load_model(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    body = getattr(hf, "model", None) or hf.transformer
    p = tvlens.tasks.get(a.family).sample(a.n_per_task, shots=a.shots, seed=0, tokenizer=model.tokenizer,
                                          **({"scoring": "first_token"} if a.family != "pos" else {}))
    toks = p.tokens[:, : int(p.query_pos.max()) + 1]
    bs = a.batch_size

    @torch.no_grad()
    def hf_body():
        return [body(input_ids=toks[s : s + bs], output_hidden_states=True).hidden_states
                for s in range(0, len(toks), bs)]

    def ours():
        return tvlens.extract(model, p, batch_size=bs, progress=False)

    enc, hs = ours(), hf_body()
    n = model.cfg.n_layers
    rows = torch.arange(len(p))
    ref = torch.stack([torch.cat([h[layer] for h in hs])[rows, p.query_pos] for layer in range(n)], 1)
    diff = float((enc.acts[:, :n] - ref).abs().max())
    T = {"hf_body": [], "extract": []}
    for _ in range(a.rounds):
        for k, fn in (("hf_body", hf_body), ("extract", ours)):
            t = time.perf_counter()
            fn()
            T[k].append(time.perf_counter() - t)
    m = {k: statistics.median(v) for k, v in T.items()}
    kind = tvlens.backends.get_backend(model).kind
    print(f"[extract-vs-body] {a.model} ({kind}, TL {tvlens.backends.tl_version()}): {len(p)} {a.family} prompts x "
          f"{toks.shape[1]} tokens, {n + 1} layers, batch {bs}, {a.threads} thread(s), medians of {a.rounds}; "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"[extract-vs-body] HF body alone (SDPA) {m['hf_body']:.2f} s | tvlens.extract {m['extract']:.2f} s | "
          f"ratio extract/body {m['extract'] / m['hf_body']:.2f}x | max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
