"""In-context accuracy: does the model answer each prompt's query (per task)?

Token families: exact match of the whole answer (every answer token is the argmax given the correct
previous ones: the same verdict as greedy generation of the whole answer), plus the answer's
log-probability. Continuous families: squared error of the prediction at the query, per task, next
to dense least squares fit on the same prompt's examples and, for ``sparse_regression`` prompts, to the
basis-aware estimator (best-fitting basis, then least squares restricted to it).

Text prompts (``pos``, ``bitwise_text``, ``lexical``) are scored as they were sampled
(``prompts.params["scoring"]``): ``"first_token"`` scores the answer's first token (teacher forcing),
``"greedy"`` hands them to ``tvlens.text_accuracy`` (greedy generation of the whole answer), so a
multi-token answer is never silently reduced to its first token.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from tvlens.backends import get_backend
from tvlens.errors import ConfigError
from tvlens.positions import answer_positions, at_answer_positions  # noqa: F401 - also importable from here
from tvlens.prompts import PromptSet
from tvlens.tasks.text import SCORINGS


def check_prompts_fit(model, prompts: PromptSet, where: str = "") -> None:
    """Raise a clear error when prompts cannot be fed to ``model`` (``tvlens.validate.check_model_prompts``:
    a PromptSet of the model's kind, token ids in its vocabulary, within its context, of its family)."""
    from tvlens.validate import check_model_prompts

    check_model_prompts(model, prompts, where)


def greedy_scored(prompts: PromptSet) -> bool:
    """True for text prompts sampled with ``scoring="greedy"``: their whole answer is scored by greedy
    generation (``tvlens.text_accuracy``), not by its first token."""
    return "answer_tokens" in prompts.extra and prompts.params.get("scoring") == "greedy"


def refuse_greedy(prompts: PromptSet, what: str) -> None:
    """Raise ``ConfigError`` when ``what`` (which scores only an answer's first token) is given text
    prompts sampled with ``scoring="greedy"`` whose answers span several tokens."""
    if not greedy_scored(prompts):
        return
    lens = prompts.extra["answer_len"]
    n_multi = int((lens > 1).sum())
    if n_multi:
        raise ConfigError(
            f"{what} scores an answer by its first token, but these {prompts.family!r} prompts were sampled with "
            f"scoring='greedy' and {n_multi} of {len(prompts)} answers span several tokens (up to "
            f"{int(lens.max())}): sample them with scoring='first_token' for {what}, or score whole answers with "
            "tvlens.text_accuracy"
        )


def batches(n: int, batch_size: int | None, desc: str = "", progress: bool = False):
    from tvlens.checks import check_batch_size  # batch_size: a positive int, or None for all (never 0)

    batch_size = check_batch_size(batch_size, where=desc)
    bs = max(n, 1) if batch_size is None else batch_size
    starts = range(0, n, bs)
    return tqdm(starts, desc=desc, disable=not progress or len(starts) <= 1, leave=False), bs


@dataclass
class AccuracyResult:
    """Per-task in-context accuracy (token families) or squared error (regression)."""

    task_names: list[str]
    metric: str  # "accuracy" or "mse"
    per_prompt: Float[torch.Tensor, "n"]  # 1/0 correct, or squared error
    labels: torch.Tensor
    logprob: torch.Tensor | None = None  # answer log-probability per prompt (token families)
    baseline: torch.Tensor | None = None  # least-squares squared error per prompt (regression)
    basis_baseline: torch.Tensor | None = None  # basis-aware estimator's squared error (sparse_regression)
    shots: int = 0
    notes: dict = field(default_factory=dict)
    # bootstrap CIs over prompts, stratified by task (``with_ci``; filled on first use with the defaults)
    per_task_ci: torch.Tensor | None = None  # [2, task]: lo, hi of each task's accuracy (or MSE)
    mean_ci: tuple[float, float] | None = None  # of ``mean`` (the mean over non-null tasks)
    ci_info: dict = field(default_factory=dict)  # ci, n_boot, seed

    def with_ci(self, ci: float = 0.95, n_boot: int = 1000, seed: int = 0) -> "AccuracyResult":
        """Fill ``per_task_ci`` and ``mean_ci``: percentile bootstrap over prompts, stratified by task
        (``tvlens.stats``). Returns ``self``."""
        from tvlens import stats

        ci, n_boot, seed = stats.check_ci_args(ci, n_boot, seed)
        T = len(self.task_names)
        v, lab = self.per_prompt.double().numpy(), self.labels.numpy()
        gm = stats.group_means_boot(v, lab, T, stats.bootstrap_counts(len(v), n_boot, seed, lab))  # [boot, task]
        self.per_task_ci = torch.tensor(np.stack(stats.percentile_ci(gm, ci)), dtype=torch.float32)
        real = [j for j, t in enumerate(self.task_names) if t != "null" and bool((self.labels == j).any())]
        if real:
            lo, hi = stats.percentile_ci(gm[:, real].mean(1), ci)
            self.mean_ci = (float(lo), float(hi))
        else:
            self.mean_ci = (float("nan"), float("nan"))
        self.ci_info = {"ci": ci, "n_boot": n_boot, "seed": seed}
        return self

    def _ensure_ci(self) -> None:
        if self.per_task_ci is None and len(self.per_prompt):
            self.with_ci()

    def _per_task(self, values: torch.Tensor) -> dict[str, float]:
        return {
            t: float(values[self.labels == i].float().mean()) if bool((self.labels == i).any()) else float("nan")
            for i, t in enumerate(self.task_names)
        }

    @property
    def per_task(self) -> dict[str, float]:
        return self._per_task(self.per_prompt)

    @property
    def mean(self) -> float:
        vals = [v for t, v in self.per_task.items() if t != "null" and not np.isnan(v)]
        return float(np.mean(vals)) if vals else float("nan")

    def __getitem__(self, task: str) -> float:
        return self.per_task[task]

    def to_dataframe(self):
        import pandas as pd

        self._ensure_ci()
        rows = []
        for i, t in enumerate(self.task_names):
            m = self.labels == i
            row = {"task": t, "n": int(m.sum()), self.metric: self.per_task[t]}
            if self.per_task_ci is not None:
                row[f"{self.metric}_lo"] = float(self.per_task_ci[0, i])
                row[f"{self.metric}_hi"] = float(self.per_task_ci[1, i])
            if self.logprob is not None:
                row["answer_logprob"] = float(self.logprob[m].mean()) if bool(m.any()) else float("nan")
            if self.baseline is not None:
                row["least_squares_mse"] = float(self.baseline[m].mean()) if bool(m.any()) else float("nan")
            if self.basis_baseline is not None:
                row["basis_aware_mse"] = float(self.basis_baseline[m].mean()) if bool(m.any()) else float("nan")
            rows.append(row)
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        self._ensure_ci()
        vals = ", ".join(f"{t}: {v:.3f}" for t, v in self.per_task.items())
        ci = "" if self.mean_ci is None else f" [{self.mean_ci[0]:.3f}, {self.mean_ci[1]:.3f}]"
        return f"AccuracyResult({self.metric}, shots={self.shots}, mean={self.mean:.3f}{ci}, {{{vals}}})"

    def _repr_html_(self) -> str:
        from tvlens.plotting import figure_fragment, result_html

        return result_html(f"<div><b>ICL {html.escape(self.metric)}</b> ({self.shots}-shot)" + self.to_dataframe().to_html(
            index=False, float_format=lambda v: f"{v:.3f}"
        ) + "</div>", [figure_fragment(self.plot())])

    def plot(self):
        """Per-task accuracy (or MSE next to least squares) as bars: ``tvlens.views.accuracy_figure``."""
        from tvlens.plotting import accuracy_figure

        return accuracy_figure(self)




def answer_scores(sel: torch.Tensor, answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact match of the whole answer and its log-probability, from logits at the answer positions.

    ``sel`` is ``[b, n_answer, d_vocab]``; exact match with teacher forcing (every answer token is the
    argmax given the correct previous ones) is the same verdict as greedy generation.
    """
    return (sel.argmax(-1) == answers).all(-1), answer_logprob(sel, answers)


def answer_logprob(sel: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Log-probability of the whole answer (teacher forcing), per prompt, from logits at the answer positions."""
    return sel.log_softmax(-1).gather(-1, answers[..., None])[..., 0].sum(-1)


def metric_fn(metric, method: str):
    """Per-prompt metric ``f(logits at the answer positions [b, n_answer, vocab], answers [b, n_answer]) -> [b]``
    and its name, for the attribution methods (``method="atp"`` refuses a metric without a gradient)."""
    if callable(metric):
        return metric, getattr(metric, "__name__", "custom")
    if metric == "prob":
        return (lambda sel, ans: answer_logprob(sel, ans).exp()), metric
    if metric == "logprob":
        return answer_logprob, metric
    if metric == "logit":
        return (lambda sel, ans: sel.gather(-1, ans[..., None])[..., 0].sum(-1)), metric
    if metric == "accuracy":
        if method == "atp":
            raise ConfigError("metric='accuracy' is not differentiable (an argmax): method='atp' needs a gradient; "
                              "use 'logprob', 'prob' or 'logit'")
        return (lambda sel, ans: (sel.argmax(-1) == ans).all(-1).to(sel.dtype)), metric
    raise ConfigError(f"metric must be 'prob', 'logprob', 'logit', 'accuracy' or a callable "
                      f"f(logits [b, n_answer, vocab], answers [b, n_answer]) -> [b]; got {metric!r}")


UNEMBED_BUDGET = 1 << 24  # logits held at once when scoring: 64 MB of float32 (a chunk of rows x d_vocab_out)


def unembed_rows(d_vocab_out: int, budget: int | None = None) -> int:
    """How many positions one unembedding chunk holds within ``budget`` logits (at least one)."""
    return max(1, int(budget or UNEMBED_BUDGET) // max(int(d_vocab_out), 1))


def score_answers(bk, picked: Float[torch.Tensor, "b a d_model"], answers: torch.Tensor,
                  valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact match and log-probability of ``answers`` ``[b, a]`` from the final residual at their
    positions ``picked`` (before the final norm), unembedding at most ``unembed_rows`` positions at a
    time: a ``[b, a, d_vocab]`` tensor is never built (Gemma-3's 262k vocabulary). ``valid`` ``[b, a]``
    masks the positions past a shorter answer (they count as matched and add no log-probability).
    The same verdicts and log-probabilities as ``answer_scores`` on the full logits."""
    b, a, d = picked.shape
    flat, ans = picked.reshape(b * a, d), answers.reshape(b * a)
    hit = torch.empty(b * a, dtype=torch.bool)
    lp = torch.empty(b * a, dtype=torch.float32)
    step = unembed_rows(bk.d_vocab_out)
    for i in range(0, b * a, step):
        logits = bk.unembed(flat[i : i + step])
        t = ans[i : i + step].to(logits.device)
        hit[i : i + step] = (logits.argmax(-1) == t).cpu()
        lp[i : i + step] = logits.float().log_softmax(-1).gather(-1, t.clamp_min(0)[:, None])[:, 0].cpu()
    hit, lp = hit.view(b, a), lp.view(b, a)
    if valid is not None:
        valid = valid.cpu()
        hit, lp = hit | ~valid, torch.where(valid, lp, torch.zeros_like(lp))
    return hit.all(-1), lp.sum(-1)


def logits_at_answers(model, x: torch.Tensor, query_pos: torch.Tensor, n_answer: int,
                      start_at_layer: int | None = None) -> torch.Tensor:
    """Run ``model`` on ``x`` (inputs, or the residual stream entering ``start_at_layer``) and unembed
    only the answer positions: ``[b, n_answer, d_vocab_out]``."""
    from tvlens.backends import get_backend

    bk = get_backend(model)
    resid = bk.final_resid(x) if start_at_layer is None else bk.run_from(x, start_at_layer)
    return bk.unembed(at_answer_positions(resid, query_pos, n_answer))


def icl_accuracy(model, prompts: PromptSet, batch_size: int | None = 256, progress: bool = False) -> AccuracyResult:
    """Per-task in-context accuracy of ``model`` on ``prompts`` (per-task MSE for regression).

    Token families: exact match of the whole answer. Text prompts: as sampled (``scoring=``): the
    answer's first token, or, for ``scoring="greedy"``, greedy generation of the whole answer
    (``tvlens.text_accuracy``); ``result.notes["scoring"]`` says which.
    """
    check_prompts_fit(model, prompts)
    if greedy_scored(prompts):
        return text_accuracy(model, prompts, scoring="greedy", batch_size=batch_size, progress=progress)
    return teacher_forced_accuracy(model, prompts, batch_size=batch_size, progress=progress)


@torch.no_grad()
def teacher_forced_accuracy(model, prompts: PromptSet, batch_size: int | None = 256,
                            progress: bool = False) -> AccuracyResult:
    """Exact match of ``prompts.answers`` with teacher forcing, one forward pass per batch (MSE for
    regression). For text prompts ``answers`` is the answer's first token: use ``icl_accuracy``,
    which honours the prompts' scoring."""
    check_prompts_fit(model, prompts)
    was_training = model.training
    model.eval()
    from tvlens.backends import get_backend

    bk = get_backend(model)
    device = bk.input_device
    per_prompt, logprobs = [], []
    n_ans = prompts.n_answer
    it, bs = batches(len(prompts), batch_size, "icl_accuracy", progress)
    for s in it:
        sub = prompts.subset(slice(s, s + bs)).to(device)
        last = int(sub.query_pos.max()) + n_ans  # later positions can't change these outputs
        if prompts.is_continuous:
            sel = logits_at_answers(model, sub.model_input[:, :last], sub.query_pos, n_ans)  # [b, n_ans, 1]
            per_prompt.append(((sel[..., 0] - sub.answers) ** 2).mean(-1).float().cpu())
        else:  # one pass that stops after the blocks; only the answer positions are unembedded
            with bk.prefer_fast_attention():
                resid = bk.final_resid(sub.model_input[:, :last])
            correct, lp = score_answers(bk, at_answer_positions(resid, sub.query_pos.to(resid.device), n_ans),
                                        sub.answers)
            per_prompt.append(correct.float())
            logprobs.append(lp)
    if was_training:
        model.train()
    baseline = basis_baseline = None
    if prompts.is_continuous:
        from tvlens.tasks.sparse_regression import basis_aware_baseline, least_squares_baseline

        baseline = least_squares_baseline(prompts.to("cpu"))
        if all(k in prompts.params for k in ("D", "r", "n_bases")):
            basis_baseline = basis_aware_baseline(prompts.to("cpu"))
    return AccuracyResult(
        task_names=list(prompts.task_names),
        metric="mse" if prompts.is_continuous else "accuracy",
        per_prompt=torch.cat(per_prompt),
        labels=prompts.labels.cpu(),
        logprob=torch.cat(logprobs) if logprobs else None,
        baseline=baseline,
        basis_baseline=basis_baseline,
        shots=prompts.shots,
        notes={"scoring": "first_token"} if "answer_tokens" in prompts.extra else {},
    )


def _scoring_of(prompts: PromptSet, scoring: str | None) -> str:
    if scoring is not None and scoring not in SCORINGS:
        raise ConfigError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if "answer_tokens" not in prompts.extra:
        if scoring == "greedy":
            return "greedy" if prompts.n_answer > 1 else "first_token"
        return "first_token"
    if scoring is None:
        return str(prompts.params.get("scoring", "first_token"))
    return scoring


# --------------------------------------------------------------------------- greedy generation
@torch.no_grad()
def greedy_generate(
    model,
    prompts: PromptSet,
    max_new_tokens: int | None = None,
    batch_size: int | None = 64,
    progress: bool = False,
) -> Int[torch.Tensor, "n new"]:
    """Greedy continuation of each prompt after its query position: ``[n, max_new_tokens]`` token ids.

    Step ``j`` runs the model on the prefix and takes the argmax at position ``query_pos + j``; what the
    PromptSet holds after that position (the teacher-forced answer, padding) cannot reach it through
    causal attention, so it is overwritten as tokens are generated. Our own loop: TransformerLens'
    ``generate`` does not take token input for every model. ``max_new_tokens`` defaults to the longest
    answer.
    """
    check_prompts_fit(model, prompts)
    if prompts.is_continuous:
        raise ConfigError("greedy_generate needs token prompts; these are continuous")
    if max_new_tokens is None:
        lens = prompts.extra.get("answer_len")
        max_new_tokens = int(lens.max()) if lens is not None else prompts.n_answer
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    bk = get_backend(model)
    if int(prompts.query_pos.max()) + max_new_tokens > bk.n_ctx:
        raise ConfigError(
            f"generating {max_new_tokens} tokens after position {int(prompts.query_pos.max())} exceeds the model's "
            f"context ({bk.n_ctx})"
        )
    device = bk.input_device
    out = torch.empty(len(prompts), max_new_tokens, dtype=torch.long)
    it, bs = batches(len(prompts), batch_size, "greedy_generate", progress)
    for s in it:
        sub = prompts.subset(slice(s, s + bs)).to(device)
        q = sub.query_pos
        width = int(q.max()) + max_new_tokens
        seq = torch.zeros(len(sub), width, dtype=torch.long, device=device)
        n = min(width, sub.seq_len)
        seq[:, :n] = sub.tokens[:, :n]  # type: ignore[index]
        rows = torch.arange(len(sub), device=device)
        for j in range(max_new_tokens):
            pos = q + j
            logits = logits_at_answers(model, seq[:, : int(pos.max()) + 1], pos, 1)[:, 0]
            nxt = logits.argmax(-1)
            out[s : s + len(sub), j] = nxt.cpu()
            if j + 1 < max_new_tokens:
                seq[rows, pos + 1] = nxt
    return out


# --------------------------------------------------------------------------- accuracy
@torch.no_grad()
def text_accuracy(
    model,
    prompts: PromptSet,
    scoring: str | None = None,
    batch_size: int | None = 64,
    progress: bool = False,
) -> AccuracyResult:
    """Per-task ICL accuracy, exact match. ``scoring``: ``"first_token"`` (teacher forcing on the
    answer's first token) or ``"greedy"`` (greedy generation of the whole answer, which must match
    every answer token); default: as the prompts were sampled (``prompts.params["scoring"]``).

    Token-family prompts are scored with teacher forcing (whole answer: the same verdict as greedy
    generation). ``tvlens.icl_accuracy`` on text prompts calls this with the prompts' own scoring.
    """
    check_prompts_fit(model, prompts)
    mode = _scoring_of(prompts, scoring)
    if mode == "first_token" or "answer_tokens" not in prompts.extra:
        res = teacher_forced_accuracy(model, prompts, batch_size=batch_size, progress=progress)
        res.notes["scoring"] = "first_token" if "answer_tokens" in prompts.extra else "whole answer"
        return res
    was_training = model.training
    model.eval()  # as teacher_forced_accuracy: no dropout while scoring
    try:
        return _greedy_accuracy(model, prompts, batch_size, progress)
    finally:
        if was_training:
            model.train()


@torch.no_grad()
def _greedy_accuracy(model, prompts: PromptSet, batch_size: int | None, progress: bool) -> AccuracyResult:
    """Greedy generation's exact-match verdicts, computed by teacher forcing in one forward pass per batch.

    Greedy decoding reproduces the whole answer exactly when, at every answer position, the argmax
    given the true previous answer tokens is the next answer token: until the first miss the generated
    prefix *is* the true prefix, so both verdicts agree (``tests/test_fast_paths.py`` checks them
    against ``greedy_generate``). So one pass over the prompt with its answer (causal attention: the
    answer tokens after position ``p`` cannot reach ``p``) gives every verdict and the answer's
    log-probability, where generation ran one pass per answer token; the pass stops after the blocks and
    only the answer positions are unembedded, in chunks (``score_answers``)."""
    bk = get_backend(model)
    device = bk.input_device
    per_prompt, logprobs = [], []
    it, bs = batches(len(prompts), batch_size, "text_accuracy", progress)
    for s in it:
        sub = prompts.subset(slice(s, s + bs)).to(device)
        lens = sub.extra["answer_len"]
        A = int(lens.max())
        last = int((sub.query_pos + lens).max())  # each answer ends inside the prompt
        with bk.prefer_fast_attention():
            resid = bk.final_resid(sub.tokens[:, :last])  # type: ignore[index]
        pos = (sub.query_pos[:, None] + torch.arange(A, device=device)[None]).clamp(max=last - 1)
        picked = resid.gather(1, pos.to(resid.device)[..., None].expand(-1, -1, resid.shape[-1]))
        ans = sub.extra["answer_tokens"][:, :A]
        ok, lp = score_answers(bk, picked, ans, valid=ans >= 0)
        per_prompt.append(ok.float())
        logprobs.append(lp)
    return AccuracyResult(
        task_names=list(prompts.task_names),
        metric="accuracy",
        per_prompt=torch.cat(per_prompt),
        labels=prompts.labels.cpu(),
        logprob=torch.cat(logprobs),
        shots=prompts.shots,
        notes={"scoring": "greedy"},
    )


def teacher_forced_exact_match(model, prompts: PromptSet) -> torch.Tensor:
    """Exact match of the whole (variable-length) answer with teacher forcing: every answer token is
    the argmax given the true previous ones. The same verdict as greedy generation; a reference."""
    full, lens = prompts.extra["answer_tokens"], prompts.extra["answer_len"]
    out = []
    with torch.no_grad():
        for i in range(len(prompts)):
            n = int(lens[i])
            q = prompts.query_pos[i : i + 1]
            sel = logits_at_answers(model, prompts.tokens[i : i + 1, : int(q) + n], q, n)  # type: ignore[index]
            ok, _ = answer_scores(sel, full[i : i + 1, :n])
            out.append(bool(ok))
    return torch.tensor(out)
