"""Fuzz: bad and hostile inputs across the API and the CLI (issue 12).

Every case must end in a tvlens error (a ``TvlensError``) whose message names the bad argument (or
flag), never a torch/numpy/TransformerLens traceback, a silent wrong number or a lost file: each case
runs in a folder holding a user's file and tvlens artifacts, snapshotted (names, sizes, hashes) before
the bad call and compared after it, with no temp file left behind.

A case is ``(id, setup, names)``: ``setup(env)`` prepares files in ``env.tmp`` and returns the bad
call (a thunk); ``names`` are strings one of which the message must contain. Cases of analyses that
another part of issue 12 fixes are marked ``xfail(strict=False)`` where they still fail here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tvlens
from tvlens.errors import CheckpointError, OverwriteError, TvlensError
from tvlens.models import CHECKPOINT_DIR, build_model, load_checkpoint, save_checkpoint
from tvlens.train import TrainConfig, train

TINY = dict(family={"name": "shift"}, steps=6, batch_size=6, n_layers=1, d_model=16, n_heads=2,
            eval_every=3, eval_n_per_task=2, n_checkpoints=3, warmup=1, seed=5)
PART_B = pytest.mark.xfail(strict=False, reason="issue 12 part B")


# --------------------------------------------------------------------------- helpers
def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            out[str(f.relative_to(folder))] = (f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_shared")
    train(TrainConfig(**TINY), root / "run", progress=False)
    model = tvlens.load_model("bitwise")
    fam = tvlens.tasks.get("bitwise")
    prompts = fam.sample(3, shots=2, seed=0)
    enc = tvlens.extract(model, prompts, layers=[1, 2], progress=False)
    tv = enc.task_vectors()
    tv.save(root / "vectors")
    small = build_model("shift", n_layers=1, d_model=16, n_heads=2, seed=1)
    save_checkpoint(small, root / "ckpt" / "step_000001", step=1)
    save_checkpoint(build_model("shift", n_layers=1, d_model=16, n_heads=2, seed=2), root / "ckpt" / "step_000002", step=2)
    return SimpleNamespace(root=root, model=model, fam=fam, prompts=prompts, enc=enc, tv=tv)


@pytest.fixture
def env(shared, tmp_path):
    (tmp_path / "my_notes.md").write_text("a user's file: never to be touched\n")

    def copy(name: str) -> Path:
        src = shared.root / name
        if src.is_dir():
            return Path(shutil.copytree(src, tmp_path / name))
        for suf in (".safetensors", ".json"):
            shutil.copy(src.with_suffix(suf), tmp_path / (name + suf))
        return tmp_path / name

    def edit_json(path: Path, fn) -> None:
        meta = json.loads(path.read_text())
        path.write_text(json.dumps(fn(meta)))

    return SimpleNamespace(tmp=tmp_path, copy=copy, edit_json=edit_json, **vars(shared))


def _run_case(env, setup, names, monkeypatch=None):
    thunk = setup(env)
    before = snapshot(env.tmp)
    with pytest.raises(TvlensError) as info:
        thunk()
    msg = str(info.value)
    assert any(n in msg for n in names), f"message names none of {names}: {msg}"
    assert snapshot(env.tmp) == before, "files changed on a refused call"
    assert not [p for p in env.tmp.rglob("*.tmp")], "a temp file was left behind"
    return info.value


def _cfg(**kw):
    return lambda env: (lambda: TrainConfig(**{**TINY, **kw}))


def _train(**kw):
    return lambda env: (lambda: train(TrainConfig(**TINY), env.tmp / "new_run", progress=False, **kw))


def _sample(*args, **kw):
    return lambda env: (lambda: env.fam.sample(*args, **kw))


def _tamper_vectors(fn):
    def setup(env):
        p = env.copy("vectors")
        env.edit_json(p.with_suffix(".json"), fn)
        return lambda: tvlens.TaskVectors.load(p)
    return setup


def _rev(key):
    def f(m):
        m[key] = m[key][::-1]
        return m
    return f


def _cut(key):
    def f(m):
        m[key] = m[key][:-1]
        return m
    return f


def _drop(key):
    def f(m):
        m.pop(key)
        return m
    return f


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --------------------------------------------------------------------------- API cases
def _copied_shipped_run(env):
    run = Path(shutil.copytree(CHECKPOINT_DIR / "bitwise", env.tmp / "copied_run"))
    (run / "step_by_step_notes.md").write_text("my notes")
    return lambda: train(TrainConfig(**TINY), run, progress=False)


def _only_user_files(env):
    (env.tmp / "results").mkdir()
    (env.tmp / "results" / "table.csv").write_text("a,b\n1,2\n")
    return lambda: train(TrainConfig(**TINY), env.tmp / "results", progress=False)


def _other_config(env):
    run = env.copy("run")
    return lambda: train(TrainConfig(**{**TINY, "lr": 0.5}), run, progress=False)


def _fewer_steps(env):
    run = env.copy("run")
    return lambda: train(TrainConfig(**{**TINY, "steps": 3}), run, progress=False)


def _resume_no_config(env):
    run = env.copy("run")
    (run / "train_config.json").write_text("[1, 2")
    return lambda: train(TrainConfig(**TINY), run, progress=False)


def _out_is_file(env):
    return lambda: train(TrainConfig(**TINY), env.tmp / "my_notes.md", progress=False)


def _train_memory(env):
    import os

    os.environ["TVLENS_MEMORY_LIMIT"] = "2GB"
    return lambda: train(TrainConfig(family="codes", shots=100), env.tmp / "big", progress=False)


def _sample_memory(env):
    return lambda: tvlens.tasks.get("codes").sample(10**7)


def _vectors_save_existing(env):
    p = env.copy("vectors")
    return lambda: env.tv.save(p)


def _vectors_save_folder(env):
    return lambda: env.tv.save(env.tmp)


def _vectors_save_empty(env):
    return lambda: env.tv.save("")


def _vectors_save_none(env):
    return lambda: env.tv.save(None)


def _vectors_sidecar_list(env):
    p = env.copy("vectors")
    p.with_suffix(".json").write_text("[1, 2, 3]")
    return lambda: tvlens.TaskVectors.load(p)


def _vectors_sidecar_bad_json(env):
    p = env.copy("vectors")
    _truncate(p.with_suffix(".json"))
    return lambda: tvlens.TaskVectors.load(p)


def _vectors_truncated_weights(env):
    p = env.copy("vectors")
    _truncate(p.with_suffix(".safetensors"))
    return lambda: tvlens.TaskVectors.load(p)


def _vectors_weights_garbage(env):
    p = env.copy("vectors")
    p.with_suffix(".safetensors").write_bytes(b"\x00" * 100)
    return lambda: tvlens.TaskVectors.load(p)


def _vectors_missing_weights(env):
    p = env.copy("vectors")
    p.with_suffix(".safetensors").unlink()
    return lambda: tvlens.TaskVectors.load(p)


def _vectors_no_sha_other_labels(env):
    p = env.copy("vectors")
    env.edit_json(p.with_suffix(".json"), lambda m: {**_drop("weights_sha256")(m), "task_names": m["task_names"][::-1]})
    return lambda: tvlens.TaskVectors.load(p)


def _vectors_wrong_kind(env):
    p = env.copy("vectors")
    return lambda: tvlens.PromptSet.load(p)


def _ckpt_other_step_no_sha(env):
    d = env.copy("ckpt")
    shutil.copy(d / "step_000002.safetensors", d / "step_000001.safetensors")
    env.edit_json(d / "step_000001.json", _drop("weights_sha256"))
    return lambda: load_checkpoint(d / "step_000001")


def _ckpt_other_step_with_sha(env):
    d = env.copy("ckpt")
    shutil.copy(d / "step_000002.safetensors", d / "step_000001.safetensors")
    return lambda: load_checkpoint(d / "step_000001")


def _ckpt_step_edited(env):
    d = env.copy("ckpt")
    env.edit_json(d / "step_000001.json", lambda m: {**m, "step": 2})
    return lambda: load_checkpoint(d / "step_000001")


def _ckpt_legacy_no_sha(env):
    d = Path(shutil.copytree(CHECKPOINT_DIR / "bitwise", env.tmp / "shipped"))
    shutil.copy(d / "step_003000.safetensors", d / "step_000005.safetensors")  # another step's weights
    env.edit_json(d / "step_000005.json", _drop("weights_sha256"))
    return lambda: load_checkpoint(d / "step_000005")


def _ckpt_config_not_object(env):
    d = env.copy("ckpt")
    env.edit_json(d / "step_000001.json", lambda m: {**m, "model_config": [1, 2]})
    return lambda: load_checkpoint(d / "step_000001", verify=False)


def _ckpt_truncated(env):
    d = env.copy("ckpt")
    _truncate(d / "step_000002.safetensors", 0.7)
    return lambda: load_checkpoint(d / "step_000002")


def _run_last_weights_missing(env):
    d = env.copy("ckpt")
    (d / "step_000002.safetensors").unlink()
    return lambda: tvlens.load_model(d)


def _run_last_pair_missing(env):
    d = env.copy("run")
    last = max(int(p.stem[5:]) for p in d.glob("step_*.json"))
    for suf in (".json", ".safetensors"):
        (d / f"step_{last:06d}{suf}").unlink()
    return lambda: tvlens.load_model(d)


def _save_ckpt_existing(env):
    d = env.copy("ckpt")
    return lambda: save_checkpoint(env.model, d / "step_000001", step=1)


def _load_step_string(env):
    d = env.copy("ckpt")
    return lambda: tvlens.load_model(d, step="1")


API_CASES = [
    # TrainConfig: every bad value refused before any work
    ("grad_clip=nan", _cfg(grad_clip=float("nan")), ["grad_clip"]),
    ("grad_clip=inf", _cfg(grad_clip=float("inf")), ["grad_clip"]),
    ("grad_clip<0", _cfg(grad_clip=-1.0), ["grad_clip"]),
    ("lr=nan", _cfg(lr=float("nan")), ["lr"]),
    ("lr=inf", _cfg(lr=float("inf")), ["lr"]),
    ("lr<0", _cfg(lr=-1e-3), ["lr"]),
    ("lr=0", _cfg(lr=0), ["lr"]),
    ("lr=str", _cfg(lr="1e-3"), ["lr"]),
    ("steps=0", _cfg(steps=0), ["steps"]),
    ("steps<0", _cfg(steps=-5), ["steps"]),
    ("steps=float", _cfg(steps=2.5), ["steps"]),
    ("steps=str", _cfg(steps="10"), ["steps"]),
    ("batch_size=0", _cfg(batch_size=0), ["batch_size"]),
    ("batch_size<0", _cfg(batch_size=-1), ["batch_size"]),
    ("batch_size=bool", _cfg(batch_size=True), ["batch_size"]),
    ("seed=str", _cfg(seed="1"), ["seed"]),
    ("seed<0", _cfg(seed=-1), ["seed"]),
    ("seed=bool", _cfg(seed=True), ["seed"]),
    ("seed=float", _cfg(seed=1.5), ["seed"]),
    ("seed=huge", _cfg(seed=2**64), ["seed"]),
    ("weight_decay=nan", _cfg(weight_decay=float("nan")), ["weight_decay"]),
    ("warmup<0", _cfg(warmup=-1), ["warmup"]),
    ("shots<0", _cfg(shots=-1), ["shots"]),
    ("n_heads does not divide", _cfg(n_heads=3), ["n_heads"]),
    ("d_mlp=0", _cfg(d_mlp=0), ["d_mlp"]),
    ("checkpoint_every=0", _cfg(checkpoint_every=0), ["checkpoint_every"]),
    ("eval_every=0", _cfg(eval_every=0), ["eval_every"]),
    ("family=int", _cfg(family=42), ["family"]),
    ("family unknown", _cfg(family={"name": "nope"}), ["nope"]),
    ("family param unknown", lambda env: (lambda: train(TrainConfig(**{**TINY, "family": {"name": "shift", "foo": 1}}),
                                                        None, progress=False)), ["foo"]),
    ("train unknown keyword", _train(learning_rate=1e-3), ["learning_rate"]),
    ("train config=str", lambda env: (lambda: train("codes", env.tmp / "r", progress=False)), ["config"]),
    ("train stop_after=0", _train(stop_after=0), ["stop_after"]),
    ("train out_dir=''", lambda env: (lambda: train(TrainConfig(**TINY), "", progress=False)), ["out_dir"]),
    ("train out_dir is a file", _out_is_file, ["out_dir"]),
    ("train into a copied shipped run", _copied_shipped_run, ["overwrite=True"]),
    ("train into a folder of user files", _only_user_files, ["overwrite=True"]),
    ("train resume, another config", _other_config, ["lr"]),
    ("train resume, fewer steps than done", _fewer_steps, ["steps"]),
    ("train resume, unreadable train_config", _resume_no_config, ["train_config.json"]),
    ("train memory (codes, 100 shots)", _train_memory, ["shots"]),
    # task families and sampling
    ("sample 10^7 per task", _sample_memory, ["n_per_task"]),
    ("sample seed=str", _sample(2, seed="1"), ["seed"]),
    ("sample seed<0", _sample(2, seed=-1), ["seed"]),
    ("sample seed=bool", _sample(2, seed=True), ["seed"]),
    ("sample seed=float", _sample(2, seed=0.5), ["seed"]),
    ("sample n_per_task=0", _sample(0), ["n_per_task"]),
    ("sample n_per_task=float", _sample(2.0), ["n_per_task"]),
    ("sample n_per_task=str", _sample("2"), ["n_per_task"]),
    ("sample shots<0", _sample(2, shots=-1), ["shots"]),
    ("sample tasks unknown", _sample(2, tasks=["nope"]), ["nope"]),
    ("sample tasks=[]", _sample(2, tasks=[]), ["tasks"]),
    ("sample tasks=[float]", _sample(2, tasks=[1.5]), ["tasks"]),
    ("sample tasks twice", _sample(2, tasks=["and", "and"]), ["tasks"]),
    ("sample tasks=int out of range", _sample(2, tasks=[99]), ["task index 99"]),
    ("sample tasks=dict", _sample(2, tasks={"and": 1}), ["tasks"]),
    ("family name=int", lambda env: (lambda: tvlens.tasks.get(123)), ["123"]),
    ("family param unknown (get)", lambda env: (lambda: tvlens.tasks.get("codes", foo=1)), ["foo"]),
    ("family param wrong type", lambda env: (lambda: tvlens.tasks.get("codes", n_codes="eight")), ["n_codes"]),
    ("family config=list", lambda env: (lambda: tvlens.tasks.from_config(["codes"])), ["config"]),
    # artifacts: TaskVectors
    ("vectors task_names reversed", _tamper_vectors(_rev("task_names")), ["task_names"]),
    ("vectors task_names cut", _tamper_vectors(_cut("task_names")), ["task_names"]),
    ("vectors layers permuted", _tamper_vectors(_rev("layers")), ["layers"]),
    ("vectors layers shorter", _tamper_vectors(_cut("layers")), ["layers"]),
    ("vectors sidecar key missing", _tamper_vectors(_drop("task_names")), ["task_names"]),
    ("vectors d_model edited", _tamper_vectors(lambda m: {**m, "d_model": 7}), ["d_model"]),
    ("vectors no sha, labels reversed", _vectors_no_sha_other_labels, ["task_names"]),
    ("vectors sidecar is a list", _vectors_sidecar_list, ["list"]),
    ("vectors sidecar truncated JSON", _vectors_sidecar_bad_json, ["not valid JSON"]),
    ("vectors weights truncated", _vectors_truncated_weights, ["truncated"]),
    ("vectors weights garbage", _vectors_weights_garbage, ["truncated"]),
    ("vectors weights missing", _vectors_missing_weights, ["missing weights file"]),
    ("vectors loaded as a PromptSet", _vectors_wrong_kind, ["PromptSet"]),
    ("vectors save over existing", _vectors_save_existing, ["overwrite=True"]),
    ("vectors save to a folder", _vectors_save_folder, ["folder"]),
    ("vectors save to ''", _vectors_save_empty, ["path"]),
    ("vectors save to None", _vectors_save_none, ["path"]),
    # artifacts: checkpoints and run folders
    ("checkpoint: other step's weights, sha removed", _ckpt_other_step_no_sha, ["step"]),
    ("checkpoint: other step's weights, sha kept", _ckpt_other_step_with_sha, ["does not match its sidecar"]),
    ("checkpoint: step edited in sidecar", _ckpt_step_edited, ["step"]),
    ("checkpoint: shipped, sha removed, weights swapped", _ckpt_legacy_no_sha, ["weights_sha256"]),
    ("checkpoint: model_config not an object", _ckpt_config_not_object, ["model_config"]),
    ("checkpoint: truncated weights", _ckpt_truncated, ["truncated"]),
    ("run folder: last .safetensors missing", _run_last_weights_missing, ["step_000002"]),
    ("run folder: finished run, last checkpoint gone", _run_last_pair_missing, ["missing"]),
    ("save_checkpoint over existing", _save_ckpt_existing, ["overwrite=True"]),
    ("load_model step=str", _load_step_string, ["step"]),
    ("vectors save under a file", lambda env: (lambda: env.tv.save(env.tmp / "my_notes.md" / "vectors")), ["is a file"]),
    ("train out_dir under a file", lambda env: (lambda: train(TrainConfig(**TINY), env.tmp / "my_notes.md" / "run",
                                                              progress=False)), ["out_dir"]),
    ("train into the shipped checkpoints", lambda env: (lambda: train(TrainConfig(**TINY), CHECKPOINT_DIR / "codes",
                                                                      progress=False, overwrite=True)), ["shipped"]),
    ("train callback not callable", _train(callback=3), ["callback"]),
    ("build_model seed=str", lambda env: (lambda: build_model("shift", seed="0")), ["seed"]),
    ("build_model seed<0", lambda env: (lambda: build_model("shift", seed=-3)), ["seed"]),
    ("build_model family unknown", lambda env: (lambda: build_model("nope")), ["nope"]),
]


@pytest.mark.parametrize("case_id,setup,names", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(env, case_id, setup, names, monkeypatch):
    monkeypatch.delenv("TVLENS_MEMORY_LIMIT", raising=False)
    try:
        _run_case(env, setup, names)
    finally:
        import os

        os.environ.pop("TVLENS_MEMORY_LIMIT", None)


# --------------------------------------------------------------------------- analyses (issue 12 part B)
def _xcase(fn):
    return lambda env: (lambda: fn(env))


ANALYSIS_CASES = [
    ("extract layers='2'", _xcase(lambda e: tvlens.extract(e.model, e.prompts, layers="2", progress=False)), ["layers"]),
    ("extract batch_size=0", _xcase(lambda e: tvlens.extract(e.model, e.prompts, batch_size=0, progress=False)),
     ["batch_size"]),
    ("extract batch_size<0", _xcase(lambda e: tvlens.extract(e.model, e.prompts, batch_size=-1, progress=False)),
     ["batch_size"]),
    ("icl_accuracy batch_size=0", _xcase(lambda e: tvlens.icl_accuracy(e.model, e.prompts, batch_size=0)), ["batch_size"]),
    ("TD k=0", _xcase(lambda e: tvlens.task_decodability(e.enc, k=0)), ["k"]),
    ("TD layers='2'", _xcase(lambda e: tvlens.task_decodability(e.enc, layers="2", k=2)), ["layers"]),
    ("run_patching batch_size<0", _xcase(lambda e: tvlens.run_patching(e.model, e.prompts, e.tv, batch_size=-1,
                                                                        progress=False)), ["batch_size"]),
    ("run_patching scale=nan", _xcase(lambda e: tvlens.run_patching(e.model, e.prompts, e.tv, scale=float("nan"),
                                                                     progress=False)), ["scale"]),
    ("run_patching layers='2'", _xcase(lambda e: tvlens.run_patching(e.model, e.prompts, e.tv, layers="2",
                                                                      progress=False)), ["layers"]),
    ("TaskVectors.get unknown task", _xcase(lambda e: e.tv.get("nope", 1)), ["nope"]),
    ("TD seed=str", _xcase(lambda e: tvlens.task_decodability(e.enc, k=2, seed="1")), ["seed"]),
    ("TD tie_break unknown", _xcase(lambda e: tvlens.task_decodability(e.enc, k=2, tie_break="coin")), ["tie_break"]),
    ("TD metric unknown", _xcase(lambda e: tvlens.task_decodability(e.enc, k=2, metric="manhattan")), ["metric"]),
    ("extract prompts=tensor", _xcase(lambda e: tvlens.extract(e.model, e.prompts.tokens, progress=False)), ["prompts"]),
    ("icl_accuracy prompts=list", _xcase(lambda e: tvlens.icl_accuracy(e.model, [[1, 2, 3]])), ["prompts"]),
    ("extract at unknown", _xcase(lambda e: tvlens.extract(e.model, e.prompts, at="middle", progress=False)), ["at"]),
    ("run_patching mode unknown", _xcase(lambda e: tvlens.run_patching(e.model, e.prompts, e.tv, mode="swap2",
                                                                        progress=False)), ["mode"]),
    ("head_attribution batch_size=0", _xcase(lambda e: tvlens.head_attribution(e.model, e.prompts, method="dla",
                                                                                batch_size=0)), ["batch_size"]),
    ("head_attribution method unknown", _xcase(lambda e: tvlens.head_attribution(e.model, e.prompts, method="nope")),
     ["method"]),
]


def _analysis_params():
    out = []
    for case_id, setup, names in ANALYSIS_CASES:
        marks = [PART_B] if case_id in _STILL_FAILING else []
        out.append(pytest.param(case_id, setup, names, id=case_id, marks=marks))
    return out


# the analysis cases that still fail on this branch (their fixes are issue 12 part B): none since the merge of
# the valid branch. A single string where names are expected is one name there (sources="and" is ["and"],
# by="layer" is ("layer",)): a correct result, tested in tests/test_validate.py, so not a case here.
_STILL_FAILING: set[str] = set()


@pytest.mark.parametrize("case_id,setup,names", _analysis_params())
def test_analysis_bad_input(env, case_id, setup, names):
    _run_case(env, setup, names)


# --------------------------------------------------------------------------- CLI cases
def _cli(env, capsys, argv):
    from tvlens.cli import main

    before = snapshot(env.tmp)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: usage + error, exit 2
        rc = e.code
    err = capsys.readouterr().err
    assert snapshot(env.tmp) == before, "files changed on a refused command"
    assert not [p for p in env.tmp.rglob("*.tmp")]
    return rc, err


def _train_argv(env, *extra, out=None):
    out = env.tmp / "cli_run" if out is None else out
    return ["train", "--family", "shift", "--out", str(out), "--steps", "4", "--batch-size", "6",
            "--n-layers", "1", "--d-model", "16", "--n-heads", "2", "--eval-every", "2", "--eval-n-per-task", "2",
            "--no-progress", *extra]


def _write(env, name, text):
    p = env.tmp / name
    p.write_text(text)
    return str(p)


CLI_CASES = [
    ("--param without =", lambda env: _train_argv(env, "--param", "n_letters"), ["--param"]),
    ("--param unknown key", lambda env: _train_argv(env, "--param", "bogus=3"), ["bogus"]),
    ("--param twice", lambda env: _train_argv(env, "--param", "n_letters=5", "--param", "n_letters=6"), ["n_letters"]),
    ("--param bad value", lambda env: _train_argv(env, "--param", "n_letters=abc"), ["n_letters"]),
    ("--param without --family", lambda env: ["train", "--config", _write(env, "c.json", json.dumps(TINY)), "--out",
                                              str(env.tmp / "r"), "--param", "n_letters=5"], ["--param"]),
    ("--config missing", lambda env: ["train", "--config", str(env.tmp / "nope.json"), "--out", str(env.tmp / "r")],
     ["--config"]),
    ("--config malformed", lambda env: ["train", "--config", _write(env, "c.json", "{\"steps\": 3,"), "--out",
                                        str(env.tmp / "r")], ["--config"]),
    ("--config a list", lambda env: ["train", "--config", _write(env, "c.json", "[1, 2]"), "--out", str(env.tmp / "r")],
     ["--config"]),
    ("--config unknown key", lambda env: ["train", "--config", _write(env, "c.json", json.dumps({**TINY, "learning": 1})),
                                          "--out", str(env.tmp / "r")], ["learning"]),
    ("--config bad value", lambda env: ["train", "--config", _write(env, "c.json", json.dumps({**TINY, "lr": -1})),
                                        "--out", str(env.tmp / "r")], ["--lr"]),
    ("--config a folder", lambda env: ["train", "--config", str(env.tmp), "--out", str(env.tmp / "r")], ["--config"]),
    ("--out ''", lambda env: _train_argv(env, out=""), ["--out"]),
    ("--out a file", lambda env: _train_argv(env, out=env.tmp / "my_notes.md"), ["--out"]),
    ("--out a copied shipped run", lambda env: _train_argv(
        env, out=shutil.copytree(CHECKPOINT_DIR / "categories", env.tmp / "copied")), ["--restart"]),
    ("--out with another config", lambda env: _train_argv(env, "--lr", "0.5", out=env.copy("run")), ["--restart"]),
    ("--threads 0", lambda env: _train_argv(env, "--threads", "0"), ["--threads"]),
    ("--threads -2", lambda env: _train_argv(env, "--threads", "-2"), ["--threads"]),
    ("--threads abc", lambda env: _train_argv(env, "--threads", "abc"), ["--threads"]),
    ("--seed -1", lambda env: _train_argv(env, "--seed", "-1"), ["--seed"]),
    ("--seed abc", lambda env: _train_argv(env, "--seed", "abc"), ["--seed"]),
    ("--seed 1.5", lambda env: _train_argv(env, "--seed", "1.5"), ["--seed"]),
    ("--lr nan", lambda env: _train_argv(env, "--lr", "nan"), ["--lr"]),
    ("--lr -1", lambda env: _train_argv(env, "--lr", "-1"), ["--lr"]),
    ("--grad-clip nan", lambda env: _train_argv(env, "--grad-clip", "nan"), ["--grad-clip"]),
    ("--steps 0", lambda env: _train_argv(env, "--steps", "0"), ["--steps"]),
    ("--batch-size 0", lambda env: _train_argv(env, "--batch-size", "0"), ["--batch-size"]),
    ("--shots -1", lambda env: _train_argv(env, "--shots", "-1"), ["--shots"]),
    ("--family unknown", lambda env: ["train", "--family", "nope", "--out", str(env.tmp / "r")], ["nope"]),
    ("demo --seed -1", lambda env: ["demo", "--seed", "-1", "--no-report"], ["--seed"]),
    ("demo --threads 0", lambda env: ["demo", "--threads", "0", "--no-report"], ["--threads"]),
    ("demo --n-per-task 0", lambda env: ["demo", "--n-per-task", "0", "--no-report"], ["--n-per-task"]),
    ("report --seed x", lambda env: ["report", "--seed", "x"], ["--seed"]),
    ("demo --out a file", lambda env: ["demo", "--out", str(env.tmp / "my_notes.md")], ["--out"]),
    ("demo --out ''", lambda env: ["demo", "--out", ""], ["--out"]),
    ("report --out under a file", lambda env: ["report", "--out", str(env.tmp / "my_notes.md" / "r")], ["--out"]),
    ("demo --n-per-task 10^7", lambda env: ["demo", "--n-per-task", str(10**7), "--no-report"], ["n_per_task"]),
]


@pytest.mark.parametrize("case_id,argv,names", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(env, capsys, case_id, argv, names):
    rc, err = _cli(env, capsys, argv(env))
    assert rc == 2, err
    assert "Traceback" not in err
    assert any(n in err for n in names), f"stderr names none of {names}: {err}"


def test_cli_memory_guard_names_shots(env, capsys, monkeypatch):
    monkeypatch.setenv("TVLENS_MEMORY_LIMIT", "4GB")
    rc, err = _cli(env, capsys, ["train", "--family", "codes", "--shots", "100", "--out", str(env.tmp / "big")])
    assert rc == 2 and "--shots" in err and "memory" in err
    assert not (env.tmp / "big").exists()


# --------------------------------------------------------------------------- correct results
def test_a_single_task_name_is_one_task_not_its_letters(shared):
    p = shared.fam.sample(2, shots=2, seed=0, tasks="xor")
    assert p.labels.tolist() == [shared.fam.task_names.index("xor")] * 2


def test_vectors_round_trip_and_overwrite_on_request(env):
    p = env.copy("vectors")
    back = tvlens.TaskVectors.load(p)
    assert back.task_names == env.tv.task_names and back.layers == env.tv.layers
    assert torch.equal(back.vectors, env.tv.vectors)
    env.tv.save(p, overwrite=True)
    assert torch.equal(tvlens.TaskVectors.load(p).vectors, env.tv.vectors)


def test_shipped_checkpoints_still_verify():
    # the shipped sidecars record the sha256 of their (unchanged) weights
    for name in ("codes", "categories", "bitwise"):
        steps = tvlens.checkpoint_steps(name)
        m = load_checkpoint(CHECKPOINT_DIR / name / f"step_{steps[-1]:06d}")
        assert tvlens.model_info(m).step == steps[-1]


def test_a_checkpoint_without_sha_but_with_its_header_loads(env):
    d = env.copy("ckpt")
    env.edit_json(d / "step_000001.json", _drop("weights_sha256"))
    assert tvlens.model_info(load_checkpoint(d / "step_000001")).step == 1


def test_run_folder_with_a_broken_checkpoint_loads_other_steps_explicitly(env):
    d = env.copy("ckpt")
    (d / "step_000002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        tvlens.list_checkpoints(d)
    assert [s for s, _ in tvlens.list_checkpoints(d, strict=False)] == [1]
    assert tvlens.model_info(tvlens.load_model(d, step=1)).step == 1


def test_overwrite_error_is_a_file_exists_error(env):
    p = env.copy("vectors")
    with pytest.raises(FileExistsError):
        env.tv.save(p)
    assert issubclass(OverwriteError, TvlensError)


def test_a_huge_n_checkpoints_costs_nothing():
    from tvlens.train import checkpoint_steps

    assert checkpoint_steps(10, 10**9) == checkpoint_steps(10, 11)  # no billion-point logspace


def test_distinct_cases():
    ids = [c[0] for c in API_CASES + ANALYSIS_CASES + CLI_CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 60


# =========================================================================== issue 19: the new surfaces
# Each case ends in one outcome class, asserted exactly: ERROR (a TvlensError whose message names the argument;
# no file changed, no temp file left) or RESULT (a correct number, checked against a reference). Cases run
# with TVLENS_MEMORY_LIMIT=8GB and TVLENS_WORK_LIMIT=1e13, so the resource guards answer the same everywhere.
import os  # noqa: E402

import numpy as np  # noqa: E402


@pytest.fixture
def limits(monkeypatch):
    monkeypatch.setenv("TVLENS_MEMORY_LIMIT", "8GB")
    monkeypatch.setenv("TVLENS_WORK_LIMIT", "1e13")


class _Words(tvlens.tasks.RuleFamily):
    """first or last of two letters (the fuzz cases' own family)"""
    words = list("abcd")
    rules = {"first": lambda xs: xs[0], "last": lambda xs: xs[-1]}

    def draw_input(self, rng):
        return list(rng.choice(self.words, size=2, replace=False))


def _rule_family(**attrs):
    return type("Mine", (_Words,), attrs)


def _hf_folder(env, config: str | None = '{"model_type": "gpt2"}', weights: bytes | None = b"not safetensors" * 8):
    d = env.tmp / "hf"
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(config)
    if weights is not None:
        (d / "model.safetensors").write_bytes(weights)
    return d


def _symlink_loop(env):
    (env.tmp / "loop").symlink_to(env.tmp / "loop")
    return lambda: tvlens.load_model(env.tmp / "loop")


def _page_over_existing(env):
    target = env.tmp / "my_notes.md"
    return lambda: tvlens.views.Page("x").save(target)


def _fragment_over_existing(env):
    from tvlens.views.page import html_fragment

    return lambda: html_fragment("<p>x</p>").save(env.tmp / "my_notes.md")


def _fragment_existing_html(env):
    from tvlens.views.page import html_fragment

    (env.tmp / "view.html").write_text("<p>mine</p>")
    return lambda: html_fragment("<p>x</p>").save(env.tmp / "view")  # .html is added: still that file


def _strings(env, texts, answers, **kw):
    return lambda: tvlens.PromptSet.from_strings(env.model, texts, answers, **kw)


def _bitwise_words(env):
    words = env.prompts.str_tokens(0)
    q = env.prompts.query_pos[0].item()
    return " ".join(words[: q + 1]), " " + words[q + 1]


def _finetune(env, **kw):
    return lambda: tvlens.finetune(env.model, "bitwise", layers=[0], steps=kw.pop("steps", 3), batch_size=6,
                                   n_eval_per_task=11, progress=False, **kw)


ISSUE19_ERRORS = [
    # loading: unknown or useless keywords, devices, steps, paths
    ("load_model devcie= (a typo)", lambda e: lambda: tvlens.load_model("bitwise", devcie="cuda"), ["devcie", "'device'"]),
    ("load_model device_map= on a shipped model", lambda e: lambda: tvlens.load_model("bitwise", device_map="auto"),
     ["device_map"]),
    ("load_model device='banana'", lambda e: lambda: tvlens.load_model("bitwise", device="banana"), ["device='banana'"]),
    ("load_model device='meta'", lambda e: lambda: tvlens.load_model("bitwise", device="meta"), ["device='meta'"]),
    ("load_model device=3.5", lambda e: lambda: tvlens.load_model("bitwise", device=3.5), ["device"]),
    ("load_model step=True", lambda e: lambda: tvlens.load_model("bitwise", step=True), ["step"]),
    ("load_model step=-1", lambda e: lambda: tvlens.load_model("bitwise", step=-1), ["step"]),
    ("load_model(one checkpoint, step=another)",
     lambda e: (lambda d: lambda: tvlens.load_model(d / "step_000002", step=1))(e.copy("ckpt")), ["step=1"]),
    ("load_model(HF folder, step=5)", lambda e: (lambda d: lambda: tvlens.load_model(d, step=5))(
        _hf_folder(e, weights=None)), ["step=5"]),
    ("load_model bad config.json", lambda e: (lambda d: lambda: tvlens.load_model(d))(_hf_folder(e, config="{bad")),
     ["config.json is not valid JSON"]),
    ("load_model config.json a list", lambda e: (lambda d: lambda: tvlens.load_model(d))(_hf_folder(e, config="[1]")),
     ["config.json"]),
    ("load_model garbage model.safetensors", lambda e: (lambda d: lambda: tvlens.load_model(d))(_hf_folder(e)),
     ["model.safetensors is not a readable safetensors"]),
    ("load_model symlink loop", _symlink_loop, ["symbolic link loop"]),
    ("load_model an existing non-model file", lambda e: lambda: tvlens.load_model(e.tmp / "my_notes.md"),
     ["is a file", "not a model"]),
    ("load_model name_or_path=''", lambda e: lambda: tvlens.load_model(""), ["name_or_path"]),
    ("load_model name_or_path=3", lambda e: lambda: tvlens.load_model(3), ["name_or_path"]),
    # sizes: one work/memory estimate refuses before any work
    ("build_model 64 x 8192", lambda e: lambda: build_model("codes", n_layers=64, d_model=8192), ["n_layers or d_model"]),
    ("build_model n_layers=True", lambda e: lambda: build_model("codes", n_layers=True), ["n_layers"]),
    ("build_model shots='4'", lambda e: lambda: build_model("codes", shots="4"), ["shots"]),
    ("sample(3333, shots=10000) under the prompt guard", lambda e: lambda: tvlens.tasks.get("codes").sample(3333, shots=10000),
     ["n_per_task"]),
    ("stats.mean_ci n_boot=10^9", lambda e: lambda: tvlens.stats.mean_ci(np.ones(50), n_boot=10**9), ["n_boot"]),
    ("stats.mean_ci n_boot=0", lambda e: lambda: tvlens.stats.mean_ci(np.ones(50), n_boot=0), ["n_boot"]),
    ("stats.mean_ci n_boot=2.5", lambda e: lambda: tvlens.stats.mean_ci(np.ones(50), n_boot=2.5), ["n_boot"]),
    ("stats.mean_ci seed='1'", lambda e: lambda: tvlens.stats.mean_ci(np.ones(50), seed="1"), ["seed"]),
    ("stats.mean_ci ci=1.5", lambda e: lambda: tvlens.stats.mean_ci(np.ones(50), ci=1.5), ["ci"]),
    ("stats.mean_ci ci=nan", lambda e: lambda: tvlens.stats.mean_ci(np.ones(50), ci=float("nan")), ["ci"]),
    ("stats.mean_ci of a scalar", lambda e: lambda: tvlens.stats.mean_ci(3.0), ["values"]),
    ("stats.per_group_ci label >= n_groups",
     lambda e: lambda: tvlens.stats.per_group_ci(np.ones(6), [0, 1, 2, 0, 1, 2], 2), ["labels", "n_groups"]),
    ("stats.per_group_ci negative label", lambda e: lambda: tvlens.stats.per_group_ci(np.ones(3), [0, -1, 0], 2),
     ["labels"]),
    ("stats.per_group_ci float labels", lambda e: lambda: tvlens.stats.per_group_ci(np.ones(3), [0, 0.5, 1], 2),
     ["labels"]),
    ("stats.knn_permutation_null n_perm=10^8",
     lambda e: lambda: tvlens.stats.knn_permutation_null(np.zeros((200, 10), int), np.zeros(200, int), 2, n_perm=10**8),
     ["n_perm"]),
    # own families and the registry
    ("RuleFamily rule returning None", lambda e: lambda: _rule_family(rules={"a": lambda xs: None,
                                                                            "b": lambda xs: xs[0]})().sample(2),
     ["rule 'a'", "None"]),
    ("RuleFamily rule answering '->'", lambda e: lambda: _rule_family(rules={"a": lambda xs: "->",
                                                                            "b": lambda xs: xs[0]})().sample(2),
     ["separator token '->'"]),
    ("RuleFamily rule answering ';'", lambda e: lambda: _rule_family(rules={"a": lambda xs: [xs[0], ";"],
                                                                           "b": lambda xs: xs})().sample(2),
     ["separator token ';'"]),
    ("RuleFamily rule raising", lambda e: lambda: _rule_family(rules={"a": lambda xs: xs[7], "b": lambda xs: xs[0]})(
    ).sample(2), ["rule 'a'", "IndexError"]),
    ("RuleFamily rule answering a number", lambda e: lambda: _rule_family(rules={"a": lambda xs: 3,
                                                                                "b": lambda xs: xs[0]})().sample(2),
     ["rule 'a'"]),
    ("RuleFamily empty word", lambda e: lambda: _rule_family(words=["", "a", "b"])(), ["words", "''"]),
    ("RuleFamily word with a space", lambda e: lambda: _rule_family(words=["a b", "c", "d"])(), ["words"]),
    ("RuleFamily words a string", lambda e: lambda: _rule_family(words="abcd")(), ["words"]),
    ("RuleFamily draw_input outside words", lambda e: lambda: _rule_family(
        draw_input=lambda self, rng: ["z", "a"])().sample(2), ["draw_input", "'z'"]),
    ("RuleFamily draw_input empty", lambda e: lambda: _rule_family(draw_input=lambda self, rng: [])().sample(2),
     ["draw_input"]),
    ("register('codes', Mine, overwrite=True)", lambda e: lambda: tvlens.tasks.register("codes", _Words, overwrite=True),
     ["'codes'", "shipped"]),
    ("register('bitwise') as a decorator", lambda e: lambda: tvlens.tasks.register("bitwise", overwrite=True)(_Words),
     ["'bitwise'"]),
    # own prompts
    ("from_strings task_names twice", lambda e: _strings(e, ["a", "b"], [" c", " d"], labels=[0, 1],
                                                         task_names=["x", "x"]), ["task_names"]),
    ("from_strings a word outside the vocabulary", lambda e: _strings(
        e, ["hot -> cold ; big -> small ; up ->"], [" down"], labels=["antonym"]), ["'hot'", "vocabulary"]),
    ("from_strings an answer outside the vocabulary", lambda e: (lambda t, a: _strings(e, [t], [" Lima"]))(
        *_bitwise_words(e)), ["'Lima'"]),
    ("from_strings a prompt that is not text", lambda e: _strings(e, [3], [" a"]), ["strings"]),
    ("from_tokens query_pos=True", lambda e: lambda: tvlens.PromptSet.from_tokens([[1, 2, 3]], query_pos=True),
     ["query_pos"]),
    ("from_tokens query_pos=-1", lambda e: lambda: tvlens.PromptSet.from_tokens([[1, 2, 3]], query_pos=-1),
     ["query_pos"]),
    ("from_tokens query_pos=1.0", lambda e: lambda: tvlens.PromptSet.from_tokens([[1, 2, 3]], query_pos=1.0),
     ["query_pos"]),
    ("from_tokens labels=[0, True]", lambda e: lambda: tvlens.PromptSet.from_tokens([[1, 2], [3, 4]], labels=[0, True],
                                                                                    task_names=["a", "b"]), ["labels"]),
    ("from_tokens labels a string", lambda e: lambda: tvlens.PromptSet.from_tokens([[1, 2], [3, 4]], labels="ab"),
     ["labels"]),
    # finetune
    ("finetune shots='4'", lambda e: _finetune(e, shots="4"), ["shots"]),
    ("finetune lora_alpha=nan", lambda e: _finetune(e, lora_rank=2, lora_alpha=float("nan")), ["lora_alpha"]),
    ("finetune lora_alpha=0.0", lambda e: _finetune(e, lora_rank=2, lora_alpha=0.0), ["lora_alpha"]),
    ("finetune lora_alpha without lora_rank", lambda e: _finetune(e, lora_alpha=4.0), ["lora_alpha"]),
    ("finetune lr=1e6 diverges", lambda e: _finetune(e, lr=1e6, steps=4), ["loss became", "at step"]),
    ("finetune lr='1e-3'", lambda e: _finetune(e, lr="1e-3"), ["lr"]),
    ("finetune seed=-1", lambda e: _finetune(e, seed=-1), ["seed"]),
    # td_vs_accuracy
    ("td_vs_accuracy families twice", lambda e: lambda: tvlens.td_vs_accuracy(e.model, ["bitwise", "bitwise"],
                                                                              progress=False), ["families"]),
    ("td_vs_accuracy shots twice", lambda e: lambda: tvlens.td_vs_accuracy(e.model, "bitwise", shots=[2, 2],
                                                                           progress=False), ["shots"]),
    ("td_vs_accuracy shots='4'", lambda e: lambda: tvlens.td_vs_accuracy(e.model, "bitwise", shots="4",
                                                                         progress=False), ["shots"]),
    ("td_vs_accuracy k=True", lambda e: lambda: tvlens.td_vs_accuracy(e.model, "bitwise", k=True, progress=False),
     ["k"]),
    # files: pages, fragments, reports
    ("Page.save over a user's file", _page_over_existing, ["overwrite=True"]),
    ("Fragment.save over a user's file", _fragment_over_existing, ["overwrite=True"]),
    ("Fragment.save over name.html", _fragment_existing_html, ["overwrite=True"]),
    ("Page.save to a folder", lambda e: lambda: tvlens.views.Page("x").save(e.tmp), ["folder"]),
    ("Page.save to ''", lambda e: lambda: tvlens.views.Page("x").save(""), ["path"]),
    ("Page.save to None", lambda e: lambda: tvlens.views.Page("x").save(None), ["path"]),
    ("Page.save under a file", lambda e: lambda: tvlens.views.Page("x").save(e.tmp / "my_notes.md" / "p.html"),
     ["is a file"]),
    ("Page.save into a symlink loop", lambda e: (lambda: (e.tmp / "l.html").symlink_to(e.tmp / "l.html")
                                                 or (lambda: tvlens.views.Page("x").save(e.tmp / "l.html")))(),
     ["symbolic link loop"]),
]


@pytest.mark.parametrize("case_id,setup,names", ISSUE19_ERRORS, ids=[c[0] for c in ISSUE19_ERRORS])
def test_issue19_errors(env, limits, case_id, setup, names):
    err = _run_case(env, setup, names)
    assert "Traceback" not in str(err)


def test_issue19_cuda_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(TvlensError, match="device='cuda'.*no CUDA"):
        tvlens.load_model("bitwise", device="cuda")


def test_issue19_the_report_command_refuses_its_existing_report(env, capsys):
    from tvlens.views.report import report_filename

    (env.tmp / report_filename("default", None)).write_text("my edited report")
    rc, err = _cli(env, capsys, ["demo", "--out", str(env.tmp), "--n-per-task", "11"])
    assert rc == 2 and "--overwrite" in err and "Traceback" not in err
    (env.tmp / report_filename("default", "codes")).write_text("my edited report")
    rc, err = _cli(env, capsys, ["report", "--family", "codes", "--out", str(env.tmp)])
    assert rc == 2 and "--overwrite" in err


# --------------------------------------------------------------------------- issue 19: correct results
def test_issue19_numpy_integers_are_integers(shared):
    steps = tvlens.checkpoint_steps("bitwise")
    m = tvlens.load_model("bitwise", step=np.int64(steps[0]))
    assert tvlens.model_info(m).step == steps[0]
    small = build_model("shift", n_layers=np.int64(1), d_model=np.int32(16), n_heads=np.int64(2), seed=np.int64(3))
    assert small.cfg.n_layers == 1 and small.cfg.d_model == 16
    p = shared.fam.sample(np.int64(2), shots=np.int64(2), seed=np.uint8(1))
    assert torch.equal(p.tokens, shared.fam.sample(2, shots=2, seed=1).tokens)
    assert tvlens.stats.mean_ci(np.arange(10.0), n_boot=np.int64(50)).n_boot == 50


def test_issue19_spearman_and_r2_with_nan_are_nan_with_a_note():
    x, y = [1.0, 2.0, 3.0, 4.0, float("nan")], [1.0, 2.0, 3.0, 4.0, 5.0]
    for fn in (tvlens.stats.spearman_ci, tvlens.stats.r2_ci):
        iv = fn(x, y, n_boot=200)
        assert np.isnan(iv.estimate) and np.isnan(iv.lo) and np.isnan(iv.hi)  # never CI [1, 1]
        assert "NaN" in iv.note and "[4]" in iv.note
    iv = tvlens.stats.spearman_ci([1, 2, 3, 4], [1, 3, 2, 4], n_boot=200)  # and a clean one: scipy's value
    from scipy.stats import spearmanr

    assert float(iv.estimate) == pytest.approx(spearmanr([1, 2, 3, 4], [1, 3, 2, 4]).statistic) and iv.note == ""


def test_issue19_per_group_ci_matches_numpy_means():
    v = np.array([1.0, 2.0, 3.0, 5.0, 7.0, 11.0])
    lab = [0, 1, 2, 0, 1, 2]
    iv = tvlens.stats.per_group_ci(v, lab, 3, n_boot=100)
    assert np.allclose(iv.estimate, [3.0, 4.5, 7.0])
    iv4 = tvlens.stats.per_group_ci(v, lab, 4, n_boot=100)  # an empty group is NaN, not dropped or 0
    assert np.isnan(iv4.estimate[3]) and np.allclose(iv4.estimate[:3], [3.0, 4.5, 7.0])


def test_issue19_pages_overwrite_only_on_request(env):
    from tvlens.views.page import html_fragment

    p = html_fragment("<p>one</p>").save(env.tmp / "view.html")
    assert "one" in p.read_text()
    html_fragment("<p>two</p>").save(p, overwrite=True)
    assert "two" in p.read_text() and not list(env.tmp.glob("*.tmp"))
    q = tvlens.views.Page("t").save(env.tmp / "page")  # a name without suffix gets .html
    assert q.name == "page.html" and q.exists()


def test_issue19_a_shipped_model_keeps_its_family(shared):
    with pytest.raises(TvlensError):
        tvlens.tasks.register("codes", _Words, overwrite=True)
    m = tvlens.load_model("default")
    fam = tvlens.model_info(m).task_family()
    assert type(fam).__name__ == "Codes"
    acc = tvlens.icl_accuracy(m, fam.sample(10, shots=4, seed=0))
    assert acc.mean > 0.8  # the shipped model still reads its own family


def test_issue19_from_strings_with_the_models_own_words(shared):
    words = shared.prompts.str_tokens(0)
    q = int(shared.prompts.query_pos[0])
    p = tvlens.PromptSet.from_strings(shared.model, [" ".join(words[: q + 1])], [" " + words[q + 1]],
                                      labels=["own"])
    assert torch.equal(p.tokens[0, : q + 2], shared.prompts.tokens[0, : q + 2])


def test_issue19_rule_family_with_list_answers_still_works():
    fam = _rule_family(rules={"both": lambda xs: list(xs), "swap": lambda xs: xs[::-1]})()
    p = fam.sample(3, shots=2, seed=0)
    assert p.answers.shape == (6, 2)


def test_issue19_lora_alpha_scales_the_update(shared):
    kw = dict(layers=[0], steps=2, batch_size=6, n_eval_per_task=11, lora_rank=2, progress=False, seed=0)
    a = tvlens.finetune(shared.model, "bitwise", **kw)
    b = tvlens.finetune(shared.model, "bitwise", lora_alpha=2.0, **kw)  # = rank: the default
    c = tvlens.finetune(shared.model, "bitwise", lora_alpha=0.5, **kw)
    wa, wb, wc = (r.model.blocks[0].attn.W_Q.detach() for r in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_issue19_td_vs_accuracy_takes_numpy_shots(shared):
    res = tvlens.td_vs_accuracy(shared.model, "bitwise", shots=np.array([2]), n_per_task=11, k=3, progress=False)
    assert {r["shots"] for r in res.rows} == {2}


# --------------------------------------------------------------------------- issue 19: a killed run always resumes
class _Killed(BaseException):
    """A kill at one instant (not an Exception: nothing in tvlens may catch it)."""


KILL_TINY = {**TINY, "steps": 8, "eval_every": 1, "n_checkpoints": 4}


def _kill_at(monkeypatch, name: str, nth: int):
    """Kill the process-to-be right after the ``nth`` write of file ``name`` has gone through (os.replace)."""
    import tvlens.io as io

    real, seen = io.atomic_write_bytes, {"n": 0}

    def write(path, data):
        real(path, data)
        if Path(path).name == name:
            seen["n"] += 1
            if seen["n"] == nth:
                raise _Killed(name)

    monkeypatch.setattr(io, "atomic_write_bytes", write)
    import sys

    monkeypatch.setattr(sys.modules["tvlens.train"], "atomic_write_bytes", write)  # train.py's own reference to it

    def real_tensors(path, tensors, metadata=None, _real=io.atomic_save_tensors):
        _real(path, tensors, metadata)
        if Path(path).name == name:
            seen["n"] += 1
            if seen["n"] == nth:
                raise _Killed(name)

    monkeypatch.setattr(io, "atomic_save_tensors", real_tensors)


@pytest.fixture(scope="module")
def kill_reference(tmp_path_factory):
    model, _ = train(TrainConfig(**KILL_TINY), tmp_path_factory.mktemp("kill_ref") / "run", progress=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,nth", [
    ("resume.safetensors", 4),  # the new weights are in, the old sidecar beside them (the issue's 3 of 4 kills)
    ("resume.safetensors", 1),  # the very first resume state, before its sidecar
    ("step_000008.safetensors", 1),  # the last checkpoint without its sidecar
    ("train_config.json", 1),  # before any resume state: nothing was trained yet
    ("log.jsonl", 3),
])
def test_issue19_a_run_killed_between_two_writes_resumes(tmp_path, monkeypatch, kill_reference, name, nth):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _kill_at(m, name, nth)
        with pytest.raises(_Killed):
            train(TrainConfig(**KILL_TINY), run, progress=False)
    model, _ = train(TrainConfig(**KILL_TINY), run, progress=False)  # resumes: no --restart needed
    for k, v in model.state_dict().items():
        assert torch.equal(v, kill_reference[k]), k  # the same weights as a run never killed
    assert tvlens.model_info(tvlens.load_model(run)).step == 8
    assert json.loads((run / "resume.json").read_text())["step"] == 8  # the mirror caught up


@pytest.mark.skipif(os.environ.get("TVLENS_KILL_TEST") != "1",
                    reason="real SIGKILL loop (~2 min: 4 processes); run with TVLENS_KILL_TEST=1")
def test_issue19_kill_9_during_train_eval_every_1_always_resumes(tmp_path):
    """Real kills (SIGKILL after the 1st, 4th and 9th write of a launch) of ``tvlens train --eval-every 1``;
    each rerun continues without --restart, and the last one ends with the weights of a run never killed."""
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    argv = [sys.executable, "-m", "tvlens.cli", "train", "--family", "shift", "--out", str(run), "--steps", "8",
            "--batch-size", "6", "--n-layers", "1", "--d-model", "16", "--n-heads", "2", "--eval-every", "1",
            "--eval-n-per-task", "2", "--n-checkpoints", "4", "--warmup", "1", "--seed", "5", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(tvlens.__file__).parent.parent), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    state = lambda: sorted((f.name, f.stat().st_mtime_ns) for f in run.glob("*")) if run.exists() else []  # noqa: E731
    for writes in (1, 4, 9, None):  # None: let it finish
        p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        last, seen = state(), 0
        while p.poll() is None and writes is not None:
            now = state()
            if now != last:
                seen, last = seen + 1, now
                if seen >= writes:
                    p.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.002)
        err = p.communicate()[1].decode()
        if writes is None or p.returncode == 0:
            break
        assert p.returncode in (-signal.SIGKILL, 0), err[-2000:]
    assert p.returncode == 0, err[-2000:]
    ref = tmp_path / "ref"  # the same command never killed
    subprocess.run([*argv[:argv.index("--out") + 1], str(ref), *argv[argv.index("--out") + 2:]], env=env, check=True,
                   capture_output=True)
    model, reference = tvlens.load_model(run), tvlens.load_model(ref).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k


