"""The offline HTML report: every view of one model on one task family, in one self-contained file.

``build_report(model, family)`` runs the analyses (accuracy, extraction, TD, task-vector patching,
head attribution, a position sweep, emergence across the model's checkpoints when it has them) and
assembles a :class:`~tvlens.views.page.Page`; ``write_report(out_dir, model, family)`` writes it
atomically. ``tvlens report`` and ``tvlens demo`` call these.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tvlens.errors import ConfigError
from tvlens.views import circuits, plots
from tvlens.views.page import Page, check_writable_dir, esc


@dataclass
class Report:
    """The assembled page, its text summary, the results it shows and how long each step took."""

    page: Page
    summary: str
    summary_rows: list[tuple[str, str]] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """The self-contained HTML page; an existing file is refused unless ``overwrite=True``."""
        return self.page.save(path, overwrite=overwrite)

    def to_html(self) -> str:
        return self.page.to_html()

    def _repr_html_(self) -> str:
        return self.page._repr_html_()

    def __repr__(self) -> str:
        return f"Report({len(self.page.sections)} views)\n{self.summary}"


def _resolve(model: Any, family: Any):
    from tvlens import tasks
    from tvlens.models import load_model, model_info

    name = model if isinstance(model, (str, Path)) else None
    m = load_model(model) if name is not None else model
    if family is None:
        fam = model_info(m).task_family()
        if fam is None:
            raise ConfigError(f"family: model {name or type(m).__name__!r} records no task family; pass family=NAME")
    elif isinstance(family, str):
        fam = tasks.get(family)
    else:
        fam = family
    return m, fam, (str(name) if name is not None else "model")


def _report_prompts(m, fam, n_per_task: int, shots: int, seed: int):
    """``(prompts, first_token)``: the family's prompts for ``m``. A text family on a model with its own
    tokenizer (a pretrained language model) is tokenized with it; where an answer spans several tokens the
    accuracy scores the whole answer (``scoring="greedy"``) and ``first_token`` is True: patching and head
    attribution, which score an answer by its first token, get ``first_token_view(prompts)``."""
    from tvlens.llm import text_tokenizer
    from tvlens.tasks.text import TextTaskFamily

    if not isinstance(fam, TextTaskFamily) or text_tokenizer(m) is None:
        return fam.sample(n_per_task, shots=shots, seed=seed), False
    prompts = fam.sample(n_per_task, shots=shots, seed=seed, tokenizer=text_tokenizer(m), scoring="greedy")
    return prompts, bool((prompts.extra["answer_len"] > 1).any())


def first_token_view(prompts):
    """The same text prompts, scored by their answer's first token."""
    return replace(prompts, params={**prompts.params, "scoring": "first_token"})


def _checkpoint_source(name: str | None) -> str | None:
    """A shipped model name or a run folder with several checkpoints, for the emergence views."""
    if name is None:
        return None
    from tvlens.models import checkpoint_steps

    try:
        steps = checkpoint_steps(name)
    except Exception:  # a single checkpoint file, a pretrained name: no training history
        return None
    return name if len(steps) >= 2 else None


def contrast_pairs(prompts, max_pairs: int = 8, seed: int = 0):
    """Clean/corrupted token pairs for a position sweep: a task-A prompt, and the same query after
    the context (examples) of a task-B prompt. Returns (clean, corrupted, read_positions, answer_A,
    answer_B, pair indices) or None when the prompts' layout does not allow it."""
    if prompts.is_continuous or prompts.tokens is None or prompts.vocab is None or ";" not in prompts.vocab:
        return None
    end = prompts.vocab.index(";")
    toks, q = prompts.tokens, prompts.query_pos
    starts = []
    for i in range(len(prompts)):
        ends = (toks[i, : int(q[i])] == end).nonzero().flatten()
        starts.append(int(ends[-1]) + 1 if len(ends) else 0)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(prompts), generator=g).tolist()
    pairs = []
    for i in order:
        a = int(prompts.labels[i])
        for j in order:
            b = int(prompts.labels[j])
            if b == a or starts[j] != starts[i] or int(q[j]) != int(q[i]) or starts[i] == 0:
                continue
            if prompts.task_answers is None:
                return None
            ans_a, ans_b = int(prompts.task_answers[i, a, 0]), int(prompts.task_answers[i, b, 0])
            if ans_a == ans_b:
                continue
            pairs.append((i, j, ans_a, ans_b))
            break
        if len(pairs) >= max_pairs:
            break
    if not pairs:
        return None
    clean = torch.stack([toks[i] for i, *_ in pairs])
    corrupted = clean.clone()
    for r, (i, j, _, _) in enumerate(pairs):
        corrupted[r, : starts[i]] = toks[j, : starts[i]]
    read = torch.tensor([int(q[i]) for i, *_ in pairs])
    ans_a = torch.tensor([p[2] for p in pairs])
    ans_b = torch.tensor([p[3] for p in pairs])
    return clean, corrupted, read, ans_a, ans_b, pairs


