"""Conditional decoding: patch task vectors into prompts and see whose rule the model follows.

``run_patching(model, prompts, vectors, layers, mode)``: at each prompt's query position and each
requested layer, replace the residual stream with the source task's vector (``"replace"``, Hendel et
al. 2023), add it (``"add"``, Todd et al. 2024), or swap the prompt's own task component for the
source's (``"swap"``: add ``scale * (v_source - v_own)``, the difference of the two task means), run
the rest of the model from that layer, and score the output against every task's rule. Replacing
the whole residual also erases what the model already computed there about the query (on the
shipped ``categories`` model the own-task control falls to 0.56-0.63 after block 0, prompt seeds 0,
777, 2024: ``benchmarks/readme_figures.py``), which ``"swap"`` keeps (1.00, flipping 0.93-0.95).
Patching at layer ``l`` means the residual stream *entering* block ``l``
(``blocks.{l}.hook_resid_pre``, the same as ``blocks.{l-1}.hook_resid_post``; layer 0 = embedding),
matching ``tvlens.extract``'s layer numbering.

The unpatched prefix is computed once per source (the answer tokens that follow the query are the
source task's, so a multi-token answer is scored with teacher forcing against that task's rule:
the same verdict as greedy generation), and the patched runs start at the patched layer
(``start_at_layer``), batched over layers.
"""

from __future__ import annotations

import functools
import html
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from tvlens.accuracy import answer_scores, check_prompts_fit, logits_at_answers, refuse_greedy
from tvlens.backends import get_backend
from tvlens.encoding import TaskVectors, check_layers, check_vectors, resid_hook_name, vector_tasks
from tvlens.errors import ConfigError
from tvlens.positions import answer_token_positions, at_answer_positions, check_at, representation_mask
from tvlens.prompts import PromptSet