# --------------------------------------------------------------------------- issue 19: reports
def test_issue19_a_text_family_report_runs_and_says_what_it_leaves_out(tmp_path):
    from test_llm_study import _save_tiny_gpt2

    from tvlens.views.report import build_report

    folder = _save_tiny_gpt2(tmp_path / "gpt")
    rep = build_report(str(folder), "lexical", n_per_task=12, shots=2, tsne=False, emergence=False)
    notes = " ".join(rep.notes)
    assert "no task-vector patching" in notes  # said, not a traceback
    assert "12 prompts per task" in notes  # TD at another number of prompts than the demo's 100: said
    assert dict(rep.summary_rows)["patching"].startswith("not run")
    assert rep.results["decodability"].td.shape[0] == 3  # TD per layer of the 2-layer model: computed


def test_issue19_report_and_demo_sample_the_same_number_of_prompts():
    import argparse

    from tvlens.cli import build_parser

    p = build_parser()
    rep = p.parse_args(["report"])
    demo = p.parse_args(["demo"])
    assert rep.n_per_task == demo.n_per_task == 100  # TD figures compare (k-NN TD depends on prompts per task)
    assert isinstance(rep, argparse.Namespace) and rep.patching_per_task == 20


# --------------------------------------------------------------------------- issue 19: circuits, TD, emergence
def _edge_scores(env, n_scores=None, per_prompt=True, **notes):
    from tvlens.circuits import graph_of

    edges = graph_of(env.model).edges
    E = len(edges) if n_scores is None else n_scores
    n = len(env.prompts)
    return tvlens.EdgeScores(scores=torch.zeros(E), edges=edges, method="eap-ig", metric="logprob",
                             n_layers=env.model.cfg.n_layers, n_heads=env.model.cfg.n_heads,
                             per_prompt=torch.randn(n, E) if per_prompt else None, notes=dict(notes))


