"""Training curriculum (issue 18): schedule values, the sidecar record, exact resume, and a run carried
in stages through a copied folder (resume state + sidecar + log) ending with the uninterrupted weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tvlens import tasks
from tvlens.errors import ConfigError
from tvlens.tasks.sparse_regression import restrict_dims
from tvlens.train import TrainConfig, batch_for_step, curriculum_at, read_log, train

FAM = {"name": "sparse_regression", "D": 8, "r": 2, "n_bases": 4, "noise_std": 0.1}
CUR = {"dims": {"start": 3, "inc": 2, "every": 4}, "shots": {"start": 2, "inc": 1, "every": 3}}
TINY = dict(family=FAM, shots=5, steps=20, batch_size=8, n_layers=2, d_model=16, n_heads=2, eval_every=5,
            eval_n_per_task=4, n_checkpoints=4, warmup=3, seed=1, curriculum=CUR, lr_schedule="linear")


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    a, b = _weights(a), _weights(b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_schedule_values_at_given_steps():
    cfg = TrainConfig(**TINY)
    got = [(s, curriculum_at(cfg, s)) for s in (0, 3, 4, 7, 8, 9, 12, 100)]
    assert got == [(0, {"shots": 2, "dims": 3}), (3, {"shots": 3, "dims": 3}), (4, {"shots": 3, "dims": 5}),
                   (7, {"shots": 4, "dims": 5}), (8, {"shots": 4, "dims": 7}), (9, {"shots": 5, "dims": 7}),
                   (12, {"shots": 5, "dims": 8}), (100, {"shots": 5, "dims": 8})]  # capped at the targets
    assert curriculum_at(TrainConfig(**{**TINY, "curriculum": None}), 0) == {"shots": 5}


def test_batches_follow_the_schedule():
    cfg = TrainConfig(**TINY)
    fam = cfg.build_family()
    b = batch_for_step(fam, cfg, 0)
    assert b.shots == 2 and b.inputs.shape[1] == 2 * 3
    assert torch.all(b.inputs[:, 0::2, 3:8] == 0) and torch.all(b.extra["w"][:, 3:] == 0)
    assert torch.any(b.inputs[:, 0::2, :3] != 0)
    # y is w.x on the kept coordinates plus noise (std 0.1)
    y = b.inputs[:, 1::2, 8]
    resid = y - torch.einsum("nkd,nd->nk", b.inputs[:, 0::2, :8], b.extra["w"])
    assert resid.std() < 0.2 and torch.equal(b.targets[:, 0::2], y)
    assert b.inputs.shape[1] == 2 * 3
    late = batch_for_step(fam, cfg, 50)
    assert late.shots == 5 and torch.any(late.inputs[:, 0::2, 7] != 0)


def test_restrict_dims_keeps_the_noise_and_refuses_bad_dims():
    p = tasks.get("sparse_regression", D=8, r=2, n_bases=4, noise_std=0.0).sample(3, shots=4, seed=0)
    q = restrict_dims(p, 4)
    y = torch.einsum("nkd,nd->nk", q.inputs[:, 0::2, :8], q.extra["w"])
    assert torch.allclose(y, q.inputs[:, 1::2, 8], atol=1e-5)  # noiseless: y is exactly the kept part
    assert torch.allclose(q.answers[:, 0], y[:, -1], atol=1e-5)
    assert restrict_dims(p, 8) is p
    with pytest.raises(ConfigError, match="dims"):
        restrict_dims(p, 0)


@pytest.mark.parametrize("bad, field", [
    ({"dims": {"start": 9, "inc": 1, "every": 2}}, "dims"),          # above the family's D=8
    ({"shots": {"start": 6, "inc": 1, "every": 2}}, "shots"),        # above shots=5
    ({"shots": {"start": 1, "inc": 0, "every": 2}}, "inc"),
    ({"shots": {"start": 1, "inc": 1}}, "shots"),                    # a key missing
    ({"width": {"start": 1, "inc": 1, "every": 2}}, "curriculum"),   # unknown schedule
    ("fast", "curriculum"),
])
def test_bad_curricula_are_refused_naming_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{**TINY, "curriculum": bad})
    with pytest.raises(ConfigError, match="sparse_regression"):
        TrainConfig(family={"name": "shift"}, curriculum={"dims": {"start": 2, "inc": 1, "every": 2}})


def test_curriculum_is_in_the_sidecars_and_the_log(tmp_path):
    train(TrainConfig(**TINY), tmp_path, progress=False)
    saved = json.loads((tmp_path / "train_config.json").read_text())
    assert saved["curriculum"] == CUR and saved["lr_schedule"] == "linear"
    assert TrainConfig.from_dict(saved) == TrainConfig(**TINY)  # round trip
    assert json.loads((tmp_path / "resume.json").read_text())["config"]["curriculum"] == CUR
    log = read_log(tmp_path)
    assert [r["curriculum"] for r in log][:3] == [{"shots": 2, "dims": 3}, {"shots": 3, "dims": 5},
                                                  {"shots": 5, "dims": 7}]
    side = json.loads((tmp_path / "step_000020.json").read_text())
    assert "curriculum" in json.dumps(side)


def test_resume_under_a_curriculum_ends_with_the_same_weights(tmp_path):
    full, _ = train(TrainConfig(**TINY), tmp_path / "full", progress=False)
    train(TrainConfig(**TINY), tmp_path / "cut", progress=False, stop_after=12)
    resumed, _ = train(TrainConfig(**TINY), tmp_path / "cut", progress=False)
    _same(full, resumed)


def test_a_stage_committed_and_restored_elsewhere_continues_to_the_same_weights(tmp_path):
    full, _ = train(TrainConfig(**TINY), tmp_path / "full", progress=False)
    train(TrainConfig(**TINY), tmp_path / "run", progress=False, stop_after=11)  # killed: resume state at 10
    stage = tmp_path / "repo" / "runs" / "stage1"  # what a stage commits: resume state, sidecar, log, a checkpoint
    stage.mkdir(parents=True)
    for name in ("resume.safetensors", "resume.json", "train_config.json", "log.jsonl", "step_000000.safetensors",
                 "step_000000.json"):
        shutil.copy2(tmp_path / "run" / name, stage / name)
    shutil.rmtree(tmp_path / "run")  # the original run is gone; only the committed copy remains
    fresh = tmp_path / "elsewhere" / "stage2"
    shutil.copytree(stage, fresh)
    resumed, hist = train(TrainConfig(**TINY), fresh, progress=False)
    assert hist[0]["step"] == 15
    _same(full, resumed)
    strip = lambda recs: [{k: v for k, v in r.items() if k != "train_seconds"} for r in recs]
    assert strip(read_log(fresh)) == strip(read_log(tmp_path / "full"))


def test_linear_schedule_decays_to_a_tenth_after_the_warmup():
    from tvlens.train import _lr_lambda

    f = _lr_lambda(TrainConfig(**{**TINY, "steps": 13, "warmup": 3}))
    assert f(0) == pytest.approx(0.25) and f(3) == pytest.approx(1.0)
    assert f(8) == pytest.approx(0.55) and f(13) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)


def test_cli_takes_a_curriculum_as_json(tmp_path, capsys):
    from tvlens.cli import main

    rc = main(["train", "--family", "sparse_regression", "--param", "D=4", "--param", "r=1", "--out", str(tmp_path),
               "--shots", "3", "--steps", "4", "--batch-size", "8", "--n-layers", "1", "--d-model", "16",
               "--n-heads", "2", "--eval-every", "2", "--eval-n-per-task", "2", "--no-progress",
               "--curriculum", '{"dims": {"start": 2, "inc": 1, "every": 2}}'])
    assert rc == 0
    assert json.loads((tmp_path / "train_config.json").read_text())["curriculum"]["dims"] == {"start": 2, "inc": 1,
                                                                                               "every": 2}
    assert [r["curriculum"]["dims"] for r in read_log(tmp_path)] == [2, 2, 3]  # the last batch before each eval
    capsys.readouterr()
    assert main(["train", "--family", "shift", "--out", str(tmp_path / "x"), "--curriculum", '{"dims": 3}']) == 2
    assert "curriculum" in capsys.readouterr().err and not (tmp_path / "x").exists()
