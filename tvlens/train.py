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
import re
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from tvlens import tasks as _tasks
from tvlens.accuracy import icl_accuracy
from tvlens.backends import get_backend
from tvlens.checks import (
    check_batch_size,
    check_float,
    check_int,
    check_memory,
    check_optional_int,
    check_out_path,
    check_seed,
    check_writable_parent,
    transformer_batch_bytes,
)
from tvlens.errors import CheckpointError, ConfigError, OverwriteError, TrainingError
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
    lr_schedule: str = "cosine"  # "cosine" or "linear" (to 10% of the peak), or "constant" after the warmup
    # --- curriculum (issue 18, Garg et al. 2022): {"dims": {"start", "inc", "every"}, "shots": {...}}; each
    # value grows by inc every `every` steps up to the target (the family's D, `shots`); see curriculum_at
    curriculum: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        w = "TrainConfig"
        if isinstance(self.family, str):
            self.family = {"name": self.family}
        if not isinstance(self.family, dict) or not isinstance(self.family.get("name"), str):
            raise ConfigError(
                f"TrainConfig.family must be a family name or a dict with a 'name' (e.g. {{'name': 'codes'}}), "
                f"got {self.family!r}"
            )
        self.batch_size = check_batch_size(self.batch_size, where=w, allow_none=False)
        for name, lo in (("steps", 1), ("eval_every", 1), ("eval_n_per_task", 1),
                         ("n_checkpoints", 1), ("shots", 0), ("warmup", 0), ("n_layers", 1), ("d_model", 1),
                         ("n_heads", 1)):
            setattr(self, name, check_int(getattr(self, name), name, minimum=lo, where=w))
        self.d_mlp = check_optional_int(self.d_mlp, "d_mlp", minimum=1, where=w)
        self.checkpoint_every = check_optional_int(self.checkpoint_every, "checkpoint_every", minimum=1, where=w)
        self.seed = check_seed(self.seed, where=w)
        self.lr = check_float(self.lr, "lr", minimum=0.0, strict=True, where=w)
        self.weight_decay = check_float(self.weight_decay, "weight_decay", minimum=0.0, where=w)
        self.grad_clip = check_float(self.grad_clip, "grad_clip", minimum=0.0, where=w, allow_none=True)
        if self.d_model % self.n_heads:
            raise ConfigError(f"TrainConfig: n_heads={self.n_heads} must divide d_model={self.d_model}")
        self._check_regression_study_fields()
        family = self.build_family()  # an unknown family or parameter is refused here, before any work
        self.curriculum = _check_curriculum(self.curriculum, family, self.shots)

    @classmethod
    def from_dict(cls, d: Any, where: str = "TrainConfig") -> "TrainConfig":
        """A TrainConfig from a dict (a JSON config file); unknown keys are an error listing the known ones."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where} must be a JSON object of TrainConfig fields, got a {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"{where}: unknown TrainConfig field(s) {unknown}; known: {known}")
        return cls(**d)

    def _check_regression_study_fields(self) -> None:
        betas = self.adam_betas
        if (not isinstance(betas, (list, tuple)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)):
            raise ConfigError(
                f"TrainConfig.adam_betas must be two numbers in [0, 1) (e.g. [0.9, 0.9999]), got {betas!r}"
            )
        self.adam_betas = (float(betas[0]), float(betas[1]))
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"TrainConfig.lr_schedule must be 'cosine', 'linear' or 'constant', got {self.lr_schedule!r}")

    def build_family(self) -> _tasks.TaskFamily:
        return _tasks.from_config(self.family)


_CURRICULUM_KEYS = ("start", "inc", "every")


def _check_curriculum(cur: Any, family: _tasks.TaskFamily, shots: int) -> dict[str, Any] | None:
    """The curriculum in canonical form (plain ints), or a ConfigError naming the field at fault."""
    if cur is None:
        return None
    eg = '{"dims": {"start": 8, "inc": 2, "every": 1000}, "shots": {"start": 9, "inc": 2, "every": 1000}}'
    if not isinstance(cur, dict) or not cur or set(cur) - {"dims", "shots"}:
        raise ConfigError(f"TrainConfig.curriculum must be a dict with 'dims' and/or 'shots' schedules (e.g. {eg}), "
                          f"got {cur!r}")
    out: dict[str, Any] = {}
    for what in ("dims", "shots"):
        if what not in cur:
            continue
        sch = cur[what]
        if not isinstance(sch, dict) or set(sch) != set(_CURRICULUM_KEYS):
            raise ConfigError(f"TrainConfig.curriculum[{what!r}] must be a dict with exactly the keys "
                              f"{list(_CURRICULUM_KEYS)} (e.g. {eg}), got {sch!r}")
        where = f"TrainConfig.curriculum[{what!r}]"
        vals = {k: check_int(sch[k], k, minimum=1 if k != "start" or what == "dims" else 0, where=where)
                for k in _CURRICULUM_KEYS}
        if what == "dims":
            target = getattr(family, "D", None)
            if family.name != "sparse_regression" or target is None:
                raise ConfigError(f"{where}: a dimension schedule needs the sparse_regression family "
                                  f"(its input dimension D), not {family.name!r}; drop 'dims' or change the family")
        else:
            target = shots
        if vals["start"] > target:
            raise ConfigError(f"{where}: start={vals['start']} is above the target {what} {target} "
                              f"({'the family D' if what == 'dims' else 'TrainConfig.shots'}); give start <= {target}")
        out[what] = vals
    return out


def curriculum_at(cfg: TrainConfig, step: int) -> dict[str, int]:
    """The curriculum's state at ``step`` (a pure function of the step, so a resumed run sees the same):
    ``{"shots": ..., "dims": ...}`` (``dims`` only for a dimension schedule). Without a curriculum, the target."""
    cur = cfg.curriculum or {}
    state = {"shots": cfg.shots}
    targets = {"shots": cfg.shots, "dims": getattr(cfg.build_family(), "D", None) if "dims" in cur else None}
    for what, sch in cur.items():
        state[what] = min(int(targets[what]), sch["start"] + sch["inc"] * (step // sch["every"]))
    return state


def checkpoint_steps(steps: int, n: int) -> list[int]:
    """Log-spaced checkpoint steps: 0, then ~n steps geometrically up to ``steps`` (included)."""
    if steps < 1:
        return [0]
    pts = np.unique(np.round(np.logspace(0, math.log10(steps), min(max(n - 1, 1), steps))).astype(int))
    return sorted({0, *pts.tolist(), steps})


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / (cfg.warmup + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
        if cfg.lr_schedule == "linear":
            return 1.0 - 0.9 * min(t, 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


def batch_for_step(family: _tasks.TaskFamily, cfg: TrainConfig, step: int) -> PromptSet:
    """The training batch of ``step`` (drawn from ``(seed, step)``; under a curriculum, at its state then)."""
    per_task = max(1, math.ceil(cfg.batch_size / family.n_tasks))
    if not cfg.curriculum:
        return family.sample_train(per_task, shots=cfg.shots, seed=cfg.seed * 7_919_993 + step + 1)
    state = curriculum_at(cfg, step)
    batch = family.sample_train(per_task, shots=state["shots"], seed=cfg.seed * 7_919_993 + step + 1)
    if "dims" in state:
        from tvlens.tasks.sparse_regression import restrict_dims

        batch = restrict_dims(batch, state["dims"])
    return batch


def answer_loss(model, prompts: PromptSet) -> torch.Tensor:
    """Mean loss over the trained (answer) positions: cross-entropy, or MSE for regression."""
    out = get_backend(model).logits(prompts.model_input)
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
    # the run's own resume state: .safetensors (every field in its header, one atomic rename) is the state; the
    # .json written after it is a mirror (see _read_resume), so a kill at any moment leaves a loadable state
    save_tensors_with_sidecar(path, tensors, meta, overwrite=True)


def _read_resume(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The resume state, from ``resume.safetensors`` alone: its header records every field of the state and a hash
    of its tensors, written in one atomic rename. ``resume.json`` is a readable mirror written after it, so a kill
    between the two writes leaves a new ``.safetensors`` beside an old ``.json``: the mirror is then ignored (and
    rewritten at the next save), never a reason to refuse the run. A state written by an older tvlens (no fields
    in its header) is read with its sidecar."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from tvlens.io import content_sha256

    st = path.with_suffix(".safetensors")
    if not st.is_file():
        raise CheckpointError(f"train: {path.parent} has {path.name}.json but no {st.name}: the resume state is "
                              "incomplete; restart the run (--restart / overwrite=True)")
    try:
        with safe_open(str(st), "pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(st))
    except Exception as e:
        raise CheckpointError(f"{st} cannot be read: it is truncated or not a safetensors file ({e}); restart the run "
                              "(--restart / overwrite=True)") from e
    if "tvlens.meta" not in header:
        return load_tensors_with_sidecar(path, expect_kind="tvlens-resume")
    if content_sha256(tensors) != header.get("tvlens.content_sha256"):
        raise CheckpointError(f"{st}: its tensors do not match the hash its header records; the file was altered")
    meta = json.loads(header["tvlens.meta"])
    if not isinstance(meta, dict) or meta.get("kind") != "tvlens-resume":
        raise CheckpointError(f"{st} is not a tvlens resume state (kind {meta.get('kind') if isinstance(meta, dict) else meta!r})")
    return tensors, meta


def _has_resume(out: Path) -> bool:
    return (out / "resume.safetensors").exists() or (out / "resume.json").exists()


def _killed_before_training(out: Path, entries: list[Path], cfg_now: dict) -> bool:
    """A run folder of this configuration holding only tvlens' own files and no resume state: a run killed
    before its step-0 resume state was written (which precedes the first training step)."""
    if _has_resume(out) or not all(f.is_file() and RUN_FILE_RE.match(f.name) for f in entries):
        return False
    try:
        saved = json.loads((out / "train_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {**_field_defaults(), **saved} == {**_field_defaults(), **cfg_now}


def _load_resume(path: Path, model, opt, sched) -> int:
    tensors, meta = _read_resume(path)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, shape in meta["opt_scalar_shapes"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = tensors[f"opt.{key}"].reshape(shape)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"])


# The files a tvlens run writes in its folder; ``overwrite=True`` removes these names and nothing else.
RUN_FILE_RE = re.compile(
    r"^(step_\d{6,}\.(safetensors|json)|log\.jsonl|train_config\.json|resume\.(safetensors|json))$"
    r"|^\.(step_\d{6,}\.(safetensors|json)|log\.jsonl|train_config\.json|resume\.(safetensors|json))\..*\.tmp$"
)


def run_files(out: Path) -> list[Path]:
    """tvlens' own files in a run folder (checkpoints, log, config, resume state, temp files of a killed write)."""
    return sorted(f for f in out.iterdir() if f.is_file() and RUN_FILE_RE.match(f.name))