@dataclass
class PatchingResult:
    """Per layer, a source-task x target-task grid of how patched prompts behave.

    - ``follows_source[l, a, b]``: fraction of task-b prompts whose output follows task a's rule
      after patching a's vector at layer l (the diagonal is the own-task control);
    - ``follows_own[l, a, b]``: fraction that still follow their own task b's rule;
    - ``delta_logprob_source[l, a, b]``: change of the log-probability of a's answer (token tasks),
      or for regression ``mse[l, a, b]``, the squared error against the prompt's own target;
    - ``baseline_own[b]``: unpatched accuracy (or MSE) of task-b prompts;
    - ``rule_agreement[a, b]``: fraction of task-b prompts on which task a's rule gives the same answer
      as b's own (the floor of ``follows_source`` that needs no patching: e.g. AND and OR agree
      wherever the two bits are equal);
    - ``baseline_source[a, b]``: fraction of task-b prompts whose *unpatched* output already follows
      task a's rule (what a patch must beat to do something; ``best_layer_choice``);
    - ``notes``: e.g. ``absent_targets``, the tasks without prompts (their columns are NaN, not 0).
    """

    layers: list[int]
    source_names: list[str]
    target_names: list[str]
    mode: str
    scale: float
    follows_source: Float[torch.Tensor, "layer source target"]
    follows_own: Float[torch.Tensor, "layer source target"]
    delta_logprob_source: Float[torch.Tensor, "layer source target"]
    baseline_own: Float[torch.Tensor, "target"]
    metric: str = "accuracy"
    shots: int = 0
    rule_agreement: torch.Tensor | None = None
    baseline_source: torch.Tensor | None = None  # [source, target]: unpatched prompts already following a's rule
    read_at: str = "query"  # where the vectors were patched: the query position, or the examples' answers
    notes: dict = field(default_factory=dict)
    # per prompt [layer, source, n] (what the CIs are computed from) and the prompts' tasks [n]
    per_prompt_source: torch.Tensor | None = None  # follows the source's rule (bool); regression: squared error
    per_prompt_own: torch.Tensor | None = None  # still follows its own rule (bool)
    labels: torch.Tensor | None = None
    # bootstrap CIs over prompts, stratified by task (``with_ci``; filled on first use with the defaults)
    flip_rate_ci: torch.Tensor | None = None  # [2, layer]: lo, hi
    control_ci: torch.Tensor | None = None  # [2, layer]
    grid_ci: torch.Tensor | None = None  # [2, layer, source, target] of follows_source (regression: of the MSE)
    ci_info: dict = field(default_factory=dict)

    def with_ci(self, ci: float = 0.95, n_boot: int = 1000, seed: int = 0) -> "PatchingResult":
        """Fill ``flip_rate_ci``, ``control_ci`` and ``grid_ci``: percentile bootstrap over prompts,
        stratified by target task; one resample of the prompts serves every layer, source and cell, so
        a flip rate (a mean of cells) is resampled as a whole (``tvlens.stats``). Returns ``self``."""
        from tvlens import stats

        ci, n_boot, seed = stats.check_ci_args(ci, n_boot, seed)
        if self.per_prompt_source is None or self.labels is None:
            raise ConfigError("this PatchingResult holds no per-prompt outcomes: recompute it with tvlens.run_patching "
                              "to get CIs")
        T = len(self.target_names)
        lab = self.labels.numpy()
        v = self.per_prompt_source.double().numpy()  # [layer, source, n]
        gm = stats.group_means_boot(v, lab, T, stats.bootstrap_counts(v.shape[-1], n_boot, seed, lab))
        self.grid_ci = torch.tensor(np.stack(stats.percentile_ci(gm, ci)), dtype=torch.float32)
        if self.metric != "mse":
            flat = torch.from_numpy(gm).reshape(-1, *gm.shape[2:])  # [boot * layer, source, target]
            fr = self._offdiag(flat).reshape(n_boot, -1).numpy()
            co = self._diag(flat).reshape(n_boot, -1).numpy()
            self.flip_rate_ci = torch.tensor(np.stack(stats.percentile_ci(fr, ci)), dtype=torch.float32)
            self.control_ci = torch.tensor(np.stack(stats.percentile_ci(co, ci)), dtype=torch.float32)
        self.ci_info = {"ci": ci, "n_boot": n_boot, "seed": seed}
        return self

    def _ensure_ci(self) -> None:
        if self.grid_ci is None and self.per_prompt_source is not None and self.labels is not None:
            self.with_ci()

    def _offdiag(self, grid: torch.Tensor, null_free: bool = True) -> torch.Tensor:
        """Mean over source != target pairs (both real, non-null tasks) per layer."""
        vals = []
        for i, a in enumerate(self.source_names):
            for j, b in enumerate(self.target_names):
                if a == b or (null_free and "null" in (a, b)):
                    continue
                vals.append(grid[:, i, j])
        return torch.stack(vals, 1).nanmean(1) if vals else torch.full((grid.shape[0],), float("nan"))

    def _diag(self, grid: torch.Tensor) -> torch.Tensor:
        vals = [grid[:, i, self.target_names.index(a)] for i, a in enumerate(self.source_names)
                if a in self.target_names and a != "null"]
        return torch.stack(vals, 1).nanmean(1) if vals else torch.full((grid.shape[0],), float("nan"))

    @property
    def flip_rate(self) -> Float[torch.Tensor, "layer"]:
        """Per layer: mean fraction of other tasks' prompts that follow the patched source task."""
        return self._offdiag(self.follows_source)

    @property
    def control(self) -> Float[torch.Tensor, "layer"]:
        """Per layer: accuracy of prompts patched with their own task's vector."""
        return self._diag(self.follows_source)

    def best_layer(self, min_control: float = 0.9, min_effect: float = 0.05,
                   max_control_drop: float = 0.1) -> int | None:
        """The layer where patching works best, or None where it does nothing: see ``best_layer_choice``."""
        return self.best_layer_choice(min_control, min_effect, max_control_drop)[0]

    @property
    def unpatched_accuracy(self) -> float:
        """Mean unpatched accuracy of the prompts over real (non-null) tasks: what an own-task control can reach."""
        vals = [float(self.baseline_own[j]) for j, t in enumerate(self.target_names) if t != "null"]
        vals = [v for v in vals if v == v]
        return float(np.mean(vals)) if vals else float("nan")

    def control_threshold(self, min_control: float = 0.9, max_control_drop: float = 0.1) -> float:
        """The own-task control a layer must keep: ``min_control``, or, for prompts the model answers less often
        unpatched, their unpatched accuracy minus ``max_control_drop`` (a control cannot beat the model itself)."""
        unpatched = self.unpatched_accuracy
        return min(min_control, unpatched - max_control_drop) if unpatched == unpatched else min_control

    def best_layer_choice(self, min_control: float = 0.9, min_effect: float = 0.05,
                          max_control_drop: float = 0.1) -> tuple[int | None, str]:
        """``(layer, how it was chosen)``. Only a layer where the intervention does something can be best:
        its flip rate must exceed what the prompts give with no patching by at least ``min_effect``: the
        unpatched rate of following the other task's rule (``baseline_source``), or where that is not
        recorded the flip floor (rule agreement; 0 when unknown). Among those, the highest flip rate of the layers whose
        own-task control holds: at least ``min_control``, or at least the unpatched accuracy minus
        ``max_control_drop`` where the model is below ``min_control`` unpatched (``control_threshold``: a
        small model's own-task control is judged against what it does without the patch). When none holds,
        the highest flip rate (the reason says the control fails). None when no layer's patch flips anything, or for
        regression (no flip rate; read the MSE grid ``delta_logprob_source``)."""
        from tvlens.validate import check_finite_number

        min_control = check_finite_number(min_control, "min_control", "best_layer")
        min_effect = check_finite_number(min_effect, "min_effect", "best_layer")
        max_control_drop = check_finite_number(max_control_drop, "max_control_drop", "best_layer")
        if self.metric != "accuracy":
            return None, "regression result: no flip rate to rank layers by; read the MSE grid (delta_logprob_source)"
        floor = self.flip_floor
        floor = 0.0 if floor != floor else floor
        if self.baseline_source is not None:
            unpatched = float(self._offdiag(self.baseline_source[None])[0])
            floor = max(floor, unpatched) if unpatched == unpatched else floor
        fr, ctl = self.flip_rate, self.control
        effective = (fr - floor) >= min_effect  # NaN compares False
        if not bool(effective.any()):
            best = float(fr.nan_to_num(-1).max()) if len(fr) else float("nan")
            return None, (f"no layer: the patch changes nothing (flip rate at most {best:.3f}, within {min_effect} of "
                          f"the unpatched rate {floor:.3f}, at every layer {self.layers})")
        need = self.control_threshold(min_control, max_control_drop)
        acc = self.unpatched_accuracy
        against = (f">= {need:.3f}: min_control {min_control}" if need >= min_control else
                   f">= {need:.3f}: the unpatched accuracy {acc:.3f} minus {max_control_drop}")
        ok = effective & (ctl >= need - 1e-9)
        pick = ok if bool(ok.any()) else effective
        li = int(torch.where(pick, fr, torch.full_like(fr, -1.0)).argmax())
        why = (f"highest flip rate ({float(fr[li]):.3f}) among layers whose flip rate exceeds the unpatched rate "
               f"(floor) {floor:.3f} by >= {min_effect}")
        if bool(ok.any()):
            why += f" and whose own-task control holds ({float(ctl[li]):.3f} {against})"
        else:
            why += (f"; no such layer keeps the own-task control {against} (here {float(ctl[li]):.3f}, unpatched "
                    f"accuracy {acc:.3f}): the patch also disturbs prompts of the vector's own task")
        return self.layers[li], why

    def grid(self, layer: int, what: str = "follows_source") -> Float[torch.Tensor, "source target"]:
        if layer not in self.layers:
            raise ConfigError(f"grid: layer={layer!r} was not patched; this result holds layers {self.layers}")
        if what not in ("follows_source", "follows_own", "delta_logprob_source", "rule_agreement", "baseline_source"):
            raise ConfigError(f"grid: what={what!r}; use 'follows_source', 'follows_own' or 'delta_logprob_source'")
        g = getattr(self, what)
        return g if g.ndim == 2 else g[self.layers.index(layer)]

    def to_dataframe(self):
        import pandas as pd

        self._ensure_ci()
        what = "follows_source" if self.metric != "mse" else "delta_mse"
        rows = []
        for li, L in enumerate(self.layers):
            for i, a in enumerate(self.source_names):
                for j, b in enumerate(self.target_names):
                    row = {"layer": L, "source": a, "target": b,
                           "follows_source": float(self.follows_source[li, i, j]),
                           "follows_own": float(self.follows_own[li, i, j]),
                           "delta_" + ("logprob_source" if self.metric == "accuracy" else "mse"):
                               float(self.delta_logprob_source[li, i, j])}
                    if self.grid_ci is not None:
                        row[f"{what}_lo"] = float(self.grid_ci[0, li, i, j])
                        row[f"{what}_hi"] = float(self.grid_ci[1, li, i, j])
                    rows.append(row)
        return pd.DataFrame(rows)

    @property
    def flip_floor(self) -> float:
        """Mean off-diagonal rule agreement: the flip rate an intervention gets for free."""
        if self.rule_agreement is None:
            return float("nan")
        return float(self._offdiag(self.rule_agreement[None])[0])

    def layer_profile(self):
        import pandas as pd

        self._ensure_ci()
        df = pd.DataFrame({"layer": self.layers, "flip_rate": self.flip_rate.tolist(),
                           "own_task_control": self.control.tolist(),
                           "flip_floor": [self.flip_floor] * len(self.layers)})
        if self.flip_rate_ci is not None:
            df.insert(2, "flip_rate_lo", self.flip_rate_ci[0].tolist())
            df.insert(3, "flip_rate_hi", self.flip_rate_ci[1].tolist())
            df.insert(5, "control_lo", self.control_ci[0].tolist())
            df.insert(6, "control_hi", self.control_ci[1].tolist())
        return df

    def __repr__(self) -> str:
        b, why = self.best_layer_choice()
        where = "" if self.read_at == "query" else f", at the examples' {self.read_at}"
        self._ensure_ci()

        def ci(x):
            return "" if x is None else f" [{float(x[0, li]):.3f}, {float(x[1, li]):.3f}]"

        head = f"PatchingResult({self.mode}{where}, scale {self.scale}, layers {self.layers}; "
        if b is None:
            return head + f"best layer: none, {why})"
        li = self.layers.index(b)
        return head + (f"best layer {b}: flip rate {float(self.flip_rate[li]):.3f}{ci(self.flip_rate_ci)}, own-task "
                       f"control {float(self.control[li]):.3f}{ci(self.control_ci)}, unpatched accuracy "
                       f"{self.unpatched_accuracy:.3f})")

    def _repr_html_(self) -> str:
        from tvlens.plotting import figure_fragment, patching_grids_figure, result_html

        return result_html(f"<div><b>Task-vector patching</b> ({html.escape(self.mode)}): {html.escape(repr(self))}"
                           + self.layer_profile().to_html(index=False, float_format=lambda v: f"{v:.3f}") + "</div>",
                           [figure_fragment(self.plot()), figure_fragment(patching_grids_figure(self))])

    def plot(self, layer: int | None = None):
        """The source x target grid at ``layer`` (default: the best) and the per-layer profile:
        ``tvlens.views.patching_figure``; ``tvlens.views.patching_grids_figure`` draws every layer."""
        from tvlens.plotting import patching_figure

        return patching_figure(self, layer)