def _table(rows: list[dict], floatfmt: str = "{:.3f}") -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(
        f"<td>{esc(floatfmt.format(r[c]) if isinstance(r[c], float) else r[c])}</td>" for c in cols) + "</tr>" for r in rows)
    return f'<table class="tvlens-table"><tr>{head}</tr>{body}</table>'


def _build_report(
    model: Any = "default",
    family: Any = None,
    *,
    n_per_task: int = 30,
    shots: int = 4,
    seed: int = 12345,
    patching_mode: str = "swap",
    patching_per_task: int | None = None,
    head_method: str = "dla",
    head_scores: Any = None,
    emergence: Any = True,
    emergence_per_task: int = 20,
    emergence_steps: int | None = 10,
    prompt: int = 0,
    top_k: int = 6,
    tsne: bool = True,
    tsne_max_points: int = 240,
    progress: bool = False,
    title: str | None = None,
    precomputed: dict[str, Any] | None = None,
) -> Report:
    """Run every analysis on ``model`` (a name, a path or a loaded model) and ``family`` and assemble the report.

    ``head_scores``: precomputed scores (e.g. from another method); by default
    ``tvlens.head_attribution(model, prompts, method=head_method)``. ``emergence``: True (up to
    ``emergence_steps`` of the model's checkpoints, evenly spread over the list, when it has several),
    False, or a precomputed ``EmergenceResult``. Patching runs on the first ``patching_per_task``
    prompts of each task (all when None); t-SNE on at most ``tsne_max_points`` prompts.
    ``precomputed``: results already computed on the same prompts (``family.sample(n_per_task,
    shots, seed)``), by name: ``accuracy``, ``encodings``, ``decodability`` (``tvlens demo`` passes them).
    """
    if isinstance(n_per_task, bool) or not isinstance(n_per_task, int) or n_per_task < 3:
        raise ConfigError(f"n_per_task must be an integer >= 3 (TD needs neighbours), got {n_per_task!r}")
    clock = _Clock()
    notes: list[str] = []
    with clock.step("load"):
        m, fam, name, prompts, first_token = _load(model, family, n_per_task, shots, seed, notes)
        prompt = circuits.check_prompt_index(prompts, prompt)
    results: dict[str, Any] = {"prompts": prompts}
    k = min(10, n_per_task - 1)
    with clock.step("accuracy+extract+TD"):
        acc, enc, dec = _measure(m, prompts, precomputed, k, n_per_task, seed, progress)
        results.update(accuracy=acc, encodings=enc, decodability=dec)
    with clock.step("run_patching"):
        psub, patch, patch_ans = _patching(m, fam, prompts, enc, patching_mode, patching_per_task, n_per_task,
                                           first_token, progress, notes)
        if patch is not None:
            results["patching"] = patch
        if patch_ans is not None:
            results["patching_answers"] = patch_ans
    with clock.step("head_attribution"):
        scores = _head_scores(m, prompts, head_scores, head_method, first_token, progress, notes)
        if scores is not None:
            results["head_scores"] = scores
    with clock.step("position_sweep"):
        sweep = _position_sweep(m, prompts, seed, progress, results, notes)
    with clock.step("emergence"):
        src = _checkpoint_source(name if isinstance(model, (str, Path)) else None) if emergence is True else None
        em = _emergence(src, emergence, fam, emergence_steps, emergence_per_task, k, shots, seed, progress, notes)
        if em is not None:
            results["emergence"] = em
    with clock.step("views"):
        page = Page(title or f"tvlens report: {name} on {fam.name}")
        _add_measure_views(page, prompts, acc, enc, dec, em, shots, seed, tsne, tsne_max_points)
        _add_patching_views(page, patch, patch_ans, patching_mode, len(psub))
        _add_head_views(page, results, m, prompts, scores, prompt, top_k, notes)
        if sweep is not None:
            _add_sweep_view(page, prompts, sweep, results["position_sweep_pairs"])
        if em is not None:
            page.add(plots.emergence_figure(em), "Emergence over training")
    rows = summarize(name, fam, acc, dec, patch, scores, em, sweep, top_k=min(top_k, 5), patch_answers=patch_ans)
    summary = "\n".join(f"{k}: {v}" for k, v in rows)
    timings = clock.done()
    note_html = "".join(f'<p class="tvlens-note">{esc(n)}</p>' for n in notes)
    summary_table = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    page.intro_html = (f'<table class="tvlens-table tvlens-summary-table" id="tvlens-summary">{summary_table}</table>'
                       f"{note_html}<details><summary>seconds per step</summary>"
                       + _table([{"step": k_, "seconds": v} for k_, v in timings.items()], "{:.2f}") + "</details>")
    return Report(page=page, summary=summary, summary_rows=rows, results=results, timings=timings, notes=notes)


