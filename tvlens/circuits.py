"""Circuits: fast attribution of heads, MLPs and edges (EAP, EAP-IG, AtP + GradDrop), exact path patching,
and the faithfulness of the circuits they find.

The graph (as in Hanna et al. 2024 and TransformerLens 4's ``tools/analysis/attribution_patching``):

- **senders** write into the residual stream: ``"embed"`` (the residual entering block 0), each head
  ``"L{l}H{h}"`` (its output ``z @ W_O``), each MLP ``"MLP{l}"``;
- **receivers** read it: each head's query, key and value input ``"L{l}H{h}.q"`` / ``.k`` / ``.v``, each
  MLP's input ``"MLP{l}"``, and ``"logits"`` (the final residual);
- an **edge** ``sender -> receiver`` exists when the sender is upstream: a head of layer ``l`` feeds the
  heads of later layers, the MLP of its own and later layers, and the logits; an MLP of layer ``l`` feeds
  everything of later layers; the embedding feeds everything.

An edge's value is the metric after **path patching** it (``path_patching``): in the corrupted run, only
that receiver's input gets the sender's clean-minus-corrupted output added (``input = corrupted input +
(clean sender - corrupted sender)``, at every position); every other component stays corrupted, and the
change flows on through everything downstream of the receiver. The number reported is ``patched -
corrupted`` (as ``head_attribution(method="patch")``). It runs on the batched sweep engine
(``tvlens.sweeps.activation_patching``): the senders are stacked along the batch axis and all edges into one
receiver type of one layer go through one engine call.

**EAP** estimates every edge at once: ``(clean sender - corrupted sender) . d metric / d receiver input``,
the gradient taken on the corrupted run (the denoising convention of TransformerLens 4, whose
``attribution_patch(granularity="edge")`` it equals, summed over positions). **EAP-IG** averages that
gradient over ``ig_steps`` runs whose input embeddings are interpolated from the corrupted to the clean
prompt (``alpha = k / ig_steps``, ``k = 0..ig_steps-1``, as ``hannamw/EAP-IG``), all in one batched
forward and backward. ``ig_steps=1`` is EAP.

Node scores (``head_attribution(method="eap-ig")``) are the same estimate at the head's output ``hook_z``
(and the MLP's ``hook_mlp_out``): of patching that one node's clean output into the corrupted run at every
position, the number ``method="patch"`` computes exactly.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from tvlens.backends import get_backend
from tvlens.errors import ConfigError
from tvlens.io import load_tensors_with_sidecar, save_tensors_with_sidecar

DEFAULT_IG_STEPS = 5
RECEIVER_KINDS = ("q", "k", "v", "mlp", "logits")


# --------------------------------------------------------------------------- inputs
def _check_steps(ig_steps) -> int:
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise ConfigError(f"ig_steps must be an integer >= 1 (1 = plain EAP, the gradient at the corrupted run), "
                          f"got {ig_steps!r}")
    return ig_steps


def _has_mlps(bk) -> bool:
    from tvlens.errors import HookError

    for name in ("blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_in"):  # an attention-only model still has hook_mlp_out
        try:
            bk.hook_name(name)
            return True
        except HookError:
            pass
    return False


def _prepare(model, prompts, corrupted, metric, method: str, seed: int, gradient: bool):
    """Validated, trimmed clean and corrupted prompts on the model's device and the per-prompt metric."""
    from tvlens.accuracy import check_prompts_fit
    from tvlens.attribution import _metric_fn, _trim, shuffle_labels

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
    fn, name = _metric_fn("logprob" if metric is None else metric, "atp" if gradient else method)
    bk = get_backend(model)
    dev = bk.input_device
    return bk, _trim(prompts).to(dev), _trim(corrupted).to(dev), fn, name


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


def _reads(P) -> torch.Tensor:
    from tvlens.attribution import _answer_pos

    return _answer_pos(P)


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


