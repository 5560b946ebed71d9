"""Inputs and gradients shared by the fast scoring methods: prepared clean/corrupted prompts, IG alphas,
the interpolated-gradient pass."""

from __future__ import annotations

from dataclasses import replace

import torch

from tvlens.accuracy import metric_fn
from tvlens.backends import get_backend
from tvlens.circuits.graph import _has_mlps
from tvlens.errors import ConfigError
from tvlens.positions import shuffle_labels, trim_to_answers

DEFAULT_IG_STEPS = 5


# --------------------------------------------------------------------------- inputs
def _check_steps(ig_steps, model=None, prompts=None) -> int:
    """``ig_steps``: an integer >= 1 (numpy integers welcome) whose cost, every step a forward and backward pass
    of the prompts held in memory at once, is checked before any work (``tvlens.checks.check_size``)."""
    from tvlens.checks import check_size, forward_flops, transformer_batch_bytes

    kw = {}
    if model is not None and prompts is not None and getattr(prompts, "tokens", None) is not None:
        bk = get_backend(model)
        n, seq = prompts.tokens.shape
        dims = dict(n_layers=int(bk.n_layers), d_model=int(bk.d_model), d_mlp=4 * int(bk.d_model))
        kw = dict(flops_each=forward_flops(n * seq, **dims, d_vocab_out=int(bk.d_vocab_out), seq=seq, backward=True),
                  bytes_each=transformer_batch_bytes(1, seq, **dims, n_heads=int(bk.n_heads),
                                                     d_vocab_out=int(bk.d_vocab_out), backward=True),
                  what=f"ig_steps={ig_steps!r} interpolation steps over {n} prompts of {seq} tokens")
    return check_size(ig_steps, "ig_steps", minimum=1, hint="1 = plain EAP, the gradient at the corrupted run", **kw)



def _prepare(model, prompts, corrupted, metric, method: str, seed: int, gradient: bool):
    """Validated, trimmed clean and corrupted prompts on the model's device and the per-prompt metric."""
    from tvlens.accuracy import check_prompts_fit

    if getattr(prompts, "is_continuous", False):
        raise ConfigError(
            f"prompts: method {method!r} scores the query's answer tokens, and these prompts are continuous "
            "(regression). For regression prompts use tvlens.sweeps.activation_patching with your own metric on "
            "the model's outputs, or run_patching/task_decodability")
    check_prompts_fit(model, prompts)
    if corrupted is None:
        try:
            corrupted = shuffle_labels(prompts, seed)
        except ConfigError as e:
            raise ConfigError(f"corrupted: method {method!r} needs corrupted counterparts of the prompts and none "
                              f"were given; the default (in-context labels shuffled) cannot be built: {e}. Pass "
                              "corrupted= prompts of the same layout") from e
    elif (corrupted.tokens is None or corrupted.tokens.shape != prompts.tokens.shape
          or not torch.equal(corrupted.query_pos.cpu(), prompts.query_pos.cpu())):
        got = None if corrupted.tokens is None else tuple(corrupted.tokens.shape)
        raise ConfigError(f"corrupted: expected prompts with the same token shape {tuple(prompts.tokens.shape)} and "
                          f"query positions as prompts, got shape {got}: build them from the same prompts")
    if gradient and metric == "accuracy":
        raise ConfigError(f"metric='accuracy' is not differentiable (an argmax): method={method!r} needs a gradient; "
                          "use 'logprob', 'prob' or 'logit'")
    fn, name = metric_fn("logprob" if metric is None else metric, "atp" if gradient else method)
    bk = get_backend(model)
    dev = bk.input_device
    return bk, trim_to_answers(prompts).to(dev), trim_to_answers(corrupted).to(dev), fn, name


def swap_contexts(prompts, seed: int = 0):
    """Corrupted counterparts that change the task: each prompt's in-context examples replaced by those of a
    prompt of another task with the same layout (same query position and example span), the query kept.
    Returns ``(clean, corrupted)``: the prompts that found a partner, and their corrupted versions (same
    shape and query positions). Where shuffled labels leave the task visible (``categories``), this does not."""
    if prompts.is_continuous or prompts.tokens is None or not prompts.vocab or ";" not in prompts.vocab:
        raise ConfigError("prompts: swap_contexts needs token prompts whose examples end with ';'")
    end = prompts.vocab.index(";")
    toks, q = prompts.tokens.cpu(), prompts.query_pos.cpu()
    starts = []
    for i in range(len(prompts)):
        e = (toks[i, : int(q[i])] == end).nonzero().flatten()
        starts.append(int(e[-1]) + 1 if len(e) else 0)
    g = torch.Generator().manual_seed(seed)
    keep, partner = [], []
    for i in range(len(prompts)):
        cands = [j for j in range(len(prompts)) if int(prompts.labels[j]) != int(prompts.labels[i])
                 and starts[j] == starts[i] and int(q[j]) == int(q[i]) and starts[i] > 0]
        if cands:
            keep.append(i)
            partner.append(cands[int(torch.randint(len(cands), (1,), generator=g))])
    if not keep:
        raise ConfigError("prompts: no two prompts of different tasks share a layout; sample more prompts per task")
    clean = prompts.subset(keep)
    t = clean.tokens.clone()
    for r, (i, j) in enumerate(zip(keep, partner)):
        t[r, : starts[i]] = prompts.tokens[j, : starts[i]]
    return clean, replace(clean, tokens=t)


