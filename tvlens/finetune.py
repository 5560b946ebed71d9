"""Finetuning chosen layers on a task family, and TD / ICL accuracy before and after.

Han et al. (2025, Table 1) finetune the first 10 or the last 10 of Llama-3.1-8B's 32 layers on a task
family: the first layers raise TD and accuracy far more (POS: TD 0.95 / 69.4% vs 0.68 / 33.9%).
:func:`finetune` does that on any tvlens model: only the chosen blocks train (embedding, unembedding,
final norm and the other blocks are frozen), in full or through LoRA-style low-rank updates
(``lora_rank``), merged into the weights at the end. The loop is ``tvlens.train``'s: loss on the
answer positions of every example and of the query (``answer_loss``), AdamW with weight decay on
matrices, linear warmup then cosine decay (``_lr_lambda``), gradient clipping, batches drawn from
``(seed, step)``.
"""

from __future__ import annotations

import copy
import functools
import html
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from tvlens import tasks as _tasks
from tvlens.accuracy import AccuracyResult
from tvlens.encoding import DecodabilityResult, extract, task_decodability
from tvlens.errors import ConfigError
from tvlens.llm import family_of, prompts_for, text_accuracy, text_tokenizer
from tvlens.tasks.text import SCORINGS, TextTaskFamily
from tvlens.train import TrainConfig, _lr_lambda, answer_loss, batch_for_step

EVAL_SEED = 2_000_003


def resolve_blocks(model, layers: Any) -> list[int]:
    """Block indices from ``layers``: indices (``[0, 1]``, ``range(2)``), ``"first_half"``,
    ``"last_half"``, ``"first:k"`` or ``"last:k"``."""
    from tvlens.backends import get_backend

    n = get_backend(model).n_layers
    if isinstance(layers, str):
        m = re.fullmatch(r"(first|last)(?:_half|:(\d+))", layers)
        if not m:
            raise ConfigError(
                "layers must be block indices or one of 'first_half', 'last_half', 'first:k', 'last:k'; "
                f"got {layers!r}"
            )
        k = n // 2 if m.group(2) is None else int(m.group(2))
        if not 1 <= k <= n:
            raise ConfigError(f"layers={layers!r}: k must be in 1..{n} (this model has {n} blocks), got {k}")
        return list(range(k)) if m.group(1) == "first" else list(range(n - k, n))
    if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        layers = [int(layers)]
    try:
        out = list(layers)
    except TypeError:
        raise ConfigError(f"layers must be block indices or 'first:k' / 'last:k', got {layers!r}") from None
    if not out:
        raise ConfigError("layers is empty: name at least one block to finetune")
    for b in out:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 0 <= b < n:
            raise ConfigError(f"layer {b!r} to finetune is out of range: this model has blocks 0..{n - 1}")
    if len(set(out)) != len(out):
        raise ConfigError(f"layers names a block twice: {out}")
    return sorted(int(b) for b in out)


# --------------------------------------------------------------------------- LoRA-style updates
class LowRankDelta(nn.Module):
    """``W + scale * (A @ B)`` for a weight read as ``[in, out]``; ``B`` starts at zero (LoRA).

    TransformerLens weights: ``W_Q/W_K/W_V`` ``[heads, d_model, d_head]`` (in = d_model),
    ``W_O`` ``[heads, d_head, d_model]`` (out = d_model), MLP ``[in, out]``.
    """

    def __init__(self, shape: torch.Size, name: str, rank: int, alpha: float, generator: torch.Generator,
                 device, dtype) -> None:
        super().__init__()
        self.shape, self.kind = tuple(shape), ("2d" if len(shape) == 2 else "out" if name.endswith("W_O") else "in")
        if self.kind == "2d":
            d_in, d_out = shape
        elif self.kind == "in":  # [h, d_model, d_head]
            d_in, d_out = shape[1], shape[0] * shape[2]
        else:  # [h, d_head, d_model]
            d_in, d_out = shape[0] * shape[1], shape[2]
        a = torch.randn(d_in, rank, generator=generator) / math.sqrt(d_in)
        self.A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(rank, d_out, device=device, dtype=dtype))
        self.scale = alpha / rank

    def delta(self) -> torch.Tensor:
        d = self.scale * (self.A @ self.B)  # [in, out]
        if self.kind == "2d":
            return d
        h = self.shape[0]
        if self.kind == "in":  # [d_model, h * d_head] -> [h, d_model, d_head]
            return d.reshape(self.shape[1], h, self.shape[2]).permute(1, 0, 2)
        return d.reshape(self.shape)  # [h * d_head, d_model] -> [h, d_head, d_model]

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W + self.delta()