def _own_prompts(env):
    p = env.prompts
    return tvlens.PromptSet.from_tokens(p.tokens[:, : int(p.query_pos[0]) + 1], answers=p.answers, labels=p.labels,
                                        task_names=p.task_names)


ISSUE19_CIRCUIT_ERRORS = [
    ("edge_attribution ig_steps=10^6", lambda e: lambda: tvlens.edge_attribution(e.model, e.prompts, ig_steps=10**6,
                                                                                 progress=False), ["ig_steps"]),
    ("head_attribution eap-ig ig_steps=10^6", lambda e: lambda: tvlens.head_attribution(
        e.model, e.prompts, method="eap-ig", ig_steps=10**6, progress=False), ["ig_steps"]),
    ("edge_attribution ig_steps=0", lambda e: lambda: tvlens.edge_attribution(e.model, e.prompts, ig_steps=0,
                                                                              progress=False), ["ig_steps"]),
    ("edge_attribution ig_steps=2.0", lambda e: lambda: tvlens.edge_attribution(e.model, e.prompts, ig_steps=2.0,
                                                                                progress=False), ["ig_steps"]),
    ("edge_attribution path-patch with ig_steps", lambda e: lambda: tvlens.edge_attribution(
        e.model, e.prompts, method="path-patch", ig_steps=5, progress=False), ["ig_steps"]),
    ("edge_attribution path-patch with positions", lambda e: lambda: tvlens.edge_attribution(
        e.model, e.prompts, method="path-patch", positions="query", progress=False), ["positions"]),
    ("edge_attribution path-patch with qk_fix", lambda e: lambda: tvlens.edge_attribution(
        e.model, e.prompts, method="path-patch", qk_fix=True, progress=False), ["qk_fix"]),
    ("head_attribution dla with ig_steps", lambda e: lambda: tvlens.head_attribution(
        e.model, e.prompts, method="dla", ig_steps=5, progress=False), ["ig_steps"]),
    ("head_attribution cie with ig_steps", lambda e: lambda: tvlens.head_attribution(
        e.model, e.prompts, method="cie", ig_steps=5, progress=False), ["ig_steps"]),
    ("head_attribution dla with corrupted", lambda e: lambda: tvlens.head_attribution(
        e.model, e.prompts, method="dla", corrupted=e.prompts, progress=False), ["corrupted"]),
    ("head_attribution cie with ablation='zero'", lambda e: lambda: tvlens.head_attribution(
        e.model, e.prompts, method="cie", ablation="zero", progress=False), ["ablation"]),
    ("head_attribution dla with positions='query'", lambda e: lambda: tvlens.head_attribution(
        e.model, e.prompts, method="dla", positions="query", progress=False), ["positions"]),
    ("head_attribution patch with atp_site='z'", lambda e: lambda: tvlens.head_attribution(
        e.model, e.prompts, method="patch", atp_site="z", progress=False), ["atp_site"]),
    ("head_attribution cie with qk_fix=False", lambda e: lambda: tvlens.head_attribution(
        e.model, e.prompts, method="cie", qk_fix=False, progress=False), ["qk_fix"]),
    ("edge_attribution seed='1'", lambda e: lambda: tvlens.edge_attribution(e.model, e.prompts, seed="1",
                                                                            progress=False), ["seed"]),
    ("edge_attribution method=None", lambda e: lambda: tvlens.edge_attribution(e.model, e.prompts, method=None,
                                                                               progress=False), ["method"]),
    ("edge_attribution batch_size=0", lambda e: lambda: tvlens.edge_attribution(e.model, e.prompts, batch_size=0,
                                                                                progress=False), ["batch_size"]),
    ("EdgeScores 3 scores for every edge", lambda e: lambda: _edge_scores(e, n_scores=3), ["scores", "per edge"]),
    ("EdgeScores an edge outside the graph", lambda e: lambda: tvlens.EdgeScores(
        scores=torch.zeros(1), edges=[("L9H0", "logits")], method="eap", metric="logprob", n_layers=4, n_heads=4),
     ["L9H0"]),
    ("EdgeScores.with_ci n_boot=10^6", lambda e: (lambda s: lambda: s.with_ci(n_boot=10**6))(_edge_scores(e)),
     ["n_boot"]),
    ("HeadScores.with_ci n_boot=10^7", lambda e: (lambda h: lambda: h.with_ci(n_boot=10**7))(
        tvlens.head_attribution(e.model, e.prompts, method="dla", progress=False)), ["n_boot"]),
    ("DecodabilityResult.with_null n_perm=10^9", lambda e: (lambda d: lambda: d.with_null(n_perm=10**9))(
        tvlens.task_decodability(e.enc, k=2)), ["n_perm"]),
    ("EdgeScores.with_ci n_boot=0", lambda e: (lambda s: lambda: s.with_ci(n_boot=0))(_edge_scores(e)), ["n_boot"]),
    ("EdgeScores.with_ci level=1.5", lambda e: (lambda s: lambda: s.with_ci(level=1.5))(_edge_scores(e)), ["level"]),
    ("EdgeScores.with_ci seed='1'", lambda e: (lambda s: lambda: s.with_ci(seed="1"))(_edge_scores(e)), ["seed"]),
    ("EdgeScores.save over existing", lambda e: (lambda s: (s.save(e.tmp / "edges"), lambda: s.save(e.tmp / "edges"))[1])(
        _edge_scores(e)), ["overwrite=True"]),
    ("faithfulness(HeadScores)", lambda e: (lambda h: lambda: tvlens.faithfulness(e.model, e.prompts, h))(
        tvlens.head_attribution(e.model, e.prompts, method="dla", progress=False)), ["EdgeScores"]),
    ("faithfulness scores of another model", lambda e: (lambda s: lambda: tvlens.faithfulness(e.model, e.prompts, s))(
        _edge_scores(e, model_fingerprint="0123456789ab")), ["another model"]),
    ("faithfulness n_random=10^6", lambda e: (lambda s: lambda: tvlens.faithfulness(e.model, e.prompts, s,
                                                                                   n_random=10**6))(_edge_scores(e)),
     ["n_random"]),
    ("faithfulness seed='0'", lambda e: (lambda s: lambda: tvlens.faithfulness(e.model, e.prompts, s, seed="0"))(
        _edge_scores(e)), ["seed"]),
    ("path_patching edges a string", lambda e: lambda: tvlens.path_patching(e.model, e.prompts, edges="L0H1",
                                                                            progress=False), ["edges"]),
    ("path_patching edges of one name", lambda e: lambda: tvlens.path_patching(e.model, e.prompts, edges=[("L0H1",)],
                                                                               progress=False), ["edges"]),
    ("path_patching edges of ints", lambda e: lambda: tvlens.path_patching(e.model, e.prompts, edges=[(1, 2)],
                                                                           progress=False), ["edges"]),
    ("path_patching the same edge twice", lambda e: lambda: tvlens.path_patching(
        e.model, e.prompts, edges=[("L0H1", "logits"), ("L0H1", "logits")], progress=False), ["more than once"]),
    ("path_patching seed=-1", lambda e: lambda: tvlens.path_patching(e.model, e.prompts, seed=-1, progress=False),
     ["seed"]),
    ("own prompts, head_attribution cie", lambda e: (lambda p: lambda: tvlens.head_attribution(
        e.model, p, method="cie", progress=False))(_own_prompts(e)), ["corrupted="]),
    ("own prompts, head_attribution patch", lambda e: (lambda p: lambda: tvlens.head_attribution(
        e.model, p, method="patch", progress=False))(_own_prompts(e)), ["corrupted="]),
    ("own prompts, head_attribution eap-ig", lambda e: (lambda p: lambda: tvlens.head_attribution(
        e.model, p, method="eap-ig", progress=False))(_own_prompts(e)), ["corrupted="]),
    ("own prompts, edge_attribution", lambda e: (lambda p: lambda: tvlens.edge_attribution(
        e.model, p, progress=False))(_own_prompts(e)), ["corrupted="]),
    ("TD null=10^8", lambda e: lambda: tvlens.task_decodability(e.enc, k=2, null=10**8), ["null"]),
    ("TD null=True", lambda e: lambda: tvlens.task_decodability(e.enc, k=2, null=True), ["null"]),
    ("TD null=-1", lambda e: lambda: tvlens.task_decodability(e.enc, k=2, null=-1), ["null"]),
    ("emergence(model)", lambda e: lambda: tvlens.emergence(e.model, progress=False), ["checkpoints"]),
    ("emergence steps=[999]", lambda e: lambda: tvlens.emergence("bitwise", steps=[999], progress=False), ["999"]),
    ("emergence steps twice", lambda e: lambda: tvlens.emergence("bitwise", steps=[0, 0], progress=False), ["steps"]),
    ("emergence steps='0'", lambda e: lambda: tvlens.emergence("bitwise", steps="0", progress=False), ["steps"]),
    ("emergence pairs with one step twice", lambda e: lambda: tvlens.emergence([(1, e.model), (1, e.model)],
                                                                               progress=False), ["steps"]),
]