def _answers_for(prompts: PromptSet, source: int) -> torch.Tensor:
    """Tokens with the query's answer slots holding ``source``'s answer (teacher forcing)."""
    toks = prompts.tokens.clone()  # type: ignore[union-attr]
    pos = answer_token_positions(prompts).to(toks.device)
    toks.scatter_(1, pos, prompts.task_answers[:, source])  # type: ignore[index]
    return toks


@torch.no_grad()
def run_patching(
    model,
    prompts: PromptSet,
    vectors: TaskVectors,
    layers: Sequence[int] | int | None = None,
    mode: str = "replace",
    scale: float = 1.0,
    sources: Sequence[str] | None = None,
    batch_size: int | None = 512,
    progress: bool = True,
) -> PatchingResult:
    """Patch each source task's vector into every prompt at its query position; score every rule.

    Vectors extracted with ``extract(..., at="answers")`` are patched where they were read: at every
    in-context example's answer token (``representation_mask``), and the query's answer is scored as
    usual. That is where the shipped default model keeps its task (its query position decodes the
    task, TD ~1, but patching it there changes nothing; see the README's patching section).
    """
    vectors, scale, batch_size, read_at, layers, have, src_names = _check_patching_args(
        model, prompts, vectors, layers, mode, scale, sources, batch_size)
    if prompts.is_continuous:
        return _run_patching_regression(model, prompts, vectors, layers, mode, scale, src_names, batch_size)
    if prompts.task_answers is None:
        raise ConfigError("these prompts record no per-task answers; sample them from a tvlens task family")
    _refuse_nothing_to_flip(prompts)
    for s in src_names:
        if s not in prompts.task_names:
            raise ConfigError(f"source task {s!r} has no rule in these prompts' family ({prompts.task_names})")

    device = get_backend(model).input_device
    T = prompts.n_tasks
    L, S = len(layers), len(src_names)
    labels = prompts.labels.cpu()
    counts = _counts(labels, T)  # NaN for tasks without prompts: their rates are NaN, never 0
    acc = {"follows_src": torch.zeros(L, S, T), "follows_own": torch.zeros(L, S, T), "dlp": torch.zeros(L, S, T),
           "base_own": torch.zeros(T), "base_src": torch.zeros(S, T),
           "pp_src": torch.zeros(L, S, len(prompts), dtype=torch.bool),
           "pp_own": torch.zeros(L, S, len(prompts), dtype=torch.bool)}
    patcher = _Patcher(model, prompts, vectors, layers, mode, scale, src_names, have, read_at, device)
    bs = batch_size or len(prompts)
    it = tqdm(total=(len(prompts) + bs - 1) // bs, desc="run_patching", disable=not progress, leave=False)
    for b0 in range(0, len(prompts), bs):
        patcher.add_batch(prompts.subset(slice(b0, b0 + bs)).to(device), labels[b0 : b0 + bs], b0, acc)
        it.update(1)
    it.close()
    return _with_choice(PatchingResult(
        layers=layers, source_names=src_names, target_names=list(prompts.task_names), mode=mode, read_at=read_at,
        scale=float(scale), follows_source=acc["follows_src"] / counts, follows_own=acc["follows_own"] / counts,
        delta_logprob_source=acc["dlp"] / counts, baseline_own=acc["base_own"] / counts, metric="accuracy",
        shots=prompts.shots, rule_agreement=_rule_agreement(prompts, src_names, labels) / counts,
        per_prompt_source=acc["pp_src"], per_prompt_own=acc["pp_own"], labels=labels.clone(),
        baseline_source=acc["base_src"] / counts, notes=_notes(prompts, src_names),
    ))


def _check_patching_args(model, prompts, vectors, layers, mode, scale, sources, batch_size):
    """Refuse what ``run_patching`` cannot run, before any work; the checked vectors, scale, batch size, where
    the vectors were read, the layers, the tasks with a vector, and the source tasks."""
    from tvlens.validate import check_batch_size, check_finite_number, name_list

    check_prompts_fit(model, prompts, "run_patching")
    refuse_greedy(prompts, "run_patching")
    vectors = check_vectors(vectors, model, prompts, "run_patching")
    scale = check_finite_number(scale, "scale", "run_patching")
    batch_size = check_batch_size(batch_size, where="run_patching")
    sources = name_list(sources, "sources", None, "run_patching")
    read_at = check_at(getattr(vectors, "read_at", "query"))
    if read_at != "query":
        representation_mask(prompts, read_at)  # refuse prompts without examples before any work
    if mode not in ("replace", "add", "swap"):
        raise ConfigError(f"mode must be 'replace', 'add' or 'swap', got {mode!r}")
    layers = _patch_layers(model, vectors, layers)
    have = vector_tasks(vectors)  # tasks whose vector was averaged over at least one prompt
    src_names = [vectors.task_names[t] if not isinstance(t, str) and 0 <= t < len(vectors.task_names) else t
                 for t in (have if sources is None else sources)]
    for s in src_names:
        if s not in vectors.task_names:
            raise ConfigError(f"unknown source task {s!r}; the vectors hold {vectors.task_names}")
        if s not in have:
            raise ConfigError(f"source task {s!r} has no vector: no prompt of it was extracted (counts 0); "
                              f"the vectors hold tasks {have}")
    if mode == "swap":
        present = [t for i, t in enumerate(prompts.task_names) if bool((prompts.labels == i).any())]
        missing_own = [t for t in present if t not in have]
        if missing_own:
            raise ConfigError(f"mode='swap' needs a vector of every task the prompts hold; missing {missing_own} "
                              f"(the vectors hold {have})")
    return vectors, scale, batch_size, read_at, layers, have, src_names


def _patch_layers(model, vectors: TaskVectors, layers, where: str = "") -> list[int]:
    """The layers to patch: those asked for (default: every layer of the vectors a block runs after)."""
    pre = f"{where}: " if where else ""
    n_blocks = get_backend(model).n_layers
    if layers is None:
        layers = [layer for layer in vectors.layers if layer < n_blocks]
    layers = check_layers(model, layers)
    missing = [L for L in layers if L not in vectors.layers]
    if missing:
        raise ConfigError(f"{pre}no task vectors at layers {missing}; the vectors hold layers {vectors.layers}")
    if max(layers) >= n_blocks:
        raise ConfigError(
            f"{pre}layer {max(layers)} is the final residual stream: nothing runs after it to patch; use layers "
            f"0..{n_blocks - 1}"
        )
    return layers


class _Patcher:
    """One batch of ``run_patching``: the unpatched runs (own answer, and each source's answer teacher-forced),
    then every source vector patched at every layer; counts added to ``acc`` per target task."""

    def __init__(self, model, prompts, vectors, layers, mode, scale, src_names, have, read_at, device):
        self.model, self.prompts, self.layers, self.mode, self.scale = model, prompts, layers, mode, scale
        self.src_names, self.read_at, self.n_ans = src_names, read_at, prompts.n_answer
        self.vecs = {s: torch.stack([vectors.get(s, layer) for layer in layers]).to(device) for s in src_names}
        self.own_vecs = None
        if mode == "swap":
            # [L, n_tasks_of_prompts, d]: the vector of each prompt's own task, by label
            self.own_vecs = torch.stack([torch.stack([_own(vectors, t, layer, have) for t in prompts.task_names])
                                         for layer in layers]).to(device)
        self.names = sorted({resid_hook_name(layer) for layer in layers})

    def run_patched(self, store, layer, q, vec, li, labels_dev, where):
        resid = _patch(store[resid_hook_name(layer)], where, vec, self.mode, self.scale,
                       self.own_vecs[li, labels_dev] if self.mode == "swap" else None)
        return logits_at_answers(self.model, resid, q, self.n_ans, start_at_layer=layer)

    def add_batch(self, sub, lab, b0: int, acc: dict) -> None:
        model, n_ans = self.model, self.n_ans
        q = sub.query_pos
        where = q if self.read_at == "query" else representation_mask(sub, self.read_at)
        last = int(q.max()) + n_ans
        own_sel, own_store = _prefix_at_answers(model, sub.tokens[:, :last], self.names, q, n_ans)
        ok, _ = answer_scores(own_sel, sub.answers)
        acc["base_own"].index_add_(0, lab, ok.float().cpu())
        for si, sname in enumerate(self.src_names):
            s = self.prompts.task_names.index(sname)
            ans_src = sub.task_answers[:, s]
            # the source's answer follows the query (teacher forcing); a single-token answer needs no rerun
            if n_ans == 1:
                src_sel, src_store = own_sel, own_store
            else:
                src_sel, src_store = _prefix_at_answers(model, _answers_for(sub, s)[:, :last], self.names, q, n_ans)
            ok_clean, lp_clean = answer_scores(src_sel, ans_src)
            acc["base_src"][si].index_add_(0, lab, ok_clean.float().cpu())
            for li, layer in enumerate(self.layers):
                vec = self.vecs[sname][li]
                out_src = self.run_patched(src_store, layer, q, vec, li, sub.labels, where)
                ok_src, lp_src = answer_scores(out_src, ans_src)
                out_own = out_src if n_ans == 1 else self.run_patched(own_store, layer, q, vec, li, sub.labels, where)
                ok_own, _ = answer_scores(out_own, sub.answers)
                acc["follows_src"][li, si].index_add_(0, lab, ok_src.float().cpu())
                acc["pp_src"][li, si, b0 : b0 + len(lab)], acc["pp_own"][li, si, b0 : b0 + len(lab)] = ok_src.cpu(), ok_own.cpu()
                acc["follows_own"][li, si].index_add_(0, lab, ok_own.float().cpu())
                acc["dlp"][li, si].index_add_(0, lab, (lp_src - lp_clean).float().cpu())


def _rule_agreement(prompts: PromptSet, src_names: list[str], labels: torch.Tensor) -> torch.Tensor:
    """``[source, target]``: how many prompts of each target task the source's rule answers as their own."""
    ta = prompts.task_answers.cpu()  # type: ignore[union-attr]
    agree = torch.zeros(len(src_names), prompts.n_tasks)
    for si, sname in enumerate(src_names):
        same = (ta[:, prompts.task_names.index(sname)] == prompts.answers.cpu()).all(-1).float()
        agree[si].index_add_(0, labels, same)
    return agree


def nothing_to_flip(prompts: PromptSet) -> str | None:
    """Why no task-vector patch can change what is scored on ``prompts`` (every task gives every prompt the
    same scored answer), or None. ``run_patching`` refuses such prompts with this reason; a caller that
    runs several analyses (the report) can note it and go on."""
    ta = prompts.task_answers
    if ta is None or ta.shape[1] < 2 or not bool((ta == ta[:, :1]).all()):
        return None
    tok = prompts.answers.reshape(-1)[0].item()
    return (
        f"for every prompt, every task of family {prompts.family!r} has the same scored token "
        f"(id {tok}; scoring={prompts.params.get('scoring', 'first_token')!r}): there is nothing to flip, so "
        "no patch could change which task the model follows. With a text family this happens when every answer "
        "begins with the same token (e.g. ' ' before bitwise_text's digits on SmolLM2's and Gemma-3's "
        "tokenizers): use a tokenizer or template whose answers' first tokens differ across tasks"
    )


def _refuse_nothing_to_flip(prompts: PromptSet) -> None:
    """Say so before any work (it would report "the patch changes nothing" with no reason)."""
    why = nothing_to_flip(prompts)
    if why is not None:
        raise ConfigError(f"run_patching: {why}")


def _with_choice(res: PatchingResult) -> PatchingResult:
    """Record in the result how its best layer is chosen (``best_layer_choice`` with the defaults)."""
    layer, rule = res.best_layer_choice()
    res.notes["best_layer"] = {"layer": layer, "rule": rule}
    return res


def _own(vectors: TaskVectors, task: str, layer: int, have: list[str]) -> torch.Tensor:
    """Task ``task``'s vector, or NaN for a task without one (only ever read for prompts of that task,
    which ``run_patching`` has checked are absent)."""
    if task in have:
        return vectors.get(task, layer)
    return torch.full(vectors.vectors.shape[-1:], float("nan"), dtype=vectors.vectors.dtype)


def _counts(labels: torch.Tensor, n_tasks: int) -> torch.Tensor:
    """Prompts per task, NaN where a task has none (dividing by it gives NaN, never a silent 0)."""
    c = torch.bincount(labels, minlength=n_tasks).float()
    return torch.where(c > 0, c, torch.full_like(c, float("nan")))


def _notes(prompts: PromptSet, src_names: list[str]) -> dict:
    absent = [t for i, t in enumerate(prompts.task_names) if not bool((prompts.labels == i).any())]
    if not absent:
        return {}
    return {"absent_targets": absent,
            "absent_note": f"no prompts of task(s) {absent}: their columns (and means over them) are NaN, not 0"}


def _prefix_at_answers(model, x, names, q, n_ans):
    """Logits at the answer positions ``[b, n_ans, d_vocab]`` and the residual stream entering every
    patched layer, from one forward pass that stops after the blocks: never ``[b, seq, d_vocab]``."""
    store: dict[str, torch.Tensor] = {}

    def save(act, hook, _name):
        store[_name] = act

    bk = get_backend(model)
    resid = bk.run_with_hooks(x, fwd_hooks=[(n, functools.partial(save, _name=n)) for n in names],
                              stop_at_layer=bk.n_layers)
    return bk.unembed(at_answer_positions(resid, q.to(resid.device), n_ans)), store


def _prefix(model, x, names):
    """Logits and the residual stream entering every patched layer, from one forward pass."""
    store: dict[str, torch.Tensor] = {}

    def save(act, hook, _name):
        store[_name] = act

    logits = get_backend(model).run_with_hooks(x, fwd_hooks=[(n, functools.partial(save, _name=n)) for n in names])
    return logits, store


def _patch(resid, q, vec, mode, scale, own=None):
    """A copy of ``resid`` with the query position replaced by ``vec``, ``vec`` added, or the own
    task's vector swapped for ``vec``. ``q``: the query positions ``[batch]``, or a ``[batch, width]``
    mask of the positions to patch."""
    resid = resid.clone()
    if q.dtype == torch.bool:
        m = q[..., None]
        w = q.shape[1]
        v = vec.expand(resid.shape[0], -1)[:, None]
        if mode == "replace":
            resid[:, :w] = torch.where(m, v, resid[:, :w])
        elif mode == "add":
            resid[:, :w] = resid[:, :w] + m * (scale * v)
        else:
            resid[:, :w] = resid[:, :w] + m * (scale * (v - own[:, None]))
        return resid
    rows = torch.arange(resid.shape[0], device=resid.device)
    if mode == "replace":
        resid[rows, q] = vec
    elif mode == "add":
        resid[rows, q] = resid[rows, q] + scale * vec
    else:
        resid[rows, q] = resid[rows, q] + scale * (vec - own)
    return resid


def _run_patching_regression(model, prompts, vectors, layers, mode, scale, src_names, batch_size):
    have = vector_tasks(vectors)
    device = get_backend(model).input_device
    T = prompts.n_tasks
    L, S = len(layers), len(src_names)
    mse = torch.zeros(L, S, T)
    labels = prompts.labels.cpu()
    counts = _counts(labels, T)
    base = torch.zeros(T)
    pp_mse = torch.zeros(L, S, len(prompts))
    bs = batch_size or len(prompts)
    names = sorted({resid_hook_name(layer) for layer in layers})
    for b0 in range(0, len(prompts), bs):
        sub = prompts.subset(slice(b0, b0 + bs)).to(device)
        lab = labels[b0 : b0 + bs]
        q = sub.query_pos
        out, store = _prefix(model, sub.inputs[:, : int(q.max()) + 1], names)
        rows = torch.arange(len(sub), device=device)
        base.index_add_(0, lab, ((out[rows, q, 0] - sub.answers[:, 0]) ** 2).cpu())
        for li, layer in enumerate(layers):
            own = torch.stack([_own(vectors, t, layer, have) for t in prompts.task_names]).to(device)[sub.labels] \
                if mode == "swap" else None
            for si, sname in enumerate(src_names):
                resid = _patch(store[resid_hook_name(layer)], q, vectors.get(sname, layer).to(device), mode, scale, own)
                pred = logits_at_answers(model, resid, q, 1, start_at_layer=layer)[:, 0, 0]
                mse[li, si].index_add_(0, lab, ((pred - sub.answers[:, 0]) ** 2).cpu())
                pp_mse[li, si, b0 : b0 + len(lab)] = ((pred - sub.answers[:, 0]) ** 2).cpu()
    grid = mse / counts
    nanv = torch.full_like(grid, float("nan"))
    return _with_choice(PatchingResult(
        layers=layers, source_names=src_names, target_names=list(prompts.task_names), mode=mode, scale=float(scale),
        follows_source=nanv, follows_own=nanv, delta_logprob_source=grid, baseline_own=base / counts, metric="mse",
        shots=prompts.shots, per_prompt_source=pp_mse, labels=labels.clone(), notes=_notes(prompts, src_names)))


__all__ = ["PatchingResult", "run_patching"]
