"""Training small hooked transformers on a task family, with checkpoints for emergence studies.

- AdamW, linear warmup then cosine decay to 10% of the peak learning rate;
- loss only on answer positions (cross-entropy for token families, MSE for regression);
- every batch is drawn from ``(seed, step)``, so a resumed run sees the same data;
- evaluation every ``eval_every`` steps on a fixed held-out PromptSet, per-task metrics to
  ``log.jsonl``; a ``callback(step, model, record)`` can add entries to each record;
- model checkpoints (half precision) at log-spaced steps from 0 plus the last step;
- a resume state (float32 weights, optimizer, scheduler, RNG) at every evaluation and checkpoint:
  a run killed at any point continues from it and ends with the same weights as an
  uninterrupted run with the same seed.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from tvlens import tasks as _tasks
from tvlens.accuracy import icl_accuracy
from tvlens.errors import CheckpointError, ConfigError
from tvlens.io import atomic_write_bytes, load_tensors_with_sidecar, save_tensors_with_sidecar
from tvlens.models import build_model, save_checkpoint
from tvlens.prompts import PromptSet

EVAL_SEED = 1_000_003


@dataclass
class TrainConfig:
    family: dict[str, Any] = field(default_factory=lambda: {"name": "shift"})
    shots: int = 4
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float = 1.0
    n_layers: int = 4
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int | None = None
    seed: int = 0
    eval_every: int = 100
    eval_n_per_task: int = 64
    n_checkpoints: int = 12
    checkpoint_every: int | None = None  # extra checkpoints every N steps (to resolve a transition)
    # --- regression study (issue 14): optimizer and schedule knobs; defaults keep earlier runs' behaviour
    adam_betas: tuple[float, float] = (0.9, 0.98)  # the paper's sparse regression used (0.9, 0.9999)
    lr_schedule: str = "cosine"  # "cosine" (to 10% of the peak) or "constant" after the warmup

    def __post_init__(self) -> None:
        if isinstance(self.family, str):
            self.family = {"name": self.family}
        for name in ("steps", "batch_size", "eval_every", "eval_n_per_task", "n_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"TrainConfig.{name} must be an integer >= 1, got {v!r}")
        if self.checkpoint_every is not None and (not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 1):
            raise ConfigError(f"TrainConfig.checkpoint_every must be None or an integer >= 1, got {self.checkpoint_every!r}")
        if self.warmup < 0 or not self.lr > 0:
            raise ConfigError(f"TrainConfig: need warmup >= 0 and lr > 0, got warmup={self.warmup}, lr={self.lr}")
        self._check_regression_study_fields()

    def _check_regression_study_fields(self) -> None:
        betas = self.adam_betas
        if (not isinstance(betas, (list, tuple)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)):
            raise ConfigError(
                f"TrainConfig.adam_betas must be two numbers in [0, 1) (e.g. [0.9, 0.9999]), got {betas!r}"
            )
        self.adam_betas = (float(betas[0]), float(betas[1]))
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError(f"TrainConfig.lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")

    def build_family(self) -> _tasks.TaskFamily:
        return _tasks.from_config(self.family)


def checkpoint_steps(steps: int, n: int) -> list[int]:
    """Log-spaced checkpoint steps: 0, then ~n steps geometrically up to ``steps`` (included)."""
    if steps < 1:
        return [0]
    pts = np.unique(np.round(np.logspace(0, math.log10(steps), max(n - 1, 1))).astype(int))
    return sorted({0, *pts.tolist(), steps})


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / (cfg.warmup + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


def batch_for_step(family: _tasks.TaskFamily, cfg: TrainConfig, step: int) -> PromptSet:
    per_task = max(1, math.ceil(cfg.batch_size / family.n_tasks))
    return family.sample_train(per_task, shots=cfg.shots, seed=cfg.seed * 7_919_993 + step + 1)


def answer_loss(model, prompts: PromptSet) -> torch.Tensor:
    """Mean loss over the trained (answer) positions: cross-entropy, or MSE for regression."""
    out = model(prompts.model_input, return_type="logits")
    m = prompts.train_mask
    if prompts.is_continuous:
        return ((out[..., 0][m] - prompts.targets[m]) ** 2).mean()
    return torch.nn.functional.cross_entropy(out[m], prompts.targets[m])


def _save_resume(path: Path, model, opt, sched, step: int, cfg: TrainConfig) -> None:
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    opt_sd = opt.state_dict()
    for pid, st in opt_sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().clone().reshape(v.shape) if v.ndim else v.reshape(1)
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "kind": "tvlens-resume",
        "step": step,
        "config": asdict(cfg),
        "param_groups": opt_sd["param_groups"],
        "opt_scalar_shapes": {
            f"{pid}.{k}": list(v.shape) for pid, st in opt_sd["state"].items() for k, v in st.items() if torch.is_tensor(v)
        },
        "scheduler": sched.state_dict(),
    }
    save_tensors_with_sidecar(path, tensors, meta)


def _load_resume(path: Path, model, opt, sched) -> int:
    tensors, meta = load_tensors_with_sidecar(path, expect_kind="tvlens-resume")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, shape in meta["opt_scalar_shapes"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = tensors[f"opt.{key}"].reshape(shape)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"])


def _truncate_log(log_path: Path, step: int) -> None:
    if not log_path.exists():
        return
    keep = [ln for ln in log_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write_bytes(log_path, ("\n".join(keep) + ("\n" if keep else "")).encode())


def train(
    config: TrainConfig | None = None,
    out_dir: str | Path | None = None,
    *,
    resume: bool = True,
    progress: bool = True,
    callback: Callable[[int, Any, dict], dict | None] | None = None,
    stop_after: int | None = None,
    command: str | None = None,
    **overrides: Any,
):
    """Train a model on ``config.family``; returns ``(model, history)``.

    With ``out_dir``, writes ``log.jsonl``, ``step_XXXXXX.{safetensors,json}`` checkpoints and a
    ``resume.*`` state; with ``resume=True`` an existing resume state there is continued.
    ``stop_after`` ends the run early after that step (as a kill would), for tests and budgets.
    """
    cfg = config if config is not None else TrainConfig(**overrides)
    if config is not None and overrides:
        cfg = TrainConfig(**{**asdict(config), **overrides})
    family = cfg.build_family()
    torch.manual_seed(cfg.seed)
    model = build_model(
        family,
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        d_mlp=cfg.d_mlp,
        shots=cfg.shots,
        seed=cfg.seed,
    )
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.adam_betas,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    eval_set = family.sample(cfg.eval_n_per_task, shots=cfg.shots, seed=EVAL_SEED + cfg.seed)
    ckpt_steps = set(checkpoint_steps(cfg.steps, cfg.n_checkpoints))
    if cfg.checkpoint_every:
        ckpt_steps |= set(range(0, cfg.steps + 1, cfg.checkpoint_every))
    command = command or f"tvlens.train({cfg!r})"

    out = Path(out_dir) if out_dir is not None else None
    log_path = out / "log.jsonl" if out else None
    start = 0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        cfg_path = out / "train_config.json"
        resume_path = out / "resume"
        if resume and resume_path.with_suffix(".json").exists():
            saved = json.loads(cfg_path.read_text()) if cfg_path.exists() else None
            if saved is not None:  # runs written before adam_betas/lr_schedule existed used their defaults
                saved = {"adam_betas": [0.9, 0.98], "lr_schedule": "cosine", **saved}
            if saved is not None and saved != json.loads(json.dumps(asdict(cfg))):
                raise CheckpointError(
                    f"{out} holds a run with another configuration ({saved}); use a new out_dir or resume=False"
                )
            start = _load_resume(resume_path, model, opt, sched)
            _truncate_log(log_path, start)  # type: ignore[arg-type]
        else:
            for f in out.glob("step_*"):
                f.unlink()
            if log_path.exists():  # type: ignore[union-attr]
                log_path.unlink()  # type: ignore[union-attr]
            atomic_write_bytes(cfg_path, json.dumps(asdict(cfg), indent=1).encode())

    history: list[dict] = []

    def evaluate(step: int, loss: float | None) -> dict:
        acc = icl_accuracy(model, eval_set, batch_size=512)
        rec = {"step": step, "loss": loss, "lr": sched.get_last_lr()[0], "metric": acc.metric}
        rec["per_task"] = acc.per_task
        rec["mean"] = acc.mean
        if acc.baseline is not None:
            rec["least_squares_mse"] = float(acc.baseline.mean())
        if acc.basis_baseline is not None:
            rec["basis_aware_mse"] = float(acc.basis_baseline.mean())
        if callback is not None:
            extra = callback(step, model, rec)
            if extra:
                rec.update(extra)
        model.train()
        return rec

    def record(rec: dict) -> None:
        history.append(rec)
        if log_path is not None:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def checkpoint(step: int, rec: dict) -> None:
        if out is None:
            return
        metrics = {k: rec[k] for k in ("loss", "metric", "per_task", "mean") if k in rec}
        save_checkpoint(model, out / f"step_{step:06d}", step=step, metrics=metrics, family=cfg.family, command=command)

    if start == 0:
        rec = evaluate(0, None)
        record(rec)
        if 0 in ckpt_steps:
            checkpoint(0, rec)
        if out is not None:
            _save_resume(out / "resume", model, opt, sched, 0, cfg)

    bar = tqdm(range(start, cfg.steps), desc=f"train {family.name}", disable=not progress, initial=start, total=cfg.steps)
    t0 = time.perf_counter()
    running = None
    for step in bar:
        batch = batch_for_step(family, cfg, step)
        loss = answer_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        done = step + 1
        lv = float(loss.detach())
        running = lv if running is None else 0.95 * running + 0.05 * lv
        is_eval = done % cfg.eval_every == 0 or done == cfg.steps
        if is_eval or done in ckpt_steps:
            rec = evaluate(done, lv)
            rec["train_seconds"] = time.perf_counter() - t0
            if is_eval:
                record(rec)
                bar.set_postfix(loss=f"{running:.4f}", **{rec["metric"]: f"{rec['mean']:.3f}"})
            if done in ckpt_steps:
                checkpoint(done, rec)
            if out is not None:
                _save_resume(out / "resume", model, opt, sched, done, cfg)
        if stop_after is not None and done >= stop_after:
            break
    bar.close()
    model.eval()
    from tvlens.models import ModelInfo

    model.tvlens_info = ModelInfo(
        source=str(out) if out else "train",
        family=cfg.family,
        step=done if cfg.steps > start else start,
        metrics=history[-1] if history else None,
        command=command,
        continuous=family.continuous,
    )
    return model, history


def read_log(out_dir: str | Path) -> list[dict]:
    p = Path(out_dir) / "log.jsonl"
    if not p.exists():
        raise CheckpointError(f"no training log at {p}")
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
