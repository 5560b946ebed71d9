"""Language-model studies: answer scoring for text prompts, and TD versus ICL accuracy.

- :func:`text_accuracy`: ICL accuracy of text prompts, scoring the answer's first token or greedily
  generating the whole answer (exact match), as the prompts were sampled (``scoring=``);
- :func:`greedy_generate`: a plain greedy loop on token ids (no KV cache, no tokenizer round trip);
- :func:`td_vs_accuracy`: per task, ICL accuracy and TD at the best layer over several shot counts,
  and the linear fit of accuracy on TD with its R² (Han et al. 2025: Llama-3.1-8B, R² 0.781 on
  POS, 0.528 on bitwise).

These work on any model tvlens loads: the shipped synthetic models with their token families, and
pretrained models (``tvlens.load_model("gpt2")``) with the text families (``pos``,
``bitwise_text``, ``lexical``).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from tvlens import tasks as _tasks
from tvlens.accuracy import (  # greedy_generate, text_accuracy, ...: re-exported, they live in accuracy
    greedy_generate,
    teacher_forced_exact_match,
    text_accuracy,
)
from tvlens.errors import ConfigError
from tvlens.prompts import PromptSet
from tvlens.tasks.text import SCORINGS, TextTaskFamily, tokenizer_of


# --------------------------------------------------------------------------- prompts for a model
def family_of(family: Any) -> _tasks.TaskFamily:
    if isinstance(family, _tasks.TaskFamily):
        return family
    if not isinstance(family, str):
        raise ConfigError(f"a task family must be a name (e.g. 'pos') or a TaskFamily, got {family!r}")
    return _tasks.get(family)


def prompts_for(
    model,
    family: _tasks.TaskFamily | str,
    n_per_task: int,
    shots: int = 4,
    seed: int = 0,
    *,
    tokenizer: Any = None,
    scoring: str | None = None,
) -> PromptSet:
    """A family's prompts for ``model``: text families are tokenized with ``tokenizer`` (default
    ``model.tokenizer``, or the family's own word tokenizer for a model without one, e.g. a synthetic
    model trained on the family); token families are sampled as they are."""
    fam = family_of(family)
    if isinstance(fam, TextTaskFamily):
        tok = text_tokenizer(model, tokenizer)
        return fam.sample(n_per_task, shots=shots, seed=seed, tokenizer=tok, scoring=scoring)
    return fam.sample(n_per_task, shots=shots, seed=seed)


def text_tokenizer(model, tokenizer: Any = None) -> Any:
    """``tokenizer``, else ``model.tokenizer``; None (the family's word tokenizer) for models without one."""
    if tokenizer is not None:
        return tokenizer_of(tokenizer)
    tok = getattr(model, "tokenizer", None)
    return None if getattr(tok, "tvlens_word_tokenizer", False) else tok  # a synthetic model's own words


# --------------------------------------------------------------------------- TD vs accuracy
def linear_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Least-squares line ``y = slope * x + intercept`` and its R² (nan with < 3 points or constant x)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n < 3 or np.ptp(x) == 0:
        return {"slope": float("nan"), "intercept": float("nan"), "r2": float("nan"), "n": n}
    slope, intercept = np.polyfit(x, y, 1)
    ss_res = float(((y - (slope * x + intercept)) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return {"slope": float(slope), "intercept": float(intercept), "r2": float(r2), "n": n}


@dataclass
class TDAccuracyResult:
    """Per (family, shots, task): ICL accuracy and TD at the family's best layer, with linear fits."""

    rows: list[dict[str, Any]]  # family, shots, task, td, accuracy, layer, n
    fits: dict[str, dict[str, float]]  # "all" and each family -> slope, intercept, r2, n
    scoring: str
    k: int = 10
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def r2(self) -> float:
        return self.fits["all"]["r2"]

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def fits_dataframe(self):
        import pandas as pd

        return pd.DataFrame([{"family": k, **v} for k, v in self.fits.items()])

    def __repr__(self) -> str:
        def r2(v):
            ci = f" [{v['r2_lo']:.3f}, {v['r2_hi']:.3f}]" if "r2_lo" in v else ""
            return f"R²={v['r2']:.3f}{ci}"

        fits = ", ".join(f"{k}: {r2(v)} (n={v['n']})" for k, v in self.fits.items())
        return f"TDAccuracyResult({len(self.rows)} points, scoring={self.scoring}; {fits})"

    def _repr_html_(self) -> str:
        from tvlens.plotting import figure_fragment, result_html

        fmt = lambda v: f"{v:.3f}"  # noqa: E731
        return result_html("<div><b>TD vs ICL accuracy</b> (TD at the best layer, leave-one-out "
                           f"{self.k}-NN; accuracy: exact match, {html.escape(self.scoring)})"
                           + self.fits_dataframe().to_html(index=False, float_format=fmt)
                           + self.to_dataframe().to_html(index=False, float_format=fmt) + "</div>",
                           [figure_fragment(self.plot())])

    def plot(self):
        """Accuracy against TD per (family, shots, task), with each family's fit and R²:
        ``tvlens.views.td_accuracy_figure``."""
        from tvlens.plotting import td_accuracy_figure

        return td_accuracy_figure(self)


def add_r2_ci(fits: dict[str, dict[str, float]], rows: list[dict[str, Any]], ci: float = 0.95, n_boot: int = 1000,
              seed: int = 0) -> dict[str, dict[str, float]]:
    """Add ``r2_lo``, ``r2_hi`` to each fit: a bootstrap CI of R² over the fit's points, (TD, accuracy)
    pairs resampled (``tvlens.stats.r2_ci``); NaN with fewer than three points."""
    from tvlens.stats import r2_ci

    for name, fit in fits.items():
        sel = rows if name == "all" else [r for r in rows if r["family"] == name]
        iv = r2_ci([r["td"] for r in sel], [r["accuracy"] for r in sel], ci=ci, n_boot=n_boot, seed=seed)
        fit.update(r2_lo=float(iv.lo), r2_hi=float(iv.hi), ci=ci)
    return fits


def td_vs_accuracy(
    model,
    families: Sequence[_tasks.TaskFamily | str] | _tasks.TaskFamily | str,
    shots: Sequence[int] = (1, 4, 10),
    n_per_task: int = 50,
    *,
    k: int = 10,
    scoring: str | None = None,
    tokenizer: Any = None,
    include_null: bool = False,
    seed: int = 0,
    batch_size: int | None = 64,
    progress: bool = True,
) -> TDAccuracyResult:
    """ICL accuracy and TD per task over shot counts, and the linear fit of accuracy on TD.

    For each family and shot count: ``n_per_task`` prompts per task; accuracy per task (exact match:
    ``text_accuracy`` with ``scoring``); TD per task at the layer where the family's overall TD is
    highest (leave-one-out ``k``-NN, ``task_decodability``). The Null task (random answers, no rule) is
    left out of the points unless ``include_null``. Fits: over all points and per family.
    """
    fams = [families] if isinstance(families, (str, _tasks.TaskFamily)) else list(families)
    if not fams:
        raise ConfigError("families is empty: name at least one task family")
    from tvlens.checks import check_int, check_int_list, check_seed

    fams = [family_of(f) for f in fams]
    names = [f.name for f in fams]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"td_vs_accuracy: families names {dup} more than once ({names}): each family's points would "
                          "be counted twice in the fits; give each family once")
    shots = check_int_list(shots, "shots", minimum=0, where="td_vs_accuracy")  # numpy integers and arrays welcome
    if len(set(shots)) != len(shots):
        raise ConfigError(f"td_vs_accuracy: shots names a shot count more than once ({shots}): its points would be "
                          "counted twice in the fits; give each shot count once")
    if scoring is not None and scoring not in SCORINGS:
        raise ConfigError(f"scoring must be one of {SCORINGS} (or None), got {scoring!r}")
    k = check_int(k, "k", minimum=1, where="td_vs_accuracy")
    seed = check_seed(seed, where="td_vs_accuracy")
    n_per_task = check_int(n_per_task, "n_per_task", minimum=k + 1, where="td_vs_accuracy",
                           hint=f"more than k={k} prompts per task (TD's leave-one-out k-NN)")
    for fam in fams:
        for s in shots:
            if s > fam.max_shots():
                raise ConfigError(f"shots={s} is more than family {fam.name!r} can fill (at most {fam.max_shots()})")
    from tvlens.encoding import extract, task_decodability

    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(fams) * len(shots), desc="td_vs_accuracy", disable=not progress)
    used = set()
    for fam in fams:
        for s in shots:
            prompts = prompts_for(model, fam, n_per_task, s, seed, tokenizer=tokenizer, scoring=scoring)
            acc = text_accuracy(model, prompts, scoring=scoring, batch_size=batch_size)
            used.add(acc.notes.get("scoring", "?"))
            td = task_decodability(extract(model, prompts, batch_size=batch_size, progress=False), k=k)
            li = td.layers.index(td.best_layer)
            acc.with_ci()
            for j, task in enumerate(prompts.task_names):
                if task == "null" and not include_null:
                    continue
                rows.append({"family": fam.name, "shots": s, "task": task, "td": float(td.per_task[li, j]),
                             "accuracy": acc.per_task[task], "layer": td.best_layer,
                             "n": int((prompts.labels == j).sum()),
                             "td_lo": float(td.per_task_ci[0, li, j]), "td_hi": float(td.per_task_ci[1, li, j]),
                             "accuracy_lo": float(acc.per_task_ci[0, j]), "accuracy_hi": float(acc.per_task_ci[1, j])})
            bar.update(1)
    bar.close()
    fits = {"all": linear_fit([r["td"] for r in rows], [r["accuracy"] for r in rows])}
    for fam in fams:
        sel = [r for r in rows if r["family"] == fam.name]
        fits[fam.name] = linear_fit([r["td"] for r in sel], [r["accuracy"] for r in sel])
    add_r2_ci(fits, rows)
    return TDAccuracyResult(rows=rows, fits=fits, scoring="/".join(sorted(used)), k=k)


__all__ = [
    "TDAccuracyResult",
    "family_of",
    "greedy_generate",
    "linear_fit",
    "prompts_for",
    "td_vs_accuracy",
    "teacher_forced_exact_match",
    "text_accuracy",
    "text_tokenizer",
]