@pytest.mark.parametrize("case_id,setup,names", ISSUE19_CIRCUIT_ERRORS, ids=[c[0] for c in ISSUE19_CIRCUIT_ERRORS])
def test_issue19_circuit_and_td_errors(env, limits, case_id, setup, names):
    _run_case(env, setup, names)


def _identical_encodings(n_per_task: int = 11, reverse: bool = False):
    labels = torch.tensor([0] * n_per_task + [1] * n_per_task)
    if reverse:
        labels = labels.flip(0)
    return tvlens.TaskEncodings(acts=torch.zeros(len(labels), 1, 4), layers=[0], labels=labels, task_names=["a", "b"])


def _expected_td_identical(n_per_task: int, k: int) -> float:
    """Exact expected TD when every encoding is the same point: a prompt's k neighbours are a uniform draw of
    k of the other prompts (n_per_task - 1 of its task, n_per_task of the other); vote ties go to task 0."""
    from scipy.stats import hypergeom

    total = 2 * n_per_task - 1
    same = hypergeom(total, n_per_task - 1, k)  # neighbours of the prompt's own task
    p0 = sum(same.pmf(j) for j in range(k + 1) if j >= k - j)  # task 0 wins majority or tie
    p1 = sum(same.pmf(j) for j in range(k + 1) if j > k - j)  # task 1 needs a strict majority
    return (p0 + p1) / 2