def _gather(resid: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
    reps = resid.shape[0] // reads.shape[0]
    r = reads.repeat(reps, 1)
    return resid.gather(1, r[..., None].expand(-1, -1, resid.shape[-1]))


def _chunks(n: int, size: int):
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]


# --------------------------------------------------------------------------- gradients
IG_RULE = "left"  # "left": alpha = k / m, k = 0..m-1 (hannamw/EAP-IG); "midpoint": (k + 1/2) / m


def ig_alphas(steps: int, rule: str | None = None) -> list[float]:
    """The interpolation points of ``steps`` IG steps (0 = corrupted, 1 = clean)."""
    rule = IG_RULE if rule is None else rule
    if rule == "midpoint":
        return [(k + 0.5) / steps for k in range(steps)]
    return [k / steps for k in range(steps)]

def _ig_gradients(bk, clean_x, corr_x, reads, answers, fn, steps: int, names: list[str], final: bool = False,
                  drop_groups: int = 0, method: str = "eap-ig"):
    """Mean over IG steps of ``d metric / d act`` at canonical hooks ``names`` (``[B, ...]``), and (``final``)
    at the final residual; the corrupted run's per-prompt metric. ``drop_groups``: GradDrop instead of IG
    (the corrupted run repeated once per layer, gradient stopped at that layer's attention and MLP outputs;
    returns ``[L, B, ...]``)."""
    with torch.no_grad():
        e_c = bk.embed_input(clean_x)
        e_k = bk.embed_input(corr_x)
    B = e_k.shape[0]
    if drop_groups:
        G = drop_groups
        E = e_k.repeat(G, *([1] * (e_k.ndim - 1)))
    else:
        G = steps
        E = torch.cat([e_k + a * (e_c - e_k) for a in ig_alphas(steps)])
    E = E.detach().requires_grad_(True)
    grads: dict[str, torch.Tensor] = {}

    def keep(n):
        def hook(g, hook):
            grads[n] = g.detach() if n not in grads else grads[n] + g.detach()
        return hook

    fwd = []
    if drop_groups:
        L = bk.n_layers

        def stop(layer):
            def hook(act, hook):
                m = torch.zeros(act.shape[0], *([1] * (act.ndim - 1)), dtype=act.dtype, device=act.device)
                m[layer * B:(layer + 1) * B] = 1
                return act.detach() * m + act * (1 - m)
            return hook
        mlps = _has_mlps(bk)
        for layer in range(L):
            fwd.append((f"blocks.{layer}.hook_attn_out", stop(layer)))
            if mlps:
                fwd.append((f"blocks.{layer}.hook_mlp_out", stop(layer)))
    with torch.enable_grad(), bk.hooks(fwd_hooks=fwd, bwd_hooks=[(n, keep(n)) for n in names]):
        resid = bk.run_from(E, 0)
        logits = bk.unembed(_gather(resid, reads))
        m = fn(logits, answers.repeat(G, 1))
        if not torch.is_tensor(m) or not m.requires_grad:
            raise ConfigError(f"metric: method={method!r} needs a differentiable metric, but its value has no "
                              "gradient; compute it from the logits with differentiable operations (not argmax "
                              "or .item())")
        if m.shape != (G * B,):
            raise ConfigError(f"metric must return one number per prompt, shape ({G * B},); it returned "
                              f"{tuple(m.shape)}")
        outs = torch.autograd.grad(m.sum(), [E, resid] if final else [E])
    missing = [n for n in names if n not in grads]
    if missing:
        from tvlens.errors import HookError

        raise HookError(f"no gradient reached hooks {missing[:4]} on this {bk.kind} model")
    if final:
        grads["final"] = outs[1].detach()

    def fold(g):
        g = g.reshape(G, B, *g.shape[1:])
        return g if drop_groups else g.mean(0)

    base = m.detach().reshape(G, B)[0].float().cpu()
    out = {n: fold(g) for n, g in grads.items()}
    if not drop_groups:  # the first step (alpha = 0 with the left rule): the gradient at the corrupted run
        out.update({n + "@0": g.reshape(G, B, *g.shape[1:])[0] for n, g in grads.items() if n.endswith("hook_pattern")})
    return out, base


def _writers(bk, x, mlps: bool) -> dict[str, torch.Tensor]:
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.attn.hook_z" for l in range(bk.n_layers)]
    if mlps:
        names += [f"blocks.{l}.hook_mlp_out" for l in range(bk.n_layers)]
    with torch.no_grad():
        return {n: a.detach() for n, a in bk.capture(x, names).items()}