def _read_log_lines(log_path: Path, upto: int | None = None) -> list[str]:
    """The log's records (as JSON lines) up to step ``upto``; a line cut by a kill is dropped."""
    if not log_path.exists():
        return []
    keep = []
    for ln in log_path.read_text().splitlines():
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and (upto is None or rec.get("step", 0) <= upto):
            keep.append(ln)
    return keep


def _field_defaults() -> dict[str, Any]:
    out = {}
    for f in fields(TrainConfig):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return json.loads(json.dumps(out))


def estimate_train_memory(cfg: TrainConfig, family: _tasks.TaskFamily) -> tuple[float, float, int]:
    """Estimated peak bytes of one training step and of one evaluation batch, and the sequence length."""
    seq = family.seq_len(cfg.shots)
    per_task = max(1, math.ceil(cfg.batch_size / family.n_tasks))
    batch = per_task * family.n_tasks
    d_mlp = cfg.d_mlp if cfg.d_mlp is not None else 4 * cfg.d_model
    d_out = 1 if family.continuous else family.d_vocab
    d_in = family.d_in if family.continuous else family.d_vocab
    shape = dict(n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_mlp=d_mlp, d_vocab_out=d_out)
    n_params = cfg.n_layers * (4 * cfg.d_model**2 + 2 * cfg.d_model * d_mlp) + cfg.d_model * (d_in + d_out + seq)
    train_b = transformer_batch_bytes(batch, seq, backward=True, **shape) + 16 * n_params
    eval_b = transformer_batch_bytes(min(512, cfg.eval_n_per_task * family.n_tasks), seq, backward=False, **shape)
    return train_b, eval_b, seq