def test_issue19_td_with_distance_ties_does_not_depend_on_prompt_order():
    k, n = 10, 11
    want = _expected_td_identical(n, k)
    runs = {rev: [float(tvlens.task_decodability(_identical_encodings(n, rev), k=k, seed=s, ci=None).td[0])
                  for s in range(40)] for rev in (False, True)}
    for rev, tds in runs.items():  # the issue's 0.091 vs 0.909: now both orders average the exact expectation
        assert abs(np.mean(tds) - want) < 0.05, (rev, np.mean(tds), want)
    res = tvlens.task_decodability(_identical_encodings(n), k=k, ci=None)
    assert "ties" in res.notes and "random" in res.notes["ties"] and res.notes["boundary_ties"][0] == 1.0


def test_issue19_td_equals_scikit_learn_without_ties():
    from sklearn.model_selection import LeaveOneOut, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(20)
    acts = torch.randn(60, 2, 5, generator=g, dtype=torch.float64).float() + labels[:, None, None] * 0.7
    enc = tvlens.TaskEncodings(acts=acts, layers=[0, 1], labels=labels, task_names=["a", "b", "c"])
    res = tvlens.task_decodability(enc, k=7, ci=None, seed=3)
    for i in range(2):
        pred = cross_val_predict(KNeighborsClassifier(7), acts[:, i].double().numpy(), labels.numpy(), cv=LeaveOneOut())
        assert float(res.td[i]) == pytest.approx(float((pred == labels.numpy()).mean()), abs=1e-6)  # float32 TD
    assert "ties" not in res.notes