def _lora_targets(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """A block's attention and MLP matrices: HookedTransformer's ``W_Q .. W_out``, or (a bridge block,
    Hugging Face modules) every 2-D ``weight`` outside its norms, each parameter once."""
    out, seen = [], set()
    split = hasattr(getattr(block, "attn", None), "q")  # a bridge computes q, k, v from split copies...
    for path, mod in block.named_modules():
        if split and any(part == "qkv" for part in path.split(".")):  # ...so its joint matrix is not used
            continue
        for name, p in list(mod.named_parameters(recurse=False)):
            hooked = re.fullmatch(r"_?W_(Q|K|V|O|in|out|gate)", name)
            hf = name == "weight" and "norm" not in type(mod).__name__.lower() and not isinstance(mod, nn.Embedding)
            if p.ndim >= 2 and (hooked or hf) and id(p) not in seen:
                seen.add(id(p))
                out.append((mod, name))
    return out


# --------------------------------------------------------------------------- result
@dataclass
class FinetuneResult:
    """TD and ICL accuracy before and after finetuning the chosen blocks."""

    family: str
    blocks: list[int]
    steps: int
    lr: float
    lora_rank: int | None
    n_trainable: int
    losses: list[float]
    acc_before: AccuracyResult
    acc_after: AccuracyResult
    td_before: DecodabilityResult
    td_after: DecodabilityResult
    model: Any = field(default=None, repr=False)
    notes: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "blocks": self.blocks,
            "lora_rank": self.lora_rank,
            "steps": self.steps,
            "n_trainable": self.n_trainable,
            "acc_before": self.acc_before.mean,
            "acc_after": self.acc_after.mean,
            "td_before": self.td_before.best_td,
            "td_after": self.td_after.best_td,
            "best_layer_before": self.td_before.best_layer,
            "best_layer_after": self.td_after.best_layer,
            "loss_first": float(np.mean(self.losses[: max(1, len(self.losses) // 10)])),
            "loss_last": float(np.mean(self.losses[-max(1, len(self.losses) // 10):])),
        }

    @property
    def td_gain(self) -> float:
        return self.td_after.best_td - self.td_before.best_td

    @property
    def acc_gain(self) -> float:
        return self.acc_after.mean - self.acc_before.mean

    def to_dataframe(self):
        """Long format: ``what`` (accuracy per task, TD per layer, best TD), before, after, change."""
        import pandas as pd

        rows = [{"what": "accuracy (mean, no null)", "before": self.acc_before.mean, "after": self.acc_after.mean}]
        rows += [{"what": f"accuracy[{t}]", "before": self.acc_before.per_task[t], "after": self.acc_after.per_task[t]}
                 for t in self.acc_before.task_names]
        rows.append({"what": "TD (best layer)", "before": self.td_before.best_td, "after": self.td_after.best_td})
        rows += [{"what": f"TD[layer {layer}]", "before": self.td_before.at(layer), "after": self.td_after.at(layer)}
                 for layer in self.td_before.layers]
        df = pd.DataFrame(rows)
        df["change"] = df["after"] - df["before"]
        return df

    def __repr__(self) -> str:
        s = self.summary()
        how = f"LoRA rank {self.lora_rank}" if self.lora_rank else "full"
        return (f"FinetuneResult({self.family}, blocks {self.blocks} ({how}, {self.steps} steps): "
                f"accuracy {s['acc_before']:.3f} -> {s['acc_after']:.3f}, TD {s['td_before']:.3f} -> "
                f"{s['td_after']:.3f})")

    def _repr_html_(self) -> str:
        from tvlens.plotting import figure_fragment, result_html

        return result_html(f"<div><b>{html.escape(repr(self))}</b>"
                           + self.to_dataframe().to_html(index=False, float_format=lambda v: f"{v:.3f}") + "</div>",
                           [figure_fragment(self.plot())])

    def plot(self):
        """TD and mean accuracy before and after, and the training loss: ``tvlens.views.finetune_figure``
        (which also takes several arms: ``finetune_figure({"first half": a, "last half": b})``)."""
        from tvlens.plotting import finetune_figure

        return finetune_figure(self)


# --------------------------------------------------------------------------- finetune
def _evaluate(model, prompts, k, scoring, batch_size):
    acc = text_accuracy(model, prompts, scoring=scoring, batch_size=batch_size)
    td = task_decodability(extract(model, prompts, batch_size=batch_size, progress=False), k=k)
    return acc, td


def _finetune(
    model,
    family: _tasks.TaskFamily | str,
    layers: Sequence[int] | str = "first_half",
    steps: int = 200,
    *,
    lr: float = 1e-3,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    batch_size: int = 32,
    shots: int = 4,
    warmup: int | None = None,
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
    n_eval_per_task: int = 50,
    k: int = 10,
    tokenizer: Any = None,
    scoring: str | None = None,
    seed: int = 0,
    inplace: bool = False,
    eval_batch_size: int | None = 64,
    progress: bool = True,
) -> FinetuneResult:
    """Finetune only ``layers`` (blocks) of ``model`` on ``family``; TD and accuracy before and after.

    ``layers``: block indices or ``"first_half"``, ``"last_half"``, ``"first:k"``, ``"last:k"``.
    ``lora_rank``: train ``W + (alpha / rank) A B`` (B starting at 0) on the blocks' attention and MLP
    matrices instead of the blocks' parameters, merged at the end. Evaluation: ``n_eval_per_task``
    held-out prompts per task (``shots``-shot, seeded apart from the training batches); accuracy by
    ``text_accuracy`` (``scoring`` for multi-token text answers), TD by leave-one-out ``k``-NN.
    With ``inplace=False`` (default) a copy is trained (``result.model``) and ``model`` is untouched;
    for a large model pass ``inplace=True`` to avoid holding two copies.
    """
    fam = family_of(family)
    blocks = resolve_blocks(model, layers)
    steps, batch_size, shots, k, n_eval_per_task, seed, lr, lora_rank, lora_alpha = _check_args(
        fam, steps, batch_size, shots, k, n_eval_per_task, seed, lr, lora_rank, lora_alpha)
    if scoring is not None and scoring not in SCORINGS:
        raise ConfigError(f"finetune: scoring must be one of {SCORINGS} (or None), got {scoring!r}")
    is_text = isinstance(fam, TextTaskFamily)
    tok = text_tokenizer(model, tokenizer) if is_text else None
    cfg = TrainConfig(family=fam.config(), shots=shots, steps=steps, batch_size=batch_size, lr=float(lr),
                      weight_decay=weight_decay, warmup=warmup if warmup is not None else min(100, steps // 10),
                      grad_clip=grad_clip, seed=seed)
    eval_set = prompts_for(model, fam, n_eval_per_task, shots, EVAL_SEED + seed, tokenizer=tok, scoring=scoring)
    if not is_text:
        batch_for_step(fam, cfg, 0)  # fails early if the family cannot be sampled for training
    from tvlens.backends import get_backend

    device = get_backend(model).input_device
    eval_set = eval_set.to(device)

    acc0, td0 = _evaluate(model, eval_set, k, scoring, eval_batch_size)
    ft = model if inplace else copy.deepcopy(model)
    was_grad = {n: p.requires_grad for n, p in ft.named_parameters()}
    for p in ft.parameters():
        p.requires_grad_(False)
    parametrized: list[tuple[nn.Module, str]] = []
    try:
        params = _trainable(ft, blocks, lora_rank, lora_alpha, seed, parametrized)
        n_trainable = sum(p.numel() for p in params)
        losses = _train_steps(ft, params, cfg, _batches(fam, cfg, tok if is_text else None, scoring), device,
                              f"finetune {fam.name} blocks {blocks}", progress, inplace)
    finally:
        for mod, name in parametrized:  # merge W + delta into the weights
            parametrize.remove_parametrizations(mod, name, leave_parametrized=True)
        for n, p in ft.named_parameters():
            p.requires_grad_(was_grad.get(n, True))
        ft.eval()
    bad = [n for n, p in ft.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:  # the last step's update (after a finite loss) can still overflow the weights
        _diverged(steps, losses, lr, inplace, f"; weights {bad[:3]} hold NaN or inf after the last update")
    acc1, td1 = _evaluate(ft, eval_set, k, scoring, eval_batch_size)
    return FinetuneResult(family=fam.name, blocks=blocks, steps=steps, lr=float(lr), lora_rank=lora_rank,
                          n_trainable=int(n_trainable), losses=losses, acc_before=acc0, acc_after=acc1,
                          td_before=td0, td_after=td1, model=ft,
                          notes={"shots": shots, "batch_size": batch_size, "seed": seed})


def _batches(fam, cfg: TrainConfig, tok, scoring):
    """``step -> training batch``: a text family sampled with ``tok`` (seeded per step), else ``batch_for_step``."""
    def batch_at(step: int):
        if tok is not None or isinstance(fam, TextTaskFamily):
            return fam.sample(max(1, math.ceil(cfg.batch_size / fam.n_tasks)), shots=cfg.shots,
                              seed=cfg.seed * 7_919_993 + step + 1, tokenizer=tok, scoring=scoring or "first_token")
        return batch_for_step(fam, cfg, step)
    return batch_at


def _trainable(ft, blocks: list[int], lora_rank, lora_alpha, seed: int, parametrized: list) -> list[torch.Tensor]:
    """The parameters to train: the blocks' own, or (LoRA) low-rank deltas registered on their attention and
    MLP matrices (each registration appended to ``parametrized``, to be merged afterwards)."""
    if lora_rank is None:
        params = [p for b in blocks for p in ft.blocks[b].parameters()]
        for p in params:
            p.requires_grad_(True)
        return params
    g = torch.Generator().manual_seed(seed)
    params = []
    for b in blocks:
        for mod, name in _lora_targets(ft.blocks[b]):
            w = getattr(mod, name)
            alpha = float(lora_rank) if lora_alpha is None else lora_alpha  # 0.0 is not "unset"
            delta = LowRankDelta(w.shape, name, lora_rank, alpha, g, w.device, w.dtype)
            parametrize.register_parametrization(mod, name, delta)
            parametrized.append((mod, name))
            params += [delta.A, delta.B]
    if not params:
        raise ConfigError(f"finetune: no attention or MLP matrices found in blocks {blocks} for LoRA")
    return params


def _train_steps(ft, params, cfg: TrainConfig, batch_at, device, desc: str, progress: bool, inplace: bool) -> list[float]:
    """``cfg.steps`` AdamW steps of the answer loss on ``batch_at(step)``; the losses (a non-finite one stops)."""
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    losses: list[float] = []
    ft.train()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress)
    for step in bar:
        loss = answer_loss(ft, batch_at(step).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            _diverged(step, losses, cfg.lr, inplace)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    return losses
def _check_args(fam, steps, batch_size, shots, k, n_eval_per_task, seed, lr, lora_rank, lora_alpha):
    """finetune's scalar arguments, checked before any work (numpy integers welcome; bools, strings refused)."""
    from tvlens.checks import check_float, check_int, check_seed

    w = "finetune"
    k = check_int(k, "k", minimum=1, where=w, hint="TD's nearest neighbours")
    steps = check_int(steps, "steps", minimum=1, where=w)
    batch_size = check_int(batch_size, "batch_size", minimum=1, where=w)
    n_eval_per_task = check_int(n_eval_per_task, "n_eval_per_task", minimum=k + 1, where=w,
                                hint=f"more than k={k} held-out prompts per task (TD's leave-one-out k-NN)")
    shots = check_int(shots, "shots", minimum=0, where=w)
    if shots > fam.max_shots():
        raise ConfigError(f"finetune: shots={shots} is more than family {fam.name!r} can fill (at most {fam.max_shots()})")
    seed = check_seed(seed, where=w)
    lr = check_float(lr, "lr", minimum=0, strict=True, where=w)
    if lora_rank is not None:
        lora_rank = check_int(lora_rank, "lora_rank", minimum=1, where=w, hint="None for full finetuning")
    if lora_alpha is not None:
        if lora_rank is None:
            raise ConfigError("finetune: lora_alpha has no effect without lora_rank (full finetuning scales nothing); "
                              "give lora_rank=, or leave lora_alpha out")
        lora_alpha = check_float(lora_alpha, "lora_alpha", minimum=0, strict=True, where=w)
    return steps, batch_size, shots, k, n_eval_per_task, seed, lr, lora_rank, lora_alpha


def _diverged(step: int, losses: list[float], lr: float, inplace: bool, extra: str = "") -> None:
    from tvlens.errors import TrainingError

    last = next((f"{v:.4g} at step {i}" for i, v in reversed(list(enumerate(losses))) if math.isfinite(v)), "none")
    raise TrainingError(
        f"finetune: the loss became {losses[-1] if losses else float('nan')} at step {step} (last finite loss: {last})"
        f"{extra}: training diverged; lower lr (now {lr:g}) or raise grad clipping. "
        + ("The model was trained in place and now holds diverged weights: reload it." if inplace
           else "The model you passed is unchanged."))


@functools.wraps(_finetune)
def finetune(*args: Any, **kwargs: Any) -> FinetuneResult:
    from tvlens.checks import check_call
    from tvlens.validate import unchecked

    check_call(_finetune, args, kwargs, where="finetune")  # a typo (lora_rnak=) is named, not a bare TypeError
    # finetuning a model on another family than it was trained on is the point: no family-agreement check
    with unchecked("family"):
        return _finetune(*args, **kwargs)


__all__ = ["FinetuneResult", "LowRankDelta", "finetune", "resolve_blocks"]