class _Clock:
    """Seconds per report step (``with clock.step(name):``), and the total."""

    def __init__(self) -> None:
        self.t_all = time.perf_counter()
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str):
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t0, 2)

    def done(self) -> dict[str, float]:
        self.timings["total"] = round(time.perf_counter() - self.t_all, 2)
        return self.timings


def _load(model, family, n_per_task: int, shots: int, seed: int, notes: list[str]):
    """The model, its family (noting a family it was not trained on), its name, fresh prompts, and whether
    patching and head attribution score them by their answer's first token (``_report_prompts``)."""
    from tvlens.models import model_info

    m, fam, name = _resolve(model, family)
    recorded = model_info(m).task_family()
    if recorded is not None and recorded.name != fam.name:
        notes.append(f"the model was trained on {recorded!r}, this report samples {fam!r}: its numbers describe a "
                     "family the model never saw")
    prompts, first_token = _report_prompts(m, fam, n_per_task, shots, seed)
    if n_per_task < 100:
        notes.append(f"TD here is leave-one-out k-NN over {n_per_task} prompts per task; it rises with prompts per "
                     "task (more same-task neighbours nearby), so compare it only at the same number (the demo and "
                     "README use 100 per task)")
    if recorded is None or recorded.name == fam.name:  # another family is noted above; the same one must agree
        from tvlens.validate import check_family

        check_family(m, prompts, "build_report", force=True)
    return m, fam, name, prompts, first_token


def _measure(m, prompts, precomputed, k: int, n_per_task: int, seed: int, progress: bool):
    """Accuracy, encodings and TD (with its CI and null), computed or taken from ``precomputed``."""
    from tvlens.accuracy import icl_accuracy
    from tvlens.encoding import extract, task_decodability

    pre = dict(precomputed or {})
    unknown = set(pre) - {"accuracy", "encodings", "decodability"}
    if unknown:
        raise ConfigError(f"precomputed: unknown keys {sorted(unknown)}; give accuracy, encodings or decodability")
    acc = pre["accuracy"] if "accuracy" in pre else icl_accuracy(m, prompts)
    enc = pre["encodings"] if "encodings" in pre else extract(m, prompts, progress=progress)
    dec = pre["decodability"] if "decodability" in pre else task_decodability(enc, k=k)
    if len(enc) != len(prompts) or len(acc.per_prompt) != len(prompts):
        raise ConfigError(f"precomputed results hold {len(enc)} / {len(acc.per_prompt)} prompts but the report samples "
                          f"{len(prompts)} (n_per_task={n_per_task}, seed={seed}): compute them on the same prompts")
    if getattr(dec, "neighbors", None) is not None:  # uncertainty of every figure (seeded; tvlens.stats)
        if dec.td_ci is None:
            dec.with_ci()
        if dec.null_mean is None:
            dec.with_null()
    return acc, enc, dec