def train(
    config: TrainConfig | None = None,
    out_dir: str | Path | None = None,
    *,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    callback: Callable[[int, Any, dict], dict | None] | None = None,
    stop_after: int | None = None,
    command: str | None = None,
    _cli: bool = False,
    **overrides: Any,
):
    """Train a model on ``config.family``; returns ``(model, history)``.

    With ``out_dir``, writes ``log.jsonl``, ``step_XXXXXX.{safetensors,json}`` checkpoints and a
    ``resume.*`` state (all atomically). An ``out_dir`` holding a resume state of the same
    configuration is continued (``resume=True``); a larger ``steps`` extends a finished or interrupted
    run from where it stopped (the learning-rate schedule then follows the new ``steps``). A folder
    that holds anything else is refused unless ``overwrite=True`` (CLI: ``--restart``), which starts
    afresh and removes only tvlens' own file names there (``step_*``, ``log.jsonl``,
    ``train_config.json``, ``resume.*``): other files are never touched.
    ``stop_after`` ends the run early after that step (as a kill would), for tests and budgets.
    """
    flag = _namer(_cli)
    cfg = _config_of(config, overrides)
    if stop_after is not None:
        stop_after = check_int(stop_after, "stop_after", minimum=1, where="train")
    if callback is not None and not callable(callback):
        raise ConfigError(f"train: callback must be callable(step, model, record), got {type(callback).__name__}")
    out = _check_out_dir(out_dir, flag)
    family = cfg.build_family()
    _check_train_memory(cfg, family, flag)
    torch.manual_seed(cfg.seed)
    model = build_model(family, n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_mlp=cfg.d_mlp,
                        shots=cfg.shots, seed=cfg.seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.adam_betas,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    run = _Run(cfg, model, sched, family.sample(cfg.eval_n_per_task, shots=cfg.shots, seed=EVAL_SEED + cfg.seed),
               out, callback, command or f"tvlens.train({cfg!r})")
    start = 0
    if out is not None:
        start = _open_run(run, opt, resume, overwrite, flag)
    if start == 0:
        rec = run.evaluate(0, None)
        run.record(rec)
        if 0 in run.ckpt_steps:
            run.checkpoint(0, rec)
        if out is not None:
            _save_resume(out / "resume", model, opt, sched, 0, cfg)
    done = _train_loop(run, opt, family, start, stop_after, progress, flag)
    model.eval()
    from tvlens.models import ModelInfo

    model.tvlens_info = ModelInfo(
        source=str(out) if out else "train",
        family=cfg.family,
        step=done if cfg.steps > start else start,
        metrics=run.history[-1] if run.history else None,
        command=run.command,
        continuous=family.continuous,
    )
    return model, run.history


def _namer(cli: bool) -> Callable[[str, str], str]:
    """How an error names an option: its API argument, or (from the CLI) its flag."""
    return lambda api, flag: flag if cli else api


def _config_of(config: TrainConfig | None, overrides: dict[str, Any]) -> TrainConfig:
    """``config`` with the keyword ``overrides`` applied (a TrainConfig of the keywords alone without one)."""
    if config is not None and not isinstance(config, TrainConfig):
        raise ConfigError(f"train: config must be a TrainConfig (or None, with fields as keywords), got {type(config).__name__}")
    known = [f.name for f in fields(TrainConfig)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(f"train: unknown argument(s) {unknown}; TrainConfig fields: {known}")
    cfg = config if config is not None else TrainConfig(**overrides)
    if config is not None and overrides:
        cfg = TrainConfig(**{**asdict(config), **overrides})
    return cfg


def _check_out_dir(out_dir, flag) -> Path | None:
    """The run folder: a writable folder of the user's (never a file, never tvlens' shipped checkpoints)."""
    if out_dir is None:
        return None
    out = check_out_path(out_dir, flag("out_dir", "--out"), where="train")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train: {flag('out_dir', '--out')} {str(out)!r} is a file, not a folder; give a folder for the run")
    check_writable_parent(out / "log.jsonl", flag("out_dir", "--out"), where="train")
    from tvlens.models import CHECKPOINT_DIR

    if out.resolve() == CHECKPOINT_DIR.resolve() or CHECKPOINT_DIR.resolve() in out.resolve().parents:
        raise ConfigError(f"train: {flag('out_dir', '--out')} {str(out)!r} is inside tvlens' shipped checkpoints "
                          f"({CHECKPOINT_DIR}); train into a folder of your own")
    return out


def _check_train_memory(cfg: TrainConfig, family, flag) -> None:
    train_b, eval_b, seq = estimate_train_memory(cfg, family)
    check_memory(train_b, f"training (batches of {cfg.batch_size} prompts of {seq} tokens, {cfg.n_layers} layers)",
                 f"{flag('shots', '--shots')} (now {cfg.shots}), {flag('batch_size', '--batch-size')} (now {cfg.batch_size}), "
                 f"or the model size", where="train")
    check_memory(eval_b, f"evaluation ({cfg.eval_n_per_task} prompts per task of {seq} tokens)",
                 f"{flag('eval_n_per_task', '--eval-n-per-task')} or {flag('shots', '--shots')}", where="train")


class _Run:
    """One training run's evaluation, history, log file and checkpoints."""

    def __init__(self, cfg: TrainConfig, model, sched, eval_set, out: Path | None, callback, command: str):
        self.cfg, self.model, self.sched, self.eval_set, self.out = cfg, model, sched, eval_set, out
        self.callback, self.command = callback, command
        self.history: list[dict] = []
        self.log_path = out / "log.jsonl" if out else None
        self.log_lines: list[str] = []
        self.ckpt_steps = set(checkpoint_steps(cfg.steps, cfg.n_checkpoints))
        if cfg.checkpoint_every:
            self.ckpt_steps |= set(range(0, cfg.steps + 1, cfg.checkpoint_every))

    def evaluate(self, step: int, loss: float | None) -> dict:
        acc = icl_accuracy(self.model, self.eval_set, batch_size=512)
        rec = {"step": step, "loss": loss, "lr": self.sched.get_last_lr()[0], "metric": acc.metric}
        rec["per_task"] = acc.per_task
        rec["mean"] = acc.mean
        if acc.baseline is not None:
            rec["least_squares_mse"] = float(acc.baseline.mean())
        if acc.basis_baseline is not None:
            rec["basis_aware_mse"] = float(acc.basis_baseline.mean())
        if self.cfg.curriculum:  # the state the step's training batches had (evaluation is on the target task)
            rec["curriculum"] = curriculum_at(self.cfg, max(step - 1, 0))
        if self.callback is not None:
            extra = self.callback(step, self.model, rec)
            if extra:
                rec.update(extra)
        self.model.train()
        return rec

    def record(self, rec: dict) -> None:
        self.history.append(rec)
        if self.log_path is not None:  # rewritten whole and atomically: a kill never leaves half a line
            self.log_lines.append(json.dumps(rec))
            atomic_write_bytes(self.log_path, ("\n".join(self.log_lines) + "\n").encode())

    def checkpoint(self, step: int, rec: dict) -> None:
        if self.out is None:
            return
        metrics = {k: rec[k] for k in ("loss", "metric", "per_task", "mean", "curriculum") if k in rec}
        save_checkpoint(self.model, self.out / f"step_{step:06d}", step=step, metrics=metrics, family=self.cfg.family,
                        command=self.command, overwrite=True)  # this run's own file (a resumed run rewrites the same step)


def _open_run(run: _Run, opt, resume: bool, overwrite: bool, flag) -> int:
    """Continue the run in ``run.out`` (its step), or start one there (0), refusing a folder it must not touch."""
    out, cfg = run.out, run.cfg
    cfg_path = out / "train_config.json"
    resume_path = out / "resume"
    cfg_now = json.loads(json.dumps(asdict(cfg)))
    if resume and _has_resume(out) and not overwrite:
        saved = _saved_config(out, cfg_path, cfg_now, flag)
        start = _load_resume(resume_path, run.model, opt, run.sched)
        if start > cfg.steps:
            raise CheckpointError(
                f"train: {out} is already trained to step {start}, beyond {flag('steps', '--steps')}={cfg.steps}; "
                f"give {flag('steps', '--steps')} >= {start} to extend it, or load its checkpoints with tvlens.load_model"
            )
        run.log_lines = _read_log_lines(run.log_path, start)  # type: ignore[arg-type]
        atomic_write_bytes(run.log_path, ("\n".join(run.log_lines) + ("\n" if run.log_lines else "")).encode())  # type: ignore[arg-type]
        if saved.get("steps") != cfg.steps:
            atomic_write_bytes(cfg_path, json.dumps(cfg_now, indent=1).encode())
        return start
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries and not overwrite and resume and _killed_before_training(out, entries, cfg_now):
        overwrite = True  # killed before its first resume state: nothing was trained, start it again
    if entries and not overwrite:
        ours = [f for f in entries if f.is_file() and RUN_FILE_RE.match(f.name)]
        shown = ", ".join(f.name for f in entries[:4]) + (", ..." if len(entries) > 4 else "")
        what = ("a tvlens run without a resume state" if ours and not _has_resume(out)
                else "a tvlens run" if ours else "files that are not a tvlens run")
        out_name = flag("out_dir", "--out")
        raise OverwriteError(
            f"train: {out_name} {str(out)!r} already holds {len(entries)} entries ({shown}): {what}. "
            f"tvlens does not overwrite a folder it did not write in this run: choose a new or empty "
            f"{out_name}, or pass {flag('overwrite=True', '--restart')} to replace tvlens' own files there "
            "(step_*, log.jsonl, train_config.json, resume.*; any other file is kept)"
        )
    if overwrite:
        for f in run_files(out):
            f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cfg_path, json.dumps(cfg_now, indent=1).encode())
    return 0


def _saved_config(out: Path, cfg_path: Path, cfg_now: dict, flag) -> dict:
    """The configuration of the run in ``out``; refused unless it differs from ``cfg_now`` in ``steps`` only."""
    out_name = flag("out_dir", "--out")
    try:
        saved = json.loads(cfg_path.read_text()) if cfg_path.exists() else None
    except json.JSONDecodeError:
        saved = "unreadable"
    if not isinstance(saved, dict):
        raise CheckpointError(
            f"train: {out} holds a resume state but its train_config.json is missing or unreadable; "
            f"use a new {out_name}, or {flag('overwrite=True', '--restart')} to start afresh there"
        )
    saved = {**_field_defaults(), **saved}  # a run written before a field existed has its default
    diff = sorted(k for k in set(saved) | set(cfg_now) if k != "steps" and saved.get(k) != cfg_now.get(k))
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} there, {cfg_now.get(k)!r} now" for k in diff[:5])
        raise CheckpointError(
            f"train: {out} holds a run with another configuration ({shown}); only "
            f"{flag('steps', '--steps')} may change to extend it. Use a new {out_name}, or "
            f"{flag('overwrite=True', '--restart')} to replace that run's files (other files are kept)"
        )
    return saved


