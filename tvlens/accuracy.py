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
from jaxtyping import Float
from tqdm.auto import tqdm

from tvlens.errors import ConfigError
from tvlens.prompts import PromptSet


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
        from tvlens.views.page import figure_fragment, result_html

        return result_html(f"<div><b>ICL {html.escape(self.metric)}</b> ({self.shots}-shot)" + self.to_dataframe().to_html(
            index=False, float_format=lambda v: f"{v:.3f}"
        ) + "</div>", [figure_fragment(self.plot())])

    def plot(self):
        """Per-task accuracy (or MSE next to least squares) as bars: ``tvlens.views.accuracy_figure``."""
        from tvlens.views.plots import accuracy_figure

        return accuracy_figure(self)


def answer_positions(query_pos: torch.Tensor, n_answer: int) -> torch.Tensor:
    """``[b, n_answer]``: the positions whose outputs predict the query's answer tokens."""
    return query_pos[:, None] + torch.arange(n_answer, device=query_pos.device)[None]


def at_answer_positions(x: torch.Tensor, query_pos: torch.Tensor, n_answer: int) -> torch.Tensor:
    """``x[b, seq, ...]`` at each prompt's answer positions: ``[b, n_answer, ...]``."""
    pos = answer_positions(query_pos, n_answer)
    return x.gather(1, pos.view(*pos.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:]))


def answer_scores(sel: torch.Tensor, answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact match of the whole answer and its log-probability, from logits at the answer positions.

    ``sel`` is ``[b, n_answer, d_vocab]``; exact match with teacher forcing (every answer token is the
    argmax given the correct previous ones) is the same verdict as greedy generation.
    """
    ok = (sel.argmax(-1) == answers).all(-1)
    lp = sel.log_softmax(-1).gather(-1, answers[..., None])[..., 0].sum(-1)
    return ok, lp


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
        from tvlens.llm import text_accuracy

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
