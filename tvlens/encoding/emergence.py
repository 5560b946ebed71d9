"""Emergence: TD and ICL accuracy across the checkpoints of a training run."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float

from tvlens.encoding.td import task_decodability
from tvlens.errors import ConfigError


# --------------------------------------------------------------------------- emergence
@dataclass
class EmergenceResult:
    """Per-task ICL metric and TD per layer across training steps."""

    steps: list[int]
    task_names: list[str]
    metric: str  # "accuracy" or "mse"
    per_task_metric: Float[torch.Tensor, "step task"]
    mean_metric: Float[torch.Tensor, "step"]
    layers: list[int]
    td: Float[torch.Tensor, "step layer"]
    td_per_task: Float[torch.Tensor, "step layer task"]
    k: int = 10
    n_per_task: int = 100
    # per prompt (the same prompts at every step): what the CIs are computed from
    per_prompt_metric: torch.Tensor | None = None  # [step, n]: correct (0/1) or squared error
    td_correct: torch.Tensor | None = None  # [step, layer, n]: leave-one-out verdicts
    labels: torch.Tensor | None = None  # [n]
    # bootstrap CIs over prompts, stratified by task (``with_ci``; filled on first use with the defaults)
    mean_metric_ci: torch.Tensor | None = None  # [2, step]
    per_task_metric_ci: torch.Tensor | None = None  # [2, step, task]
    td_ci: torch.Tensor | None = None  # [2, step, layer]
    spearman_ci: tuple[float, float] | None = None  # of ``spearman()`` at the best layer
    ci_info: dict = field(default_factory=dict)

    def with_ci(self, ci: float = 0.95, n_boot: int = 1000, seed: int = 0) -> "EmergenceResult":
        """Fill the CIs: percentile bootstrap over prompts, stratified by task. One resample of the prompts
        applies to every step (the same prompts are scored at each), so the Spearman correlation over
        steps is recomputed on each resample's series of TD (best layer, held fixed) and mean metric
        (``tvlens.stats``). Returns ``self``."""
        from tvlens import stats

        ci, n_boot, seed = stats.check_ci_args(ci, n_boot, seed)
        if self.per_prompt_metric is None or self.td_correct is None or self.labels is None:
            raise ConfigError("this EmergenceResult holds no per-prompt values: recompute it with tvlens.emergence "
                              "to get CIs")
        T = len(self.task_names)
        lab = self.labels.numpy()
        W = stats.bootstrap_counts(len(lab), n_boot, seed, lab)
        gm = stats.group_means_boot(self.per_prompt_metric.double().numpy(), lab, T, W)  # [boot, step, task]
        real = [j for j, t in enumerate(self.task_names) if t != "null"]
        mm = gm[..., real].mean(-1)  # [boot, step]
        counts = np.bincount(lab, minlength=T)
        gt = stats.group_means_boot(self.td_correct.double().numpy(), lab, T, W)  # [boot, step, layer, task]
        td = (np.nan_to_num(gt) * counts).sum(-1) / counts.sum()  # [boot, step, layer]
        self.per_task_metric_ci = torch.tensor(np.stack(stats.percentile_ci(gm, ci)), dtype=torch.float32)
        self.mean_metric_ci = torch.tensor(np.stack(stats.percentile_ci(mm, ci)), dtype=torch.float32)
        self.td_ci = torch.tensor(np.stack(stats.percentile_ci(td, ci)), dtype=torch.float32)
        if len(self.steps) >= 3:
            b = self.layers.index(self.best_layer)
            rho = stats.spearman_rows(td[:, :, b], -mm if self.metric == "mse" else mm)
            lo, hi = stats.percentile_ci(rho, ci)
            self.spearman_ci = (float(lo), float(hi))
        else:
            self.spearman_ci = (float("nan"), float("nan"))
        self.ci_info = {"ci": ci, "n_boot": n_boot, "seed": seed}
        return self

    def _ensure_ci(self) -> None:
        if self.mean_metric_ci is None and self.per_prompt_metric is not None and self.td_correct is not None:
            self.with_ci()

    @property
    def best_layer(self) -> int:
        """The layer whose TD is highest at the last step."""
        return self.layers[int(torch.argmax(self.td[-1]))]

    def td_at(self, layer: int | None = None) -> Float[torch.Tensor, "step"]:
        return self.td[:, self.layers.index(self.best_layer if layer is None else layer)]

    def spearman(self, layer: int | None = None) -> float:
        """Spearman correlation over steps between TD (best layer) and the mean ICL metric
        (for MSE the sign is flipped, so positive means encoding improves as loss falls)."""
        from scipy.stats import spearmanr

        m = self.mean_metric.numpy()
        if self.metric == "mse":
            m = -m
        t = self.td_at(layer).numpy()
        if len(t) < 2 or t.std() == 0 or m.std() == 0:
            return float("nan")  # undefined for a constant series
        return float(spearmanr(t, m).statistic)

    def to_dataframe(self):
        import pandas as pd

        self._ensure_ci()
        m = self.metric
        rows = []
        for i, s in enumerate(self.steps):
            row = {"step": s, f"mean_{m}": float(self.mean_metric[i])}
            if self.mean_metric_ci is not None:
                row.update({f"mean_{m}_lo": float(self.mean_metric_ci[0, i]),
                            f"mean_{m}_hi": float(self.mean_metric_ci[1, i])})
            for j, t in enumerate(self.task_names):
                row[f"{m}[{t}]"] = float(self.per_task_metric[i, j])
                if self.per_task_metric_ci is not None:
                    row[f"{m}[{t}]_lo"] = float(self.per_task_metric_ci[0, i, j])
                    row[f"{m}[{t}]_hi"] = float(self.per_task_metric_ci[1, i, j])
            for j, L in enumerate(self.layers):
                row[f"td[L{L}]"] = float(self.td[i, j])
                if self.td_ci is not None:
                    row[f"td[L{L}]_lo"] = float(self.td_ci[0, i, j])
                    row[f"td[L{L}]_hi"] = float(self.td_ci[1, i, j])
            rows.append(row)
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        self._ensure_ci()
        sp = "" if self.spearman_ci is None else f" [{self.spearman_ci[0]:.3f}, {self.spearman_ci[1]:.3f}]"
        return (f"EmergenceResult({len(self.steps)} steps {self.steps[0]}..{self.steps[-1]}, best layer "
                f"{self.best_layer}: TD {float(self.td_at()[0]):.3f} -> {float(self.td_at()[-1]):.3f}, mean "
                f"{self.metric} {float(self.mean_metric[0]):.3f} -> {float(self.mean_metric[-1]):.3f}, "
                f"Spearman {self.spearman():.3f}{sp})")

    def _repr_html_(self) -> str:
        from tvlens.plotting import figure_fragment, result_html, td_by_layer_figure

        return result_html(f"<div><b>Emergence of task encoding</b><pre>{html.escape(repr(self))}</pre>"
                           + self.to_dataframe().to_html(index=False, float_format=lambda v: f"{v:.3f}") + "</div>",
                           [figure_fragment(self.plot()), figure_fragment(td_by_layer_figure(self))])

    def plot(self):
        """Per-task ICL metric and TD per layer against training step: ``tvlens.views.emergence_figure``."""
        from tvlens.plotting import emergence_figure

        return emergence_figure(self)


def emergence(
    checkpoints,
    family=None,
    *,
    n_per_task: int = 100,
    shots: int = 4,
    seed: int = 12345,
    k: int = 10,
    steps: Sequence[int] | None = None,
    progress: bool = True,
) -> EmergenceResult:
    """TD per layer and per-task ICL metric at every checkpoint of a run.

    ``checkpoints``: a shipped model name or a run folder (as written by ``tvlens train``), or a
    list of ``(step, model)`` pairs where ``model`` is a loaded model, a local Hugging Face checkpoint
    folder, or ``"name@revision"`` of a revision already in the local Hugging Face cache (pretrained
    checkpoints, e.g. OLMo's ``step1000-tokens4B``; loaded one at a time, as a TransformerBridge where
    TransformerLens has no HookedTransformer). The same fresh prompts are used at every step; a text
    family is tokenized with the first checkpoint's tokenizer.
    """
    from tqdm.auto import tqdm

    from tvlens import tasks as _tasks
    from tvlens.accuracy import icl_accuracy
    from tvlens.models import model_info

    items = _checkpoint_items(checkpoints, steps)
    prompts = None
    rows_m, rows_td, rows_tdt, step_list, pp_m, pp_td = [], [], [], [], [], []
    for s, get in tqdm(items, desc="emergence", disable=not progress):
        model = get()
        if prompts is None:
            fam = _tasks.get(family) if isinstance(family, str) else family
            if fam is None:
                fam = model_info(model).task_family()
                if fam is None:
                    raise ConfigError("the checkpoints record no task family: pass family=")
            from tvlens.tasks.text import TextTaskFamily

            if isinstance(fam, TextTaskFamily):
                prompts = fam.sample(n_per_task, shots=shots, seed=seed, tokenizer=getattr(model, "tokenizer", None))
            else:
                prompts = fam.sample(n_per_task, shots=shots, seed=seed)
        acc = icl_accuracy(model, prompts)
        dec = task_decodability(model, prompts, k=k, ci=None)
        step_list.append(int(s))
        rows_m.append(torch.tensor([acc.per_task[t] for t in acc.task_names]))
        rows_td.append(dec.td)
        rows_tdt.append(dec.per_task)
        pp_m.append(acc.per_prompt.float())
        pp_td.append(dec.correct)
    assert prompts is not None
    per_task = torch.stack(rows_m)
    non_null = [j for j, t in enumerate(prompts.task_names) if t != "null"]
    return EmergenceResult(
        steps=step_list, task_names=list(prompts.task_names), metric=acc.metric, per_task_metric=per_task,
        mean_metric=per_task[:, non_null].mean(1), layers=dec.layers, td=torch.stack(rows_td),
        td_per_task=torch.stack(rows_tdt), k=k, n_per_task=n_per_task, per_prompt_metric=torch.stack(pp_m),
        td_correct=torch.stack(pp_td), labels=prompts.labels.cpu().clone(),
    )


def _checkpoint_items(checkpoints, steps) -> list:
    """``(step, load)`` per checkpoint: a run folder's (or a shipped name's) checkpoints, loaded one after the
    other into one model, or the given ``(step, model or folder)`` pairs."""
    from tvlens.models import list_checkpoints, load_checkpoint

    if steps is not None:
        from tvlens.checks import check_int_list

        steps = check_int_list(steps, "steps", minimum=0, where="emergence")
        dup = sorted({s for s in steps if steps.count(s) > 1})
        if dup:
            raise ConfigError(f"emergence: steps names {dup} more than once ({steps}); give each step once")
    if hasattr(checkpoints, "parameters") or hasattr(checkpoints, "cfg"):
        raise ConfigError("emergence: checkpoints must be a run folder or a shipped model name (e.g. 'default'), or a "
                          "list of (step, model) pairs; a single model has no training history: use "
                          "tvlens.task_decodability(model, prompts) for one model")
    if isinstance(checkpoints, (str, Path)):
        from tvlens.models import _resolve_folder

        pairs = list_checkpoints(_resolve_folder(checkpoints))
        if steps is not None:
            have = [s for s, _ in pairs]
            missing = [s for s in steps if s not in have]
            if missing:
                raise ConfigError(f"emergence: steps {missing} have no checkpoint in {checkpoints!s}; its checkpoints "
                                  f"are at steps {have}")
            pairs = [(s, p) for s, p in pairs if s in set(steps)]
        held: list = []  # one model for the whole run: each checkpoint's weights are loaded into it

        def load_next(p):
            held[:] = [load_checkpoint(p, into=held[0] if held else None)]
            return held[0]
        items = [(s, (lambda p=p: load_next(p))) for s, p in pairs]
    elif isinstance(checkpoints, (dict, bytes)) or not hasattr(checkpoints, "__iter__"):
        raise ConfigError(f"emergence: checkpoints must be a run folder, a shipped model name or a list of (step, model) "
                          f"pairs, got {type(checkpoints).__name__}")
    else:
        items = []
        for item in checkpoints:
            if not (isinstance(item, (tuple, list)) and len(item) == 2) or isinstance(item[0], bool) \
                    or not isinstance(item[0], (int, np.integer)):
                raise ConfigError(f"checkpoints: expected (step, model or folder) pairs with integer steps, got {item!r}")
            s, m = item
            items.append((s, (lambda m=m: _load_checkpoint_item(m))))
    if not items:
        raise ConfigError("emergence needs at least one checkpoint")
    got = [int(s) for s, _ in items]
    if len(set(got)) != len(got):
        raise ConfigError(f"emergence: checkpoints name steps {sorted({s for s in got if got.count(s) > 1})} more than "
                          "once; give each step once")
    return items


def _load_checkpoint_item(m):
    """A model from an ``emergence`` checkpoint item: a model, a local folder, or ``"name@revision"``."""
    if not isinstance(m, (str, Path)):
        return m
    from tvlens.models import load_model

    s = str(m)
    if "@" in s and not Path(s).exists():
        name, rev = s.rsplit("@", 1)
        return load_model(name, backend="bridge", revision=rev)
    return load_model(s)


def encoding_callback(config, n_per_task: int = 50, k: int = 10, seed: int = 424242):
    """A ``train(callback=...)`` that logs TD per layer at each evaluation (``tvlens train --track-encoding``)."""
    fam = config.build_family()
    prompts = fam.sample(n_per_task, shots=config.shots, seed=seed)

    def cb(step: int, model, record: dict) -> dict:
        res = task_decodability(model, prompts, k=k, ci=None)
        return {"td": [round(float(v), 4) for v in res.td], "td_best_layer": res.best_layer}

    return cb