def _train_loop(run: _Run, opt, family, start: int, stop_after: int | None, progress: bool, flag) -> int:
    """Steps ``start..cfg.steps`` (or up to ``stop_after``), evaluating, logging, checkpointing and saving the
    resume state as configured; the last step done."""
    cfg, model, out = run.cfg, run.model, run.out
    bar = tqdm(range(start, cfg.steps), desc=f"train {family.name}", disable=not progress, initial=start, total=cfg.steps)
    t0 = time.perf_counter()
    running = None
    done = start
    for step in bar:
        lv = _optimizer_step(model, opt, run.sched, batch_for_step(family, cfg, step), cfg, step, flag, out)
        done = step + 1
        running = lv if running is None else 0.95 * running + 0.05 * lv
        is_eval = done % cfg.eval_every == 0 or done == cfg.steps
        if is_eval or done in run.ckpt_steps:
            rec = run.evaluate(done, lv)
            rec["train_seconds"] = time.perf_counter() - t0
            if is_eval:
                run.record(rec)
                bar.set_postfix(loss=f"{running:.4f}", **{rec["metric"]: f"{rec['mean']:.3f}"})
            if done in run.ckpt_steps:
                run.checkpoint(done, rec)
            if out is not None:
                _save_resume(out / "resume", model, opt, run.sched, done, cfg)
        if stop_after is not None and done >= stop_after:
            break
    bar.close()
    return done


def _optimizer_step(model, opt, sched, batch, cfg: TrainConfig, step: int, flag, out) -> float:
    """One AdamW step on ``batch``'s answer loss; a non-finite loss or gradient norm stops the run, unsaved."""
    loss = answer_loss(model, batch)
    opt.zero_grad(set_to_none=True)
    lv = float(loss.detach())
    if not math.isfinite(lv):
        raise TrainingError(
            f"train: the loss is {lv} at step {step}; nothing of this step was saved (the last good state is "
            f"in {out or 'memory'}). Lower {flag('lr', '--lr')} (now {cfg.lr}) or set {flag('grad_clip', '--grad-clip')}"
        )
    loss.backward()
    if cfg.grad_clip:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if not torch.isfinite(norm):
            raise TrainingError(f"train: the gradient norm is {float(norm)} at step {step}; nothing of this step "
                                f"was saved. Lower {flag('lr', '--lr')} (now {cfg.lr})")
    opt.step()
    sched.step()
    return lv


def read_log(out_dir: str | Path) -> list[dict]:
    p = Path(out_dir) / "log.jsonl"
    if not p.exists():
        raise CheckpointError(f"no training log at {p}")
    return [json.loads(ln) for ln in _read_log_lines(p)]
