"""Copy a training run's stage into the repository: what continuing it exactly needs, and a few checkpoints.

A stage folder holds ``resume.safetensors`` + ``resume.json`` (float32 weights, AdamW moments and step
counts, the torch RNG state, the scheduler and the step), ``train_config.json``, ``log.jsonl`` and the
checkpoints named by ``--checkpoints`` (default: step 0 and the latest). ``tvlens train --config
<stage>/train_config.json --out COPY`` on a copy of it continues to the same weights as an uninterrupted
run (``tests/test_train_curriculum.py``). Restore: ``python stage.py --restore STAGE NEW_RUN_DIR``.

Run: ``PYTHONPATH=. python benchmarks/regression/stage.py RUN_DIR benchmarks/regression/runs/NAME``
Files already in the destination are replaced only if they are tvlens run files (``--replace``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from tvlens.models import list_checkpoints
from tvlens.train import RUN_FILE_RE

BASE = ("resume.safetensors", "resume.json", "train_config.json", "log.jsonl")


def checkpoint_from_resume(run: Path, dest: Path) -> list[Path]:
    """A half-precision checkpoint of the resume state's weights, at its step (what the run itself would have
    written there), into ``dest``, so that a stage ended between checkpoints can be evaluated at its end."""
    from tvlens.io import load_tensors_with_sidecar
    from tvlens.models import build_model, save_checkpoint
    from tvlens.train import TrainConfig, read_log

    cfg = TrainConfig.from_dict(json.loads((run / "train_config.json").read_text()))
    tensors, meta = load_tensors_with_sidecar(run / "resume", expect_kind="tvlens-resume")
    step = int(meta["step"])
    model = build_model(cfg.build_family(), n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads,
                        d_mlp=cfg.d_mlp, shots=cfg.shots, seed=cfg.seed)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    rec = next((r for r in read_log(run) if r["step"] == step), {})
    metrics = {k: rec[k] for k in ("loss", "metric", "per_task", "mean", "curriculum") if k in rec}
    path = save_checkpoint(model, dest / f"step_{step:06d}", step=step, metrics=metrics, family=cfg.family,
                           command=f"benchmarks/regression/stage.py: the resume state of {run} at step {step}")
    return [path.with_suffix(".safetensors"), path.with_suffix(".json")]


def copy_stage(run: Path, dest: Path, steps: list[int] | None, replace: bool) -> list[Path]:
    if not (run / "resume.json").exists():
        sys.exit(f"stage: {run} holds no resume state (resume.json); nothing to carry")
    have = [s for s, _ in list_checkpoints(run)]
    state_step = json.loads((run / "resume.json").read_text())["step"]
    if steps is None:
        steps = sorted({0, max(s for s in have if s <= state_step)})
    missing = sorted(set(steps) - set(have))
    if missing:
        sys.exit(f"stage: {run} has no checkpoint at step(s) {missing}; it has {have}")
    names = list(BASE) + [f"step_{s:06d}.{ext}" for s in steps for ext in ("safetensors", "json")]
    dest.mkdir(parents=True, exist_ok=True)
    clash = [n for n in names if (dest / n).exists()]
    if clash and not replace:
        sys.exit(f"stage: {dest} already holds {clash}; pass --replace to replace these tvlens run files")
    if replace:
        foreign = [n for n in clash if not RUN_FILE_RE.match(n)]
        assert not foreign, foreign
        for f in dest.iterdir():  # an earlier stage's checkpoints and resume state are superseded
            if f.is_file() and RUN_FILE_RE.match(f.name) and f.name not in names:
                f.unlink()
    out = []
    for n in names:
        shutil.copy2(run / n, dest / n)
        out.append(dest / n)
    if state_step not in have:
        out += checkpoint_from_resume(run, dest)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dest")
    ap.add_argument("--checkpoints", type=int, nargs="*", default=None, help="steps to copy (default: 0 and the latest)")
    ap.add_argument("--replace", action="store_true")
    ap.add_argument("--restore", action="store_true", help="copy a committed stage to a NEW run folder to continue it")
    args = ap.parse_args()
    src, dest = Path(args.src), Path(args.dest)
    if args.restore:
        if dest.exists() and any(dest.iterdir()):
            sys.exit(f"stage --restore: {dest} is not empty; give a new folder")
        shutil.copytree(src, dest, dirs_exist_ok=True, ignore=lambda d, ns: [n for n in ns if not RUN_FILE_RE.match(n)])
        print(f"restored {src} -> {dest}: {sorted(p.name for p in dest.iterdir())}")
        return
    files = copy_stage(src, dest, args.checkpoints, args.replace)
    state = json.loads((dest / "resume.json").read_text())
    total = sum(f.stat().st_size for f in files)
    print(f"stage at step {state['step']}: {len(files)} files, {total / 1e6:.2f} MB "
          f"(resume state {(dest / 'resume.safetensors').stat().st_size / 1e6:.2f} MB) in {dest}")


if __name__ == "__main__":
    main()