def _patching(m, fam, prompts, enc, patching_mode: str, patching_per_task, n_per_task: int, first_token: bool,
              progress: bool, notes: list[str]):
    """Task-vector patching at the query (on the first ``patching_per_task`` prompts of each task), and, for
    token prompts with examples, at the examples' answers: the prompts patched and both results."""
    from tvlens.encoding import extract
    from tvlens.patching import nothing_to_flip, run_patching

    psub = prompts
    if patching_per_task is not None and patching_per_task < n_per_task:
        keep = torch.cat([(prompts.labels == t).nonzero().flatten()[:patching_per_task] for t in range(prompts.n_tasks)])
        psub = prompts.subset(keep)
    patch = patch_ans = None
    if prompts.task_answers is None and not prompts.is_continuous:
        notes.append(f"no task-vector patching: the {fam.name!r} tasks each read their own kind of input, so no "
                     "other task's rule applies to a query and a flip cannot be scored (patch a family such as "
                     "'pos' or 'bitwise_text')")
    elif nothing_to_flip(first_token_view(psub) if first_token else psub) is not None:
        notes.append("no task-vector patching: " + nothing_to_flip(first_token_view(psub) if first_token else psub))
    else:
        psub = first_token_view(psub) if first_token else psub
        patch = run_patching(m, psub, enc.task_vectors(), mode=patching_mode, progress=progress)
    if patch is not None and patch.metric != "mse" and prompts.shots >= 1 and prompts.train_mask is not None:
        # the same test where a model may keep its task instead: the examples' answer tokens (replace)
        vec_ans = extract(m, psub, progress=progress, at="answers").task_vectors()
        patch_ans = run_patching(m, psub, vec_ans, mode="replace", progress=progress)
    return psub, patch, patch_ans


def _head_scores(m, prompts, head_scores, head_method: str, first_token: bool, progress: bool, notes: list[str]):
    if head_scores is not None:
        return head_scores
    from tvlens.attribution import head_attribution

    if prompts.is_continuous:
        notes.append("head attribution scores answer tokens and these prompts are continuous: head views left out")
        return None
    return head_attribution(m, first_token_view(prompts) if first_token else prompts, method=head_method,
                            progress=progress)


def _position_sweep(m, prompts, seed: int, progress: bool, results: dict, notes: list[str]):
    """Residual patching by position on clean/corrupted pairs of equal layout (None when there are none)."""
    from tvlens.sweeps import activation_patching

    cp = contrast_pairs(prompts, seed=seed)
    if cp is None:
        notes.append("no clean/corrupted prompt pairs of equal layout: the position sweep is left out")
        return None
    clean, corrupted, read, ans_a, ans_b, pairs = cp
    rows = torch.arange(len(read))

    def logit_diff(logits):
        return logits[rows, 0, ans_a] - logits[rows, 0, ans_b]

    sweep = activation_patching(m, clean, corrupted, logit_diff, site="resid_pre", by=("layer", "pos"),
                                read_positions=read, progress=progress, ci=0.95)
    results["position_sweep"] = sweep
    results["position_sweep_pairs"] = pairs
    return sweep


def _emergence(src, emergence, fam, emergence_steps, emergence_per_task: int, k: int, shots: int, seed: int,
               progress: bool, notes: list[str]):
    """TD and accuracy over (up to ``emergence_steps`` of) the checkpoints in ``src``, or the given result."""
    if emergence is not True:
        return emergence if emergence not in (False, None) else None
    if src is None:
        notes.append("the model has no training checkpoints here: the emergence views are left out")
        return None
    from tvlens.encoding import emergence as run_emergence
    from tvlens.models import checkpoint_steps

    steps = checkpoint_steps(src)
    if emergence_steps is not None and len(steps) > emergence_steps:
        idx = sorted({round(i * (len(steps) - 1) / (emergence_steps - 1)) for i in range(emergence_steps)})
        steps = [steps[i] for i in idx]
    return run_emergence(src, fam, n_per_task=max(emergence_per_task, k + 1), shots=shots, seed=seed + 1, k=k,
                         steps=steps, progress=progress)


