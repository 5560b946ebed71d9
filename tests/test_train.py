"""Training: resume equals uninterrupted, log-spaced checkpoints, the JSONL log, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import tvlens
from tvlens.errors import CheckpointError, ConfigError
from tvlens.train import TrainConfig, checkpoint_steps, read_log, train

TINY = dict(family={"name": "shift"}, steps=24, batch_size=12, n_layers=2, d_model=32, n_heads=4,
            eval_every=5, eval_n_per_task=4, n_checkpoints=5, warmup=4, seed=3)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_checkpoint_steps_are_log_spaced_from_zero():
    s = checkpoint_steps(10_000, 12)
    assert s[0] == 0 and s[-1] == 10_000 and len(s) <= 12 and s == sorted(set(s))
    ratios = [b / a for a, b in zip(s[2:], s[3:])]
    assert max(ratios) / min(ratios) < 1.5  # geometric spacing


def test_resume_after_a_kill_ends_with_the_same_weights(tmp_path):
    full, hist_full = train(TrainConfig(**TINY), tmp_path / "full", progress=False)
    # killed after step 13 (between evaluations): the resume state is the one from step 10
    train(TrainConfig(**TINY), tmp_path / "cut", progress=False, stop_after=13)
    state = json.loads((tmp_path / "cut" / "resume.json").read_text())
    assert state["step"] == 10
    resumed, _ = train(TrainConfig(**TINY), tmp_path / "cut", progress=False)
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the log of the resumed run is the uninterrupted run's log
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("train_seconds",)} for r in recs]
    assert strip(read_log(tmp_path / "cut")) == strip(read_log(tmp_path / "full"))
    steps = [s for s, _ in tvlens.list_checkpoints(tmp_path / "cut")]
    assert steps == checkpoint_steps(24, 5)


def test_log_holds_per_task_metrics_and_checkpoints_load(tmp_path):
    calls = []

    def cb(step, model, rec):
        calls.append(step)
        return {"extra_metric": step * 2}

    model, hist = train(TrainConfig(**TINY), tmp_path, progress=False, callback=cb)
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [0, 5, 10, 15, 20, 24]
    assert set(log[-1]["per_task"]) == set(tvlens.tasks.get("shift").task_names)
    assert all(r["extra_metric"] == 2 * r["step"] for r in log)
    assert log[1]["loss"] is not None and log[0]["loss"] is None
    last = tvlens.load_model(tmp_path)
    assert tvlens.model_info(last).step == 24
    assert tvlens.model_info(last).metrics["per_task"] == log[-1]["per_task"]
    assert "tvlens.train(" in tvlens.model_info(last).command


def test_resume_refuses_another_configuration(tmp_path):
    train(TrainConfig(**TINY), tmp_path, progress=False, stop_after=5)
    with pytest.raises(CheckpointError, match="another configuration"):
        train(TrainConfig(**{**TINY, "lr": 0.5}), tmp_path, progress=False)


def test_bad_training_config():
    with pytest.raises(ConfigError, match="steps must be an integer >= 1"):
        TrainConfig(steps=0)


def test_training_lowers_the_loss_on_regression(tmp_path):
    cfg = TrainConfig(family={"name": "sparse_regression_small"}, shots=9, steps=60, batch_size=32, n_layers=2,
                      d_model=32, n_heads=4, eval_every=30, eval_n_per_task=16, warmup=5, lr=3e-3)
    _, hist = train(cfg, None, progress=False)
    assert hist[0]["metric"] == "mse"
    assert hist[-1]["mean"] < hist[0]["mean"]
    assert "least_squares_mse" in hist[-1]


def test_cli_train_records_its_command(tmp_path, capsys):
    from tvlens.cli import main

    rc = main(["train", "--family", "shift", "--out", str(tmp_path), "--steps", "6", "--batch-size", "6",
               "--n-layers", "1", "--d-model", "16", "--n-heads", "2", "--eval-every", "3",
               "--eval-n-per-task", "2", "--no-progress", "--param", "n_letters=10", "--param", "offsets=[1,2]"])
    assert rc == 0
    meta = json.loads(sorted(tmp_path.glob("step_*.json"))[-1].read_text())
    assert "train --family shift" in meta["command"]
    assert meta["family"] == {"name": "shift", "n_letters": 10, "offsets": [1, 2]}
    out = json.loads(capsys.readouterr().out)
    assert out["final"]["step"] == 6


def test_cli_train_from_a_config_file(tmp_path):
    from tvlens.cli import main

    cfg = {"family": {"name": "sparse_regression_small"}, "shots": 3, "steps": 4, "batch_size": 8, "n_layers": 1,
           "d_model": 16, "n_heads": 2, "eval_every": 2, "eval_n_per_task": 2}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert main(["train", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "run"), "--steps", "2",
                 "--no-progress"]) == 0
    log = read_log(tmp_path / "run")
    assert log[-1]["step"] == 2 and log[-1]["metric"] == "mse"
    for f in ("configs/sparse_regression_paper.json", "configs/sparse_regression_small_cpu.json"):
        from pathlib import Path

        TrainConfig(**json.loads((Path(__file__).parent.parent / f).read_text()))  # valid configs


# --------------------------------------------------------------------------- issue 12: never lose a file
def _snapshot(folder):
    import hashlib

    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def test_training_into_a_copied_shipped_run_refuses_and_restart_keeps_user_files(tmp_path):
    import shutil

    from tvlens.errors import OverwriteError
    from tvlens.models import CHECKPOINT_DIR

    run = shutil.copytree(CHECKPOINT_DIR / "codes", tmp_path / "run")
    (run / "step_by_step_notes.md").write_text("my notes")
    (run / "step_000100.txt").write_text("not a tvlens name")
    before = _snapshot(run)
    n_ckpt = len(list(run.glob("step_*.safetensors")))
    assert n_ckpt >= 30
    with pytest.raises(OverwriteError, match="overwrite=True"):
        train(TrainConfig(**TINY), run, progress=False)
    assert _snapshot(run) == before  # nothing deleted, nothing overwritten
    from tvlens.cli import main

    args = ["train", "--family", "shift", "--out", str(run), "--steps", "4", "--batch-size", "6", "--n-layers", "1",
            "--d-model", "16", "--n-heads", "2", "--eval-every", "2", "--eval-n-per-task", "2", "--no-progress"]
    assert main(args) == 2
    assert _snapshot(run) == before
    # --restart: tvlens' own file names go, the user's files stay
    assert main(args + ["--restart"]) == 0
    assert (run / "step_by_step_notes.md").read_text() == "my notes"
    assert (run / "step_000100.txt").read_text() == "not a tvlens name"
    assert [s for s, _ in tvlens.list_checkpoints(run)] == checkpoint_steps(4, 12)
    assert [r["step"] for r in read_log(run)] == [0, 2, 4]


def test_a_folder_of_user_files_is_refused_then_kept(tmp_path):
    from tvlens.errors import OverwriteError

    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(OverwriteError):
        train(TrainConfig(**TINY), tmp_path, progress=False)
    train(TrainConfig(**{**TINY, "steps": 5}), tmp_path, progress=False, overwrite=True)
    assert (tmp_path / "notes.md").read_text() == "x"
    assert tvlens.model_info(tvlens.load_model(tmp_path)).step == 5


def test_a_finished_run_extends_with_more_steps(tmp_path, capsys):
    from tvlens.cli import main

    train(TrainConfig(**{**TINY, "steps": 10}), tmp_path / "api", progress=False)
    model, hist = train(TrainConfig(**{**TINY, "steps": 15}), tmp_path / "api", progress=False)
    assert [r["step"] for r in read_log(tmp_path / "api")] == [0, 5, 10, 15]
    assert [r["step"] for r in hist] == [15]
    assert tvlens.model_info(tvlens.load_model(tmp_path / "api")).step == 15
    assert json.loads((tmp_path / "api" / "train_config.json").read_text())["steps"] == 15
    with pytest.raises(CheckpointError, match="already trained to step 15"):
        train(TrainConfig(**{**TINY, "steps": 12}), tmp_path / "api", progress=False)
    # the CLI: more --steps extends; another configuration names --restart
    args = ["train", "--family", "shift", "--out", str(tmp_path / "cli"), "--batch-size", "6", "--n-layers", "1",
            "--d-model", "16", "--n-heads", "2", "--eval-every", "2", "--eval-n-per-task", "2", "--no-progress"]
    assert main(args + ["--steps", "4"]) == 0
    assert main(args + ["--steps", "6"]) == 0
    assert [r["step"] for r in read_log(tmp_path / "cli")] == [0, 2, 4, 6]
    capsys.readouterr()
    assert main(args + ["--steps", "6"]) == 0  # nothing to do: says how to extend
    assert "already trained to step 6; give --steps N" in capsys.readouterr().err
    assert main(args + ["--steps", "8", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "--restart" in err and "--steps" in err and "overwrite=True" not in err


def test_nan_grad_clip_is_refused_and_a_nan_loss_saves_nothing(tmp_path, monkeypatch):
    import sys

    tr = sys.modules["tvlens.train"]  # (tvlens.train is also the function)

    with pytest.raises(ConfigError, match="grad_clip"):
        train(TrainConfig(**{**TINY, "grad_clip": float("nan")}), tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    real = tr.answer_loss
    calls = []

    def poisoned(model, batch):
        calls.append(1)
        loss = real(model, batch)
        return loss * float("nan") if len(calls) == 7 else loss

    monkeypatch.setattr(tr, "answer_loss", poisoned)
    from tvlens.errors import TrainingError

    with pytest.raises(TrainingError, match="loss is nan at step 6"):
        train(TrainConfig(**TINY), tmp_path / "b", progress=False)
    for f in (tmp_path / "b").glob("step_*.safetensors"):
        m = tvlens.load_checkpoint(f)
        assert all(torch.isfinite(p).all() for p in m.parameters())
    assert json.loads((tmp_path / "b" / "resume.json").read_text())["step"] == 5


def test_a_log_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
    train(TrainConfig(**TINY), tmp_path, progress=False, stop_after=5)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    train(TrainConfig(**TINY), tmp_path, progress=False)
    assert [r["step"] for r in read_log(tmp_path)] == [0, 5, 10, 15, 20, 24]


def test_training_memory_is_estimated_before_work(tmp_path, monkeypatch):
    from tvlens.errors import ResourceError

    monkeypatch.setenv("TVLENS_MEMORY_LIMIT", "3GB")
    with pytest.raises(ResourceError, match="lower shots .now 100."):
        train(TrainConfig(family="codes", shots=100), tmp_path / "big", progress=False)
    assert not (tmp_path / "big").exists()
    with pytest.raises(ResourceError, match="n_per_task"):
        tvlens.tasks.get("codes").sample(10**7)