def test_issue19_numpy_ig_steps_and_ks_are_integers(shared):
    a = tvlens.edge_attribution(shared.model, shared.prompts, ig_steps=np.int64(2), progress=False)
    b = tvlens.edge_attribution(shared.model, shared.prompts, ig_steps=2, progress=False)
    assert torch.allclose(a.scores, b.scores) and a.notes["ig_steps"] == 2
    assert a.notes["model_fingerprint"]  # faithfulness can tell the model the scores came from
    f = tvlens.faithfulness(shared.model, shared.prompts, a, ks=[np.int64(1), 4], n_random=np.int64(1))
    assert f.ks == [1, 4]


ISSUE19_KEYWORDS = [
    ("finetune lora_rnak= (a typo)", lambda e: lambda: tvlens.finetune(e.model, "bitwise", lora_rnak=2, progress=False),
     ["lora_rnak", "'lora_rank'"]),
    ("finetune without a family", lambda e: lambda: tvlens.finetune(e.model, progress=False), ["family"]),
    ("build_report n_per_tsak= (a typo)", lambda e: lambda: tvlens.views.build_report(e.model, n_per_tsak=10),
     ["n_per_tsak", "'n_per_task'"]),
]


@pytest.mark.parametrize("case_id,setup,names", ISSUE19_KEYWORDS, ids=[c[0] for c in ISSUE19_KEYWORDS])
def test_issue19_keywords(env, case_id, setup, names):
    _run_case(env, setup, names)
