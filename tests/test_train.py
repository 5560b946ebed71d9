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