# --------------------------------------------------------------------------- node scores
def node_attribution(model, P, C, fn, ig_steps: int = DEFAULT_IG_STEPS, batch_size: int = 64, mlps: bool = True,
                     progress: bool = False, grad_drop: bool = False):
    """EAP-IG (or, ``grad_drop``, AtP + GradDrop at ``hook_z``) node estimates on trimmed prompts.

    Returns ``heads [n, layer, head]``, ``mlp [n, layer]`` (None without MLPs), the corrupted metric."""
    from tqdm.auto import tqdm

    bk = get_backend(model)
    steps = _check_steps(ig_steps)
    mlps = mlps and _has_mlps(bk)
    L = bk.n_layers
    names = [f"blocks.{l}.attn.hook_z" for l in range(L)] + ([f"blocks.{l}.hook_mlp_out" for l in range(L)] if mlps else [])
    heads, mlp_vals, bases = [], [], []
    reads = _reads(P)
    per = max(1, batch_size // (L if grad_drop else steps))
    for sl in tqdm(_chunks(len(P), per), desc="eap-ig" if not grad_drop else "atp+graddrop", disable=not progress,
                   leave=False):
        wc, wk = _writers(bk, P.tokens[sl], mlps), _writers(bk, C.tokens[sl], mlps)
        g, base = _ig_gradients(bk, P.tokens[sl], C.tokens[sl], reads[sl], P.answers[sl], fn, steps, names,
                                drop_groups=L if grad_drop else 0, method="atp" if grad_drop else "eap-ig")
        bases.append(base)

        def est(n, dims):
            d = wc[n] - wk[n]
            if grad_drop:  # AtP*: (1 / (L - 1)) sum over dropped layers of |estimate|, signed by plain AtP
                v = (d[None] * g[n]).sum(dims)
                return v.abs().sum(0) / max(L - 1, 1)
            return (d * g[n]).sum(dims)

        heads.append(torch.stack([est(f"blocks.{l}.attn.hook_z", (1, 3) if not grad_drop else (2, 4))
                                  for l in range(L)], 1).float().cpu())
        if mlps:
            mlp_vals.append(torch.stack([est(f"blocks.{l}.hook_mlp_out", (1, 2) if not grad_drop else (2, 3))
                                         for l in range(L)], 1).float().cpu())
    return torch.cat(heads), (torch.cat(mlp_vals) if mlps else None), float(torch.cat(bases).mean())


def head_scores(model, prompts, method, metric, corrupted, per_task, layers, seed, batch_size, progress, ig_steps,
                grad_drop):
    """``head_attribution(method="eap-ig")`` and ``method="atp", grad_drop=True``: a ``HeadScores``."""
    from tvlens.attribution import HeadScores, _per_task

    if grad_drop is not False and grad_drop is not True:
        raise ConfigError(f"grad_drop must be True or False, got {grad_drop!r}")
    if grad_drop and method != "atp":
        raise ConfigError(f"grad_drop=True is AtP*'s GradDrop: use it with method='atp', not method={method!r}")
    if method == "atp" and ig_steps is not None:
        raise ConfigError("ig_steps applies to method='eap-ig'; method='atp' takes one gradient per dropped layer")
    steps = _check_steps(DEFAULT_IG_STEPS if ig_steps is None else ig_steps)
    bk, P, C, fn, metric_name = _prepare(model, prompts, corrupted, metric, method, seed, gradient=True)
    heads, mlp, base = node_attribution(model, P, C, fn, ig_steps=steps, batch_size=batch_size, progress=progress,
                                        grad_drop=grad_drop)
    if layers is not None:
        keep = torch.zeros(bk.n_layers, dtype=torch.bool)
        keep[list(layers)] = True
        heads[:, ~keep] = float("nan")
    labels = prompts.labels.cpu()
    names = list(prompts.task_names)
    by_task, scores = _per_task(heads, labels, names)
    notes = {"seed": seed, "corrupted_metric": base, "layers": list(range(bk.n_layers)) if layers is None else list(layers)}
    if grad_drop:
        notes.update(atp_site="z", grad_drop=True)
    else:
        notes["ig_steps"] = steps
    if mlp is not None:
        notes["mlp"] = _per_task(mlp, labels, names)[1].tolist()
    return HeadScores(scores=scores, method=method, metric=metric_name, task_names=names,
                      per_task=by_task if per_task else None, prompts=_describe(prompts), notes=notes)


# --------------------------------------------------------------------------- the edge graph
@dataclass(frozen=True)
class Graph:
    """Senders, receivers and the edges between them of one model shape (see the module docstring)."""

    n_layers: int
    n_heads: int
    mlps: bool = True

    @property
    def senders(self) -> list[str]:
        out = ["embed"]
        for l in range(self.n_layers):
            out += [f"L{l}H{h}" for h in range(self.n_heads)] + ([f"MLP{l}"] if self.mlps else [])
        return out

    @property
    def receivers(self) -> list[str]:
        out = []
        for l in range(self.n_layers):
            for k in "qkv":
                out += [f"L{l}H{h}.{k}" for h in range(self.n_heads)]
            if self.mlps:
                out.append(f"MLP{l}")
        return out + ["logits"]

    @staticmethod
    def sender_layer(s: str) -> tuple[str, int, int | None]:
        """(kind, layer, head) of a sender: kind ``embed`` (layer -1), ``head`` or ``mlp``."""
        if s == "embed":
            return "embed", -1, None
        if s.startswith("MLP") and s[3:].isdigit():
            return "mlp", int(s[3:]), None
        if s.startswith("L") and "H" in s:
            a, b = s[1:].split("H", 1)
            if a.isdigit() and b.isdigit():
                return "head", int(a), int(b)
        raise ConfigError(f"unknown sender {s!r}: senders are 'embed', 'L{{layer}}H{{head}}' or 'MLP{{layer}}'")

    @staticmethod
    def receiver_layer(r: str) -> tuple[str, int, int | None]:
        """(kind, layer, head) of a receiver: kind ``q``/``k``/``v``, ``mlp`` or ``logits`` (layer n_layers)."""
        if r == "logits":
            return "logits", 10**9, None
        if r.startswith("MLP") and r[3:].isdigit():
            return "mlp", int(r[3:]), None
        if "." in r:
            head, k = r.rsplit(".", 1)
            if k in ("q", "k", "v"):
                kind, l, h = Graph.sender_layer(head)
                if kind == "head":
                    return k, l, h
        raise ConfigError(f"unknown receiver {r!r}: receivers are 'L{{layer}}H{{head}}.q' (.k, .v), 'MLP{{layer}}' "
                          "or 'logits'")

    @staticmethod
    def upstream(sender: str, receiver: str) -> bool:
        sk, sl, _ = Graph.sender_layer(sender)
        rk, rl, _ = Graph.receiver_layer(receiver)
        if sk == "embed" or rk == "logits":
            return True
        if rk == "mlp":
            return sl < rl or (sk == "head" and sl == rl)
        return sl < rl

    @property
    def edges(self) -> list[tuple[str, str]]:
        return [(s, r) for r in self.receivers for s in self.senders if self.upstream(s, r)]

    def check_edge(self, sender: str, receiver: str) -> None:
        for name, known in ((sender, self.senders), (receiver, self.receivers)):
            if name not in known:
                raise ConfigError(f"edge ({sender!r}, {receiver!r}): {name!r} is not in this model's graph "
                                  f"({self.n_layers} layers x {self.n_heads} heads{', MLPs' if self.mlps else ''})")
        if not self.upstream(sender, receiver):
            raise ConfigError(f"edge ({sender!r}, {receiver!r}): the sender is not upstream of the receiver (a head "
                              "of layer l feeds heads of later layers, the MLP of layer l and later, and the logits; "
                              "an MLP of layer l feeds later layers); pick a receiver downstream of the sender")


def graph_of(model) -> Graph:
    bk = get_backend(model)
    return Graph(bk.n_layers, bk.n_heads, _has_mlps(bk))


def _receiver_kind(r: str) -> str:
    return Graph.receiver_layer(r)[0]


# --------------------------------------------------------------------------- EdgeScores
@dataclass
class EdgeScores:
    """One score per edge ``sender -> receiver`` (larger = patching it restores more of the clean metric).

    - ``scores[e]``: mean over prompts; ``edges[e]``: ``(sender, receiver)``;
    - ``per_prompt[n, e]`` where kept, and ``ci[2, e]`` (bootstrap 95% interval over prompts, where computed);
    - ``method`` (``"eap"``, ``"eap-ig"``, ``"path-patch"``), ``metric``, ``n_layers``, ``n_heads``,
      ``prompts`` (a description), ``notes`` (clean/corrupted metric, ig_steps, ...).
    """

    scores: torch.Tensor
    edges: list[tuple[str, str]]
    method: str
    metric: str
    n_layers: int
    n_heads: int
    per_prompt: torch.Tensor | None = None
    ci: torch.Tensor | None = None
    prompts: str = ""
    notes: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.edges)

    @property
    def graph(self) -> Graph:
        return Graph(self.n_layers, self.n_heads, any(s.startswith("MLP") for s, _ in self.edges))

    def receiver_kinds(self) -> list[str]:
        return [_receiver_kind(r) for _, r in self.edges]

    def score(self, sender: str, receiver: str) -> float:
        try:
            return float(self.scores[self.edges.index((sender, receiver))])
        except ValueError:
            self.graph.check_edge(sender, receiver)
            raise ConfigError(f"edge ({sender!r}, {receiver!r}) was not scored") from None

    def order(self, by_abs: bool = True) -> list[int]:
        """Edge indices best first (ties: graph order)."""
        key = self.scores.abs() if by_abs else self.scores
        key = torch.nan_to_num(key.double(), nan=-float("inf"))
        return torch.sort(-key, stable=True).indices.tolist()

    def top(self, k: int = 10, by_abs: bool = True) -> list[tuple[str, str, float]]:
        """The ``k`` highest-scoring edges as ``(sender, receiver, score)``, by ``|score|`` unless ``by_abs=False``."""
        n = len(self.edges)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ConfigError(f"k must be an integer in 1..{n} (the number of edges in the graph), got {k!r}")
        return [(*self.edges[i], float(self.scores[i])) for i in self.order(by_abs)[:k]]

    def to_dataframe(self):
        import pandas as pd

        df = pd.DataFrame({"sender": [s for s, _ in self.edges], "receiver": [r for _, r in self.edges],
                           "receiver_kind": self.receiver_kinds(), "score": self.scores.double().numpy()})
        if self.ci is not None:
            df["ci_low"] = self.ci[0].double().numpy()
            df["ci_high"] = self.ci[1].double().numpy()
        return df

    def with_ci(self, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> "EdgeScores":
        """Bootstrap (over prompts) interval of every edge's mean score; needs ``per_prompt``."""
        if self.per_prompt is None:
            raise ConfigError("these scores keep no per-prompt values; compute them with per_prompt=True")
        x = self.per_prompt.double()
        n = x.shape[0]
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, n, (n_boot, n), generator=g)
        means = torch.stack([x[i].mean(0) for i in idx])
        a = (1 - level) / 2
        ci = torch.quantile(means, torch.tensor([a, 1 - a], dtype=torch.float64), dim=0).float()
        return replace(self, ci=ci, notes={**self.notes, "ci": f"{level:.0%} bootstrap over {n} prompts, "
                                                               f"{n_boot} resamples, seed {seed}"})

    def __repr__(self) -> str:
        top = ", ".join(f"{s}->{r} {v:+.3g}" for s, r, v in self.top(min(3, len(self.edges))))
        return (f"EdgeScores({self.method}, metric={self.metric}, {len(self.edges)} edges, "
                f"{self.n_layers}x{self.n_heads} heads; top: {top})")

    def _repr_html_(self) -> str:
        from tvlens.views.page import result_html

        df = self.to_dataframe().iloc[self.order()[:10]]
        return result_html(f"<div><b>Edge attribution</b> ({html.escape(self.method)}, metric "
                           f"{html.escape(self.metric)}{', ' + html.escape(self.prompts) if self.prompts else ''})"
                           + df.to_html(index=False, float_format=lambda v: f"{v:.4g}") + "</div>", [self.plot()])

    def plot(self, model=None, prompts=None, prompt: int = 0, k: int = 20, title: str = ""):
        """The interactive circuit graph (``tvlens.views.circuit_graph_view``); with ``model`` and ``prompts``
        a click on a head shows its attention on that prompt."""
        from tvlens.views.circuit_graph import circuit_graph_view

        return circuit_graph_view(self, model=model, prompts=prompts, prompt=prompt, k=k, title=title)

    def save(self, path: str | Path) -> Path:
        tensors = {"scores": self.scores.float().contiguous()}
        if self.per_prompt is not None:
            tensors["per_prompt"] = self.per_prompt.float().contiguous()
        if self.ci is not None:
            tensors["ci"] = self.ci.float().contiguous()
        meta = {"kind": "EdgeScores", "method": self.method, "metric": self.metric, "n_layers": self.n_layers,
                "n_heads": self.n_heads, "edges": [list(e) for e in self.edges], "prompts": self.prompts,
                "notes": self.notes}
        return save_tensors_with_sidecar(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> "EdgeScores":
        t, m = load_tensors_with_sidecar(path, expect_kind="EdgeScores")
        return cls(scores=t["scores"], edges=[tuple(e) for e in m["edges"]], method=m["method"], metric=m["metric"],
                   n_layers=int(m["n_layers"]), n_heads=int(m["n_heads"]), per_prompt=t.get("per_prompt"),
                   ci=t.get("ci"), prompts=m.get("prompts", ""), notes=dict(m.get("notes", {})))


# --------------------------------------------------------------------------- edge attribution
def _sender_outputs(bk, w: dict[str, torch.Tensor], graph: Graph) -> torch.Tensor:
    """Every sender's write to the residual stream ``[b, pos, n_senders, d_model]`` (graph order)."""
    W_O = bk.W_O
    outs = [w["blocks.0.hook_resid_pre"][:, :, None]]
    for l in range(graph.n_layers):
        z = w[f"blocks.{l}.attn.hook_z"]
        outs.append(torch.einsum("bphd,hdm->bphm", z, W_O[l].to(z.dtype)))
        if graph.mlps:
            outs.append(w[f"blocks.{l}.hook_mlp_out"][:, :, None])
    return torch.cat(outs, 2)


def _receiver_hooks(graph: Graph) -> list[tuple[str, str, int | None, str]]:
    """(receiver name, canonical hook, head index, kind) in graph order (logits last, hook ``final``)."""
    out = []
    for l in range(graph.n_layers):
        for k in "qkv":
            out += [(f"L{l}H{h}.{k}", f"blocks.{l}.hook_{k}_input", h, k) for h in range(graph.n_heads)]
        if graph.mlps:
            out.append((f"MLP{l}", f"blocks.{l}.hook_mlp_in", None, "mlp"))
    return out + [("logits", "final", None, "logits")]


class _EdgeFlags:
    """Turn on the split q/k/v inputs and hook_mlp_in for the duration (restored after)."""

    def __init__(self, bk, mlps: bool):
        self.bk, self.mlps = bk, mlps

    def __enter__(self):
        self.old = (self.bk.set_use_split_qkv_input(True), self.bk.set_use_hook_mlp_in(True) if self.mlps else None)
        return self

    def __exit__(self, *exc):
        self.bk.set_use_split_qkv_input(self.old[0])
        if self.mlps:
            self.bk.set_use_hook_mlp_in(self.old[1])


def edge_attribution(model, prompts, method: str = "eap-ig", corrupted=None, metric=None,
                     ig_steps: int | None = None, seed: int = 0, batch_size: int = 64, per_prompt: bool = True,
                     ci: bool = False, progress: bool = True, positions=None, qk_fix: bool | None = None) -> EdgeScores:
    """Score every edge of the graph by ``method``: ``"eap-ig"`` (default, ``ig_steps`` default
    ``DEFAULT_IG_STEPS``), ``"eap"`` (= ``ig_steps=1``) or ``"path-patch"`` (exact, ``path_patching``).

    ``corrupted``: the corrupted prompts (default: in-context labels shuffled, ``shuffle_labels(prompts,
    seed)``). ``metric``: as ``head_attribution`` (default ``"logprob"`` of the answer). ``ci``: add a
    bootstrap interval over prompts (cheap: the per-prompt scores are kept anyway).

    ``positions``: None (every position), ``"query"``, ``"answers"`` (the in-context examples' answer tokens,
    ``tvlens.encoding.representation_mask``) or a boolean mask ``[n, seq]``: the estimate of patching the edge
    only where its receiver reads at those positions (which heads read the task at the query, which write it
    at the examples' answers)."""
    if method == "path-patch":
        return path_patching(model, prompts, corrupted=corrupted, metric=metric, seed=seed, ci=ci, progress=progress)
    if method not in ("eap", "eap-ig"):
        raise ConfigError(f"method must be 'eap-ig', 'eap' or 'path-patch', got {method!r}")
    if method == "eap":
        if ig_steps not in (None, 1):
            raise ConfigError(f"ig_steps: method='eap' is one gradient (ig_steps=1), got ig_steps={ig_steps!r}; "
                              "use method='eap-ig' for more steps")
        steps = 1
    else:
        steps = _check_steps(DEFAULT_IG_STEPS if ig_steps is None else ig_steps)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    bk, P, C, fn, metric_name = _prepare(model, prompts, corrupted, metric, method, seed, gradient=True)
    from tqdm.auto import tqdm

    graph = graph_of(model)
    recv = _receiver_hooks(graph)
    names = sorted({h for _, h, _, _ in recv if h != "final"})
    if qk_fix is None:
        qk_fix = method == "eap-ig"
    if qk_fix is not True and qk_fix is not False:
        raise ConfigError(f"qk_fix must be True or False, got {qk_fix!r}")
    if qk_fix:
        names += [f"blocks.{l}.attn.hook_pattern" for l in range(graph.n_layers)]
    edges = graph.edges
    s_idx = {s: i for i, s in enumerate(graph.senders)}
    r_idx = {r: i for i, (r, *_) in enumerate(recv)}
    e_s = torch.tensor([s_idx[s] for s, _ in edges])
    e_r = torch.tensor([r_idx[r] for _, r in edges])
    reads = _reads(P)
    pmask = _position_mask(prompts, positions, P.tokens.shape[1]).to(P.tokens.device)
    vals, bases = [], []
    with _EdgeFlags(bk, graph.mlps):
        for sl in tqdm(_chunks(len(P), max(1, batch_size // steps)), desc=method, disable=not progress, leave=False):
            with torch.no_grad():
                wk = _writers(bk, C.tokens[sl], graph.mlps)
                delta = (_sender_outputs(bk, _writers(bk, P.tokens[sl], graph.mlps), graph)
                         - _sender_outputs(bk, wk, graph))  # [b, pos, S, d]
            g, base = _ig_gradients(bk, P.tokens[sl], C.tokens[sl], reads[sl], P.answers[sl], fn, steps, names,
                                    final=True, method=method)
            bases.append(base)
            # receiver gradients [b, pos, R, d]
            gr = torch.stack([g[h][:, :, i] if i is not None else g[h] for _, h, i, _ in recv], 2)
            m = torch.einsum("bpsd,bprd,bp->bsr", delta.float(), gr.float(), pmask[sl].float())  # sender x receiver
            if qk_fix:
                _qk_fix_edges(bk, graph, C.tokens[sl], delta * pmask[sl][:, :, None, None].to(delta.dtype), g, m,
                              s_idx, r_idx)
            vals.append(m[:, e_s, e_r].cpu())
    pp = torch.cat(vals)
    res = EdgeScores(scores=pp.mean(0), edges=edges, method=method, metric=metric_name, n_layers=graph.n_layers,
                     n_heads=graph.n_heads, per_prompt=pp if per_prompt or ci else None,
                     prompts=_describe(prompts), notes={"ig_steps": steps, "seed": seed, "qk_fix": qk_fix,
                                                        "positions": positions if positions is None or isinstance(
                                                            positions, str) else "mask",
                                                        "corrupted_metric": float(torch.cat(bases).mean())})
    res = res.with_ci(seed=seed) if ci else res
    if not per_prompt:
        res.per_prompt = None
    return res


@torch.no_grad()
def _qk_fix_edges(bk, graph: Graph, corr_x, delta, g, m, s_idx, r_idx) -> None:
    """Overwrite ``m[b, sender, receiver]`` for q and k receivers with the AtP* QK-fixed estimate."""
    L, H = graph.n_layers, graph.n_heads
    cap = bk.capture(corr_x, [f"blocks.{l}.{n}" for l in range(L) for n in
                              ("hook_resid_pre", "attn.hook_pattern", "attn.hook_q", "attn.hook_k")])
    b = delta.shape[0]
    old_split = bk.set_use_split_qkv_input(False)  # one residual input for q, k and v: the fork is not needed
    try:
        for l in range(L):
            snd = [s for s in graph.senders if graph.upstream(s, f"L{l}H0.q")]
            idx = [s_idx[s] for s in snd]
            S = len(idx)
            d = delta[:, :, idx].permute(2, 0, 1, 3).reshape(S * b, delta.shape[1], -1)  # [S*b, pos, d]
            start = cap[f"blocks.{l}.hook_resid_pre"].repeat(S, 1, 1) + d.to(cap[f"blocks.{l}.hook_resid_pre"].dtype)
            a_k = cap[f"blocks.{l}.attn.hook_pattern"]  # [b, head, q, k]
            ga = g[f"blocks.{l}.attn.hook_pattern@0"]  # linearised after the softmax at the corrupted run
            for kind in "qk":
                # the sender's output reaches this receiver only: the other side keeps the corrupted run's value
                other = "k" if kind == "q" else "q"
                keep = cap[f"blocks.{l}.attn.hook_{other}"]

                def fixed(act, hook, _c=keep, _S=S):
                    return _c.repeat(_S, *([1] * (_c.ndim - 1))).to(act.dtype)
                a_new = bk.attention_pattern(start, l, [(f"blocks.{l}.attn.hook_{other}", fixed)])
                a_new = a_new.reshape(S, b, *a_k.shape[1:])
                est = torch.nan_to_num((a_new - a_k[None]) * ga[None]).sum((3, 4)).float()  # [S, b, head]
                for h in range(H):
                    m[:, idx, r_idx[f"L{l}H{h}.{kind}"]] = est[:, :, h].T
    finally:
        bk.set_use_split_qkv_input(old_split)


def _position_mask(prompts, positions, seq: int) -> torch.Tensor:
    n = len(prompts)
    if positions is None:
        return torch.ones(n, seq, dtype=torch.bool)
    if isinstance(positions, str):
        if positions not in ("query", "answers"):
            raise ConfigError(f"positions must be None, 'query', 'answers' or a boolean mask [n, seq]; got {positions!r}")
        from tvlens.encoding import representation_mask

        m = representation_mask(prompts, positions).cpu()
    else:
        m = torch.as_tensor(positions).cpu()
        if m.dtype != torch.bool or m.ndim != 2 or m.shape[0] != n or m.shape[1] > prompts.tokens.shape[1]:
            raise ConfigError(f"positions: a boolean mask of shape [{n}, <= {prompts.tokens.shape[1]}] expected, got "
                              f"{m.dtype} {tuple(m.shape)}")
    out = torch.zeros(n, seq, dtype=torch.bool)
    w = min(seq, m.shape[1])
    out[:, :w] = m[:, :w]
    return out


def _describe(prompts) -> str:
    from tvlens.attribution import _describe as d

    return d(prompts)


# --------------------------------------------------------------------------- exact path patching
@torch.no_grad()
def path_patching(model, prompts, edges=None, corrupted=None, metric=None, seed: int = 0, batch_size: int = 4096,
                  ci: bool = False, progress: bool = True) -> EdgeScores:
    """Exact path patching of every edge (or the given ``edges``, ``(sender, receiver)`` pairs): the metric
    after adding the sender's clean-minus-corrupted output to that receiver's input only, minus the corrupted
    run's metric (see the module docstring). Built on ``tvlens.sweeps.activation_patching``: one engine call
    per receiver kind (q, k, v, MLP) and layer, all senders stacked along the batch."""
    from tqdm.auto import tqdm

    from tvlens.sweeps import activation_patching

    bk, P, C, fn, metric_name = _prepare(model, prompts, corrupted, metric, "path-patch", seed, gradient=False)
    graph = graph_of(model)
    if edges is None:
        edges = graph.edges
    else:
        edges = [tuple(e[:2]) for e in edges]
        if not edges:
            raise ConfigError("edges: expected a non-empty list of (sender, receiver) pairs, got none")
        for s, r in edges:
            graph.check_edge(s, r)
    senders = graph.senders
    s_idx = {s: i for i, s in enumerate(senders)}
    B = len(P)
    reads = _reads(P)
    answers = P.answers
    L = graph.n_layers
    with _EdgeFlags(bk, graph.mlps):
        cap_names = [f"blocks.{l}.hook_{k}_input" for l in range(L) for k in "q"]
        cap_names += [f"blocks.{l}.hook_mlp_in" for l in range(L)] if graph.mlps else []
        corr_in = bk.capture(C.tokens, cap_names)
        delta = (_sender_outputs(bk, _writers(bk, P.tokens, graph.mlps), graph)
                 - _sender_outputs(bk, _writers(bk, C.tokens, graph.mlps), graph))  # [B, pos, S, d]
        final_k = bk.final_resid(C.tokens)
        corr_pp = fn(bk.unembed(_gather(final_k, reads)), answers).float().cpu()
        clean_m = float(fn(bk.unembed(_gather(bk.final_resid(P.tokens), reads)), answers).float().mean())
        out = torch.full((B, len(edges)), float("nan"))
        e_pos = {e: i for i, e in enumerate(edges)}
        # group the wanted edges by (receiver kind, layer)
        groups: dict[tuple[str, int], set[str]] = {}
        for s, r in edges:
            k, l, _ = Graph.receiver_layer(r)
            groups.setdefault((k, l), set()).add(s)
        bar = tqdm(total=len(groups), desc="path patching", disable=not progress, leave=False)
        for (k, l), sset in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            snd = [s for s in senders if s in sset]
            S = len(snd)
            d = delta[:, :, [s_idx[s] for s in snd]].permute(2, 0, 1, 3).reshape(S * B, *delta.shape[1:2], -1)
            if k == "logits":
                res = fn(bk.unembed(_gather(final_k.repeat(S, 1, 1) + d, reads)), answers.repeat(S, 1)).float().cpu()
                vals = (res.view(S, B) - corr_pp[None])
                for j, s in enumerate(snd):
                    out[:, e_pos[(s, "logits")]] = vals[j]
                bar.update(1)
                continue
            base = corr_in[f"blocks.{l}.hook_q_input" if k != "mlp" else f"blocks.{l}.hook_mlp_in"]
            if k != "mlp":
                base = base[:, :, 0]  # every head's input is the same residual
            src = base.repeat(S, 1, 1) + d  # [S*B, pos, d_model]
            site = {"q": "q_input", "k": "k_input", "v": "v_input", "mlp": "mlp_in"}[k]

            def metric_rep(logits, _S=S):
                return fn(logits, answers.repeat(_S, 1))
            r = activation_patching(model, None, C.tokens.repeat(S, 1), metric_rep, site=site,
                                    by=("layer",) if k == "mlp" else ("layer", "head"), layers=[l],
                                    read_positions=reads.repeat(S, 1), batch_size=max(batch_size, S * B),
                                    progress=False, source={l: src if k == "mlp" else src[:, :, None]},
                                    per_prompt=True)
            pp = r.per_prompt.reshape(-1, S, B).float()  # [heads or 1, S, B]
            vals = pp - corr_pp[None, None]
            for j, s in enumerate(snd):
                if k == "mlp":
                    if (s, f"MLP{l}") in e_pos:
                        out[:, e_pos[(s, f"MLP{l}")]] = vals[0, j]
                else:
                    for h in range(graph.n_heads):
                        e = (s, f"L{l}H{h}.{k}")
                        if e in e_pos:
                            out[:, e_pos[e]] = vals[h, j]
            bar.update(1)
        bar.close()
    res = EdgeScores(scores=out.mean(0), edges=list(edges), method="path-patch", metric=metric_name,
                     n_layers=graph.n_layers, n_heads=graph.n_heads, per_prompt=out, prompts=_describe(prompts),
                     notes={"seed": seed, "clean_metric": clean_m, "corrupted_metric": float(corr_pp.mean())})
    return res.with_ci(seed=seed) if ci else res


# --------------------------------------------------------------------------- faithfulness
@dataclass
class Faithfulness:
    """Recovered fraction of the clean - corrupted metric gap by the circuit of the top-k edges (everything
    else patched to ``ablation``), as a curve over ``k``, against random circuits of the same size."""

    ks: list[int]
    recovered: torch.Tensor  # [len(ks)]
    random: torch.Tensor  # [len(ks), n_random]
    n_edges: int
    clean_metric: float
    corrupted_metric: float
    ablation: str
    method: str
    notes: dict = field(default_factory=dict)

    def edges_for(self, fraction: float = 0.8) -> int | None:
        """The smallest ``k`` on the curve whose circuit recovers at least ``fraction`` (None if none does)."""
        for k, v in zip(self.ks, self.recovered.tolist()):
            if v >= fraction:
                return k
        return None

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"k": self.ks, "recovered": self.recovered.numpy(),
                             "random_mean": self.random.mean(1).numpy(),
                             "random_q95": self.random.quantile(0.95, dim=1).numpy() if self.random.shape[1] else math.nan})

    def __repr__(self) -> str:
        k80 = self.edges_for(0.8)
        return (f"Faithfulness({self.method}, {self.ablation}-ablated, {self.n_edges} edges; 80% recovered at "
                f"k={k80}; clean {self.clean_metric:.3f}, corrupted {self.corrupted_metric:.3f})")

    def _repr_html_(self) -> str:
        from tvlens.views.page import figure_fragment, result_html

        return result_html(f"<div><b>Faithfulness</b> <code>{html.escape(repr(self))}</code>"
                           + self.to_dataframe().to_html(index=False, float_format=lambda v: f"{v:.3f}") + "</div>",
                           [figure_fragment(self.plot())])

    def plot(self):
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_scatter(x=self.ks, y=self.recovered.tolist(), mode="lines+markers", name=f"top-k ({self.method})")
        if self.random.shape[1]:
            fig.add_scatter(x=self.ks, y=self.random.mean(1).tolist(), mode="lines", name="random circuits (mean)")
            fig.add_scatter(x=self.ks, y=self.random.quantile(0.95, dim=1).tolist(), mode="lines",
                            line=dict(dash="dot"), name="random circuits (95th percentile)")
        fig.add_hline(y=0.8, line=dict(dash="dash", color="grey"))
        fig.update_layout(title=f"Faithfulness: fraction of the clean-corrupted gap recovered ({self.ablation} "
                                f"ablation outside the circuit)", xaxis_title="edges in the circuit (k)",
                          xaxis_type="log", yaxis_title="recovered")
        return fig


@torch.no_grad()
def circuit_metric(model, P, C, fn, keep_masks: torch.Tensor, graph: Graph, ablation: str = "corrupted",
                   batch_size: int = 256) -> torch.Tensor:
    """Per-circuit mean metric ``[G]`` of the clean prompts run with every edge outside each circuit
    (``keep_masks [G, n_edges]``, graph edge order) replaced by its corrupted (or mean clean) sender output."""
    bk = get_backend(model)
    edges = graph.edges
    senders = graph.senders
    recv = _receiver_hooks(graph)
    s_idx = {s: i for i, s in enumerate(senders)}
    r_idx = {r: i for i, (r, *_) in enumerate(recv)}
    G = keep_masks.shape[0]
    # drop[g, r, s] = 1 where the edge s -> r exists and is outside circuit g
    exists = torch.zeros(len(recv), len(senders))
    kept = torch.zeros(G, len(recv), len(senders))
    for e, (s, r) in enumerate(edges):
        exists[r_idx[r], s_idx[s]] = 1
        kept[:, r_idx[r], s_idx[s]] = keep_masks[:, e].float()
    drop = exists[None] - kept
    B = len(P)
    reads = _reads(P)
    out = torch.zeros(G)
    with _EdgeFlags(bk, graph.mlps):
        w_k = _sender_outputs(bk, _writers(bk, C.tokens, graph.mlps), graph)  # [B, pos, S, d]
        if ablation == "mean":
            w_k = _sender_outputs(bk, _writers(bk, P.tokens, graph.mlps), graph).mean(0, keepdim=True).expand_as(w_k)
        per = max(1, batch_size // B)
        W_O = bk.W_O
        for g0 in range(0, G, per):
            g1 = min(G, g0 + per)
            n = g1 - g0
            dev = w_k.device
            dm = drop[g0:g1].to(dev, w_k.dtype)  # [n, R, S]
            repl = w_k.repeat(n, 1, 1, 1)
            live: dict[int, torch.Tensor] = {}  # sender index -> live output [n*B, pos, d]

            def put(idx, act):
                live[idx] = act

            def w_embed(act, hook):
                put(0, act)

            def w_z(l):
                def hook(act, hook):
                    o = torch.einsum("bphd,hdm->bphm", act, W_O[l].to(act.dtype))
                    base = s_idx[f"L{l}H0"]
                    for h in range(graph.n_heads):
                        put(base + h, o[:, :, h])
                return hook

            def w_mlp(l):
                def hook(act, hook):
                    put(s_idx[f"MLP{l}"], act)
                return hook

            def correction(r):
                """sum over dropped senders of (replacement - live) for receiver r: [n*B, pos, d]."""
                idx = [i for i in live if bool(dm[:, r, i].any())]
                if not idx:
                    return None
                d = torch.stack([repl[:, :, i] - live[i] for i in idx], 2)  # [nB, pos, k, d]
                wts = dm[:, r, idx].repeat_interleave(B, 0)  # [nB, k]
                return torch.einsum("bpkd,bk->bpd", d, wts)

            def r_head(l, k):
                def hook(act, hook):
                    act = act.clone()
                    for h in range(graph.n_heads):
                        c = correction(r_idx[f"L{l}H{h}.{k}"])
                        if c is not None:
                            act[:, :, h] = act[:, :, h] + c
                    return act
                return hook

            def r_mlp(l):
                def hook(act, hook):
                    c = correction(r_idx[f"MLP{l}"])
                    return act if c is None else act + c
                return hook

            fwd = [("blocks.0.hook_resid_pre", w_embed)]
            for l in range(graph.n_layers):
                fwd += [(f"blocks.{l}.hook_{k}_input", r_head(l, k)) for k in "qkv"]
                fwd.append((f"blocks.{l}.attn.hook_z", w_z(l)))
                if graph.mlps:
                    fwd += [(f"blocks.{l}.hook_mlp_in", r_mlp(l)), (f"blocks.{l}.hook_mlp_out", w_mlp(l))]
            with bk.hooks(fwd_hooks=fwd):
                resid = bk.final_resid(P.tokens.repeat(n, 1))
            c = correction(r_idx["logits"])
            if c is not None:
                resid = resid + c
            m = fn(bk.unembed(_gather(resid, reads)), P.answers.repeat(n, 1)).float().cpu()
            out[g0:g1] = m.view(n, B).mean(1)
    return out


def faithfulness(model, prompts, scores: EdgeScores, ks=None, corrupted=None, metric=None, n_random: int = 10,
                 ablation: str = "corrupted", by_abs: bool = True, seed: int = 0, batch_size: int = 256) -> Faithfulness:
    """How much of the clean - corrupted metric gap the circuit of the top-``k`` edges of ``scores`` recovers
    (every other edge patched to the corrupted run's sender output, or ``ablation="mean"``: the mean clean
    output), for each ``k`` of ``ks`` (default: 1, 2, 4, ... and all), against ``n_random`` random circuits of
    each size (seeded). ``metric``/``corrupted`` should be those ``scores`` were computed with."""
    graph = graph_of(model)
    edges = graph.edges
    if list(scores.edges) != edges:
        raise ConfigError("scores: these EdgeScores do not cover this model's full edge graph "
                          f"({len(scores.edges)} edges scored, the graph has {len(edges)}): score all edges")
    if ablation not in ("corrupted", "mean"):
        raise ConfigError(f"ablation must be 'corrupted' or 'mean', got {ablation!r}")
    n = len(edges)
    if ks is None:
        ks = sorted({min(n, 2 ** i) for i in range(int(math.log2(n)) + 2)})
    ks = [ks] if isinstance(ks, int) else list(ks)
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n]
    if bad or not ks:
        raise ConfigError(f"ks: circuit sizes must be integers in 0..{n} (the graph has {n} edges), got {bad or ks}")
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
        raise ConfigError(f"n_random must be a non-negative integer, got {n_random!r}")
    bk, P, C, fn, metric_name = _prepare(model, prompts, corrupted, metric, "faithfulness", seed, gradient=False)
    order = scores.order(by_abs)
    masks = []
    for k in ks:
        m = torch.zeros(n, dtype=torch.bool)
        m[order[:k]] = True
        masks.append(m)
    gen = torch.Generator().manual_seed(seed)
    for k in ks:
        for _ in range(n_random):
            m = torch.zeros(n, dtype=torch.bool)
            m[torch.randperm(n, generator=gen)[:k]] = True
            masks.append(m)
    masks.append(torch.ones(n, dtype=torch.bool))  # the full graph: the clean run (a check)
    masks.append(torch.zeros(n, dtype=torch.bool))  # no edge: the corrupted run's outputs everywhere
    vals = circuit_metric(model, P, C, fn, torch.stack(masks), graph, ablation=ablation, batch_size=batch_size)
    with torch.no_grad():
        reads = _reads(P)
        clean_m = float(fn(bk.unembed(_gather(bk.final_resid(P.tokens), reads)), P.answers).float().mean())
        corr_m = float(fn(bk.unembed(_gather(bk.final_resid(C.tokens), reads)), P.answers).float().mean())
    gap = clean_m - corr_m
    if gap == 0 or not math.isfinite(gap):
        raise ConfigError("the clean and corrupted prompts give the same metric, so the recovered fraction is "
                          "undefined; choose corrupted prompts the metric separates")
    rec = (vals - corr_m) / gap
    K = len(ks)
    return Faithfulness(ks=ks, recovered=rec[:K], random=rec[K:K + K * n_random].view(K, n_random), n_edges=n,
                        clean_metric=clean_m, corrupted_metric=corr_m, ablation=ablation, method=scores.method,
                        notes={"full_graph_recovered": float(rec[-2]), "empty_graph_recovered": float(rec[-1]),
                               "seed": seed, "metric": metric_name, "by_abs": by_abs})


__all__ = ["DEFAULT_IG_STEPS", "EdgeScores", "Faithfulness", "Graph", "circuit_metric", "edge_attribution",
           "faithfulness", "graph_of", "node_attribution", "path_patching", "swap_contexts"]