def _add_measure_views(page, prompts, acc, enc, dec, em, shots: int, seed: int, tsne: bool, tsne_max_points: int):
    page.add(plots.accuracy_figure(acc), "In-context accuracy",
             f"{len(prompts)} fresh prompts ({shots}-shot, seed {seed}); exact match of the whole answer.")
    if em is not None:
        page.add(plots.td_by_layer_figure(em), "Task decodability by layer, per checkpoint",
                 f"Leave-one-out {em.k}-NN accuracy of the latent task from the query representation, at every "
                 f"checkpoint ({em.n_per_task} prompts per task).")
    page.add(plots.td_by_layer_figure(dec), "Task decodability by layer",
             f"Final model, {len(prompts)} prompts, k={dec.k}; thin lines: each task. Bands: 95% bootstrap CI over "
             "prompts (stratified by task, seed 0) and the shuffled-label null (TD with the task labels permuted, "
             "1000 permutations: its mean to its 95th percentile).")
    page.add(plots.td_heatmap_figure(dec), "Task decodability per task")
    page.add(plots.encodings_scatter_figure(enc, dec.best_layer, "pca", seed), "Encodings (PCA)",
             f"Query representations at the best TD layer ({dec.best_layer}), coloured by their latent task.")
    if tsne:
        sub = enc
        if len(enc) > tsne_max_points:  # t-SNE's cost grows fast with points: an even subsample per task
            per = max(2, tsne_max_points // len(enc.task_names))
            keep = torch.cat([(enc.labels == t).nonzero().flatten()[:per] for t in range(len(enc.task_names))])
            sub = replace(enc, acts=enc.acts[keep], labels=enc.labels[keep])
        page.add(plots.encodings_scatter_figure(sub, dec.best_layer, "tsne", seed), "Encodings (t-SNE)",
                 f"{len(sub)} prompts at layer {dec.best_layer}.")


def _add_patching_views(page, patch, patch_ans, patching_mode: str, n_patched: int) -> None:
    if patch is None:
        pass
    elif patch.metric == "mse":  # regression: squared error against the prompt's own target
        page.add(plots.patching_grids_figure(patch, what="delta_logprob_source"), "Patching grids (source x target, per layer)",
                 f"Mode {patching_mode!r}: squared error of the prediction against each target prompt's own y after "
                 f"patching the source task's vector at the query ({n_patched} prompts).")
    else:
        page.add(plots.patching_profile_figure(patch), "Task-vector patching by layer",
                 f"Mode {patching_mode!r}: every source task's vector patched at the query of every other task's prompts "
                 f"({n_patched} prompts).")
        page.add(plots.patching_grids_figure(patch), "Patching grids (source x target, per layer)",
                 "Fraction of target-task prompts whose answer follows the source task's rule after patching.")
    if patch_ans is not None:
        page.add(plots.patching_profile_figure(patch_ans), "Task-vector patching at the examples' answers",
                 "Mode 'replace': task vectors read (extract(..., at='answers')) and patched at every in-context "
                 "example's answer token instead of the query. A model that keeps its task there, not at the query, "
                 f"flips here ({n_patched} prompts).")


def _add_head_views(page, results, m, prompts, scores, prompt: int, top_k: int, notes: list[str]) -> None:
    if scores is None:
        page.add(circuits.attention_heads_view(m, prompts, None, prompt=prompt), f"Attention of every head on prompt {prompt}")
        return
    page.add(plots.head_scores_figure(scores), f"Head scores ({getattr(scores, 'method', '')})")
    page.add(circuits.attention_heads_view(m, prompts, scores, prompt=prompt, k=top_k),
             f"Attention of the top {top_k} heads on prompt {prompt}")
    page.add(circuits.circuit_view(scores, m, prompts, prompt=prompt, k=max(top_k, 8)), "Circuit view")
    _add_circuit_graphs(page, results, m, prompts, prompt, notes)


def _add_sweep_view(page, prompts, sweep, pairs) -> None:
    i0, j0 = pairs[0][:2]
    tokens = circuits.prompt_tokens(prompts, i0, spaced=True)
    page.add(circuits.position_sweep_view(sweep, tokens), "Where the task is read: residual patching by position",
             f"Clean: a prompt of one task; corrupted: the same query after another task's examples "
             f"({len(pairs)} pairs; tokens shown of pair 0: prompts {i0} and {j0}). Metric: logit of the clean task's "
             "answer minus the corrupted task's, at the query; 1 = the patch restores the clean task.")


def _ci(x, i=None) -> str:
    """`` [lo, hi]`` of a ``[2, ...]`` CI tensor (or a (lo, hi) pair) at index ``i``; "" without one."""
    if x is None:
        return ""
    lo, hi = (x[0], x[1]) if i is None else (x[0][i], x[1][i])
    return f" [{float(lo):.3f}, {float(hi):.3f}]"


@functools.wraps(_build_report)
def build_report(*args: Any, **kwargs: Any) -> Report:
    from tvlens.checks import check_call
    from tvlens.validate import unchecked

    check_call(_build_report, args, kwargs, where="build_report")
    # a report may sample another family than the model's on purpose (``--family``): its notes say so
    with unchecked("family"):
        return _build_report(*args, **kwargs)


def _best_patch(patch) -> str:
    b, why = patch.best_layer_choice()
    if b is None:
        return f"best layer: none ({why})"
    li = patch.layers.index(b)
    fci, cci = getattr(patch, "flip_rate_ci", None), getattr(patch, "control_ci", None)
    return (f"best layer {b}: flip rate {float(patch.flip_rate[li]):.3f}{_ci(fci, li)}, own-task control "
            f"{float(patch.control[li]):.3f}{_ci(cci, li)} (unpatched accuracy {patch.unpatched_accuracy:.3f})")


def _add_circuit_graphs(page, results, m, prompts, prompt, notes, per_task: int = 2) -> None:
    """EAP-IG edge graphs on a few prompts: edges read at the examples' answers (where the task is written)
    and at the query (where it is read)."""
    from tvlens.circuits import edge_attribution
    from tvlens.views.circuit_graph import circuit_graph_view

    keep = torch.cat([(prompts.labels == t).nonzero().flatten()[:per_task] for t in range(prompts.n_tasks)])
    if prompt not in keep.tolist():
        keep = torch.cat([torch.tensor([prompt]), keep])
    sub = prompts.subset(keep)
    try:
        graphs = {at: edge_attribution(m, sub, method="eap-ig", positions=at, ci=True, progress=False)
                  for at in ("answers", "query")}
    except ConfigError as e:
        notes.append(f"circuit graphs left out: {e}")
        return
    results["edge_scores"] = graphs
    for at, what in (("answers", "at the examples' answers: which heads write the task"),
                     ("query", "at the query: which heads read it")):
        page.add(circuit_graph_view(graphs[at], m, sub, prompt=0, k=20),
                 f"Circuit graph {what}",
                 f"EAP-IG edge scores ({graphs[at].notes['ig_steps']} steps, in-context labels shuffled as the corrupted "
                 f"run, {len(sub)} prompts), counting only where the receiver reads at {at} positions. "
                 "Slide to show more edges; click a head for its attention on the first prompt.")


def summarize(name, fam, acc, dec, patch, scores=None, em=None, sweep=None, top_k: int = 5,
              patch_answers=None) -> list[tuple[str, str]]:
    """The report's short summary: (what, result) rows; ``[lo, hi]`` are 95% bootstrap CIs over prompts
    (stratified by task, seeded; ``tvlens.stats``)."""
    for r in (acc, patch, scores, em, patch_answers):
        if r is not None and hasattr(r, "_ensure_ci"):
            r._ensure_ci()
    rows = [("model", f"{name}, family {fam.name} ({len(dec.task_names)} tasks)"),
            (f"ICL {acc.metric}", f"{acc.mean:.3f}{_ci(getattr(acc, 'mean_ci', None))} (mean over non-null tasks)")]
    tds = " ".join(f"{float(v):.2f}" for v in dec.td)
    b = dec.layers.index(dec.best_layer)
    null = ""
    if getattr(dec, "null_mean", None) is not None:
        p = float(dec.p_value[b])
        p = f"p {p:.3g}" if p == p else "no p-value: tied neighbourhoods"
        null = (f"; shuffled-label null {float(dec.null_mean[b]):.3f} (q95 {float(dec.null_quantile[b]):.3f}, "
                f"{p})")
    rows.append(("task decodability", f"best layer {dec.best_layer}: TD {dec.best_td:.3f}"
                                      f"{_ci(getattr(dec, 'td_ci', None), b)} (chance {dec.chance:.3f}{null}); "
                                      f"layers {dec.layers[0]}..{dec.layers[-1]}: {tds}"))
    if patch is None:
        rows.append(("patching", "not run: no other task's rule applies to these prompts' queries"))
    elif patch.metric == "mse":
        grid_means = ", ".join(f"L{L} {float(patch.delta_logprob_source[i].nanmean()):.3f}"
                               for i, L in enumerate(patch.layers))
        rows.append((f"patching ({patch.mode})", f"MSE grid means {grid_means}"))
    else:
        grid_means = ", ".join(f"L{L} {float(patch.follows_source[i].nanmean()):.2f}" for i, L in enumerate(patch.layers))
        rows.append((f"patching at the query ({patch.mode})", f"{_best_patch(patch)}, floor {patch.flip_floor:.3f}; "
                                                              f"grid means {grid_means}"))
    if patch_answers is not None:
        rows.append(("patching at answers (replace)", _best_patch(patch_answers)))
    if scores is not None:
        sci = getattr(scores, "scores_ci", None)

        def head(L, h, s):
            return f"L{L}H{h} ({s:+.3g}" + ("" if sci is None else f" [{float(sci[0, L, h]):+.3g}, "
                                                                   f"{float(sci[1, L, h]):+.3g}]") + ")"

        rows.append((f"top heads ({getattr(scores, 'method', '')})", ", ".join(head(*t) for t in scores.top(top_k))))
    if sweep is not None:
        nv = sweep.normalized()
        L, p = divmod(int(torch.argmax(nv.nan_to_num(-1e9))), nv.shape[1])
        nci = sweep.normalized_ci() if hasattr(sweep, "normalized_ci") else None
        ci = "" if nci is None else f" [{float(nci[0, L, p]):.2f}, {float(nci[1, L, p]):.2f}] over the pairs"
        rows.append(("position sweep", f"strongest restoring patch at layer {L}, position {p} ({float(nv[L, p]):.2f}{ci})"))
    if em is not None:
        sp = getattr(em, "spearman_ci", None)
        sp = "" if sp is None else f" [{sp[0]:.2f}, {sp[1]:.2f}]"
        rows.append(("emergence", f"{len(em.steps)} checkpoints, TD at layer {em.best_layer} {float(em.td_at()[0]):.2f} -> "
                                  f"{float(em.td_at()[-1]):.2f}, mean {em.metric} {float(em.mean_metric[0]):.2f} -> "
                                  f"{float(em.mean_metric[-1]):.2f}, Spearman {em.spearman():.2f}{sp}"))
    rows.append(("uncertainty", "[lo, hi]: 95% percentile bootstrap CI over prompts (stratified by task, 1000 "
                                "resamples, seed 0; tvlens.stats)"))
    return rows


def report_filename(model: Any, family: Any) -> str:
    base = model if isinstance(model, str) else "model"
    base = Path(base).name or "model"
    fam = family if isinstance(family, str) else getattr(family, "name", "family") if family is not None else ""
    stem = "-".join(x for x in ("tvlens-report", base, fam) if x)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) + ".html"


def write_report(out_dir: str | Path, model: Any = "default", family: Any = None, filename: str | None = None,
                 overwrite: bool = False, **kwargs: Any) -> tuple[Path, Report]:
    """Build the report and write it atomically to ``out_dir/filename``; the folder is checked first, and an
    existing report file there is refused (before any work) unless ``overwrite=True``."""
    from tvlens.checks import check_new_file

    folder = check_writable_dir(out_dir, "out")
    target = check_new_file(folder / (filename or report_filename(model, family)), "out", overwrite=overwrite,
                            where="report")  # refused before any work, not after the analyses
    rep = build_report(model, family, **kwargs)
    path = rep.save(target, overwrite=overwrite)
    return path, rep


__all__ = ["Report", "build_report", "contrast_pairs", "summarize", "write_report"]
