"""The ``tvlens`` command: ``tvlens demo``, ``tvlens report``, ``tvlens train``, ``tvlens list``."""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from dataclasses import asdict, fields
from typing import Any

import torch


def _parse_value(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def _family_params(items: list[str]) -> dict[str, Any]:
    from tvlens.errors import ConfigError

    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k.strip():
            raise ConfigError(f"--param expects KEY=VALUE (e.g. --param n_bits=5), got {it!r}")
        if k in out:
            raise ConfigError(f"--param {k} is given twice ({out[k]!r} and {v!r}); give each parameter once")
        out[k.strip()] = _parse_value(v)
    return out


def _int_type(minimum: int, what: str):
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {n}")
        return n

    parse.__name__ = what
    return parse


def _finite_float(v: str) -> float:
    import math

    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number, got {v!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {v!r}")
    return x


POSITIVE = _int_type(1, "an integer >= 1")
SEED = _int_type(0, "a non-negative integer seed")


def _read_config(path: str) -> dict[str, Any]:
    from pathlib import Path

    from tvlens.errors import ConfigError

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--config {path!r}: no such file" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path!r} is not valid JSON ({e}); it must be an object of TrainConfig fields") from e
    if not isinstance(d, dict):
        raise ConfigError(f"--config {path!r} holds a JSON {type(d).__name__}; it must be an object of TrainConfig fields")
    return d


def cmd_train(args: argparse.Namespace) -> int:
    import re

    from tvlens.errors import ConfigError
    from tvlens.train import TrainConfig, train

    kw: dict[str, Any] = {}
    if args.config:
        kw.update(_read_config(args.config))
    kw.update({f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None})
    if args.family:
        kw["family"] = {"name": args.family, **_family_params(args.param)}
    elif args.param:
        raise ConfigError("--param needs --family NAME (the family whose parameter it sets)")
    elif "family" not in kw:
        raise ConfigError("tvlens train: give --family NAME or --config FILE")
    try:
        cfg = TrainConfig.from_dict(kw, where=f"--config {args.config!r}" if args.config else "tvlens train")
    except ConfigError as e:  # name the flag, not the dataclass field
        raise ConfigError(re.sub(r"TrainConfig: (\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e))) from e
    if args.threads:
        torch.set_num_threads(args.threads)
    callback = None
    if getattr(args, "track_encoding", False):
        from tvlens.encoding import encoding_callback

        callback = encoding_callback(cfg)
    t0 = time.perf_counter()
    model, history = train(
        cfg, args.out, resume=not args.restart, overwrite=args.restart, progress=not args.no_progress,
        command=args.command_line, callback=callback, _cli=True,
    )
    last = history[-1] if history else {}
    if not history:
        step = getattr(getattr(model, "tvlens_info", None), "step", None)
        print(f"tvlens train: {args.out} is already trained to step {step}; give --steps N (more than {step}) "
              "to extend it", file=sys.stderr)
    print(json.dumps({"out": args.out, "seconds": round(time.perf_counter() - t0, 1), "final": last}, indent=1))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from tvlens import tasks
    from tvlens.models import ALIASES, checkpoint_steps, read_sidecar, shipped_models

    print("task families:")
    for name, desc in tasks.describe().items():
        print(f"  {name:24s} {desc}")
    print("shipped models:")
    for name in shipped_models():
        steps = checkpoint_steps(name)
        from tvlens.models import CHECKPOINT_DIR

        meta = read_sidecar(CHECKPOINT_DIR / name / f"step_{steps[-1]:06d}")
        mean = meta.get("metrics", {}).get("mean")
        alias = [a for a, t in ALIASES.items() if t == name]
        print(f"  {name:24s} steps {steps[0]}..{steps[-1]} ({len(steps)} checkpoints)  "
              f"held-out mean {mean:.3f}" + (f"  (alias: {', '.join(alias)})" if alias else ""))
    from tvlens import gguf_models

    print(f"pretrained language models (GGUF, dequantized once into {gguf_models.cache_root()}):")
    for name, desc in gguf_models.describe().items():
        print(f"  {name:24s} {desc}")
    return 0


@contextlib.contextmanager
def _threads(n: int):
    """At most ``n`` CPU threads for torch and for OpenMP/BLAS pools (scikit-learn's t-SNE), restored after.

    The shipped models are tiny: more threads barely help, and on a shared machine spinning threads
    made ``tvlens demo`` 3-4x slower (68 s with 2 threads against 19 s with 1, same load)."""
    if n < 1:
        from tvlens.errors import ConfigError

        raise ConfigError(f"--threads must be an integer >= 1, got {n}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(limits=n)
    except ImportError:  # pragma: no cover - scikit-learn depends on threadpoolctl
        limits = contextlib.nullcontext()
    try:
        with limits:
            yield
    finally:
        torch.set_num_threads(old)


def _check_out_folder(out: str, flag: str = "--out", filename: str | None = None, overwrite: bool = False) -> None:
    """A report folder that cannot be written is refused before any work (not after the analyses)."""
    from pathlib import Path

    from tvlens.checks import check_out_path, check_writable_parent
    from tvlens.errors import ConfigError

    p = check_out_path(out, flag)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {out!r} is a file, not a folder; give a folder for the report")
    check_writable_parent(Path(p) / "report.html", flag)
    if filename is not None and (p / filename).exists() and not overwrite:
        from tvlens.errors import OverwriteError

        raise OverwriteError(f"{flag} {out!r} already holds {filename}; tvlens does not overwrite files: give another "
                             "--out, or pass --overwrite to replace that report")


def cmd_demo(args: argparse.Namespace) -> int:
    if not args.no_report:
        from tvlens.views.report import report_filename

        _check_out_folder(args.out, filename=report_filename(args.model, None), overwrite=args.overwrite)
    with _threads(args.threads):
        return _demo(args)


def _demo(args: argparse.Namespace) -> int:
    import tvlens

    t0 = time.perf_counter()
    model = tvlens.load_model(args.model)
    info = tvlens.model_info(model)
    family = info.task_family()
    if family is None:
        raise SystemExit(f"tvlens demo: model {args.model!r} records no task family; use a tvlens model")
    prompts = family.sample(args.n_per_task, shots=args.shots, seed=args.seed)
    acc = tvlens.icl_accuracy(model, prompts)
    from tvlens.backends import get_backend

    print(f"model {args.model!r} ({info.source}, step {info.step}): {get_backend(model).n_layers} layers, "
          f"d_model {get_backend(model).d_model}, family {family!r}")
    print(f"{len(prompts)} fresh prompts ({args.shots}-shot, seed {args.seed}); e.g.\n  {prompts.render(0)}")
    print(acc.to_dataframe().to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"mean {acc.metric} (non-null tasks): {acc.mean:.3f} [{acc.mean_ci[0]:.3f}, {acc.mean_ci[1]:.3f}] "
          "(95% bootstrap CI over prompts)")
    enc = tvlens.extract(model, prompts, progress=False)
    td = tvlens.task_decodability(enc)
    steps = tvlens.checkpoint_steps(args.model) if args.model in tvlens.shipped_models() + ["default"] else []
    td0 = None
    if steps and steps[0] == 0:
        td0 = tvlens.task_decodability(tvlens.load_model(args.model, step=0), prompts)
    print(f"task decodability (leave-one-out {td.k}-NN at the query, chance {td.chance:.3f}):")
    for i, layer in enumerate(td.layers):
        ctrl = f"   untrained (step 0): {float(td0.td[i]):.3f}" if td0 is not None else ""
        print(f"  layer {layer}: {float(td.td[i]):.3f} [{float(td.td_ci[0, i]):.3f}, {float(td.td_ci[1, i]):.3f}]{ctrl}")
    print(f"best layer {td.best_layer}: TD {td.best_td:.3f}   [{time.perf_counter() - t0:.1f}s]")
    if args.no_report:
        return 0
    from tvlens.views.report import write_report

    print("task-vector patching, head attribution, position sweep, emergence and the report ...", flush=True)
    path, rep = write_report(args.out, args.model, None, n_per_task=args.n_per_task, shots=args.shots, seed=args.seed,
                             patching_per_task=min(args.n_per_task, 20), head_method=args.head_method,
                             emergence_steps=8, emergence_per_task=15, overwrite=args.overwrite,
                             precomputed={"accuracy": acc, "encodings": enc, "decodability": td})
    _print_summary(rep, path)
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


def _print_summary(rep, path) -> None:
    width = max(len(k) for k, _ in rep.summary_rows)
    print("summary:")
    for k, v in rep.summary_rows:
        print(f"  {k:<{width}}  {v}")
    for note in rep.notes:
        print(f"  note: {note}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in rep.timings.items()))
    size = path.stat().st_size / 1e6
    print(f"report ({len(rep.page.sections)} views, {size:.1f} MB, self-contained, opens offline): {path}")


def cmd_report(args: argparse.Namespace) -> int:
    from tvlens.views.report import report_filename, write_report

    t0 = time.perf_counter()
    _check_out_folder(args.out, filename=report_filename(args.model, args.family), overwrite=args.overwrite)
    with _threads(args.threads):
        path, rep = write_report(args.out, args.model, args.family, n_per_task=args.n_per_task, shots=args.shots,
                                 seed=args.seed, patching_per_task=args.patching_per_task, head_method=args.head_method,
                                 tsne=not args.no_tsne, emergence=not args.no_emergence, prompt=args.prompt,
                                 overwrite=args.overwrite)
    _print_summary(rep, path)
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tvlens", description="Task vectors and in-context learning, on TransformerLens.")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (anywhere on the line, repeatable): a module that registers your own "
                        "task families with tvlens.tasks.register, e.g. --import mytasks")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="the main job on the shipped default model")
    d.add_argument("--model", default="default")
    d.add_argument("--n-per-task", type=POSITIVE, default=100)
    d.add_argument("--shots", type=int, default=4)
    d.add_argument("--seed", type=SEED, default=12345)
    d.add_argument("--out", default="out", help="folder of the HTML report (default: out)")
    d.add_argument("--head-method", default="dla", help="head attribution method for the report (default: dla)")
    d.add_argument("--no-report", action="store_true", help="only accuracy and TD; no patching, heads or report")
    d.add_argument("--overwrite", action="store_true", help="replace a report of the same name in --out")
    d.add_argument("--threads", type=POSITIVE, default=1, help="CPU threads (default 1: the models are tiny)")
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("report", help="one self-contained HTML file with every view of a model on a task family")
    r.add_argument("--model", default="default", help="a shipped model name, a run folder or a checkpoint")
    r.add_argument("--family", default=None, help="task family (default: the one the model records)")
    r.add_argument("--out", default="out", help="folder to write the report into (default: out)")
    r.add_argument("--n-per-task", type=POSITIVE, default=100,
                   help="prompts per task for accuracy and TD (default 100, as the demo and README: k-NN TD rises "
                        "with prompts per task, so figures compare only at the same number)")
    r.add_argument("--shots", type=int, default=4)
    r.add_argument("--seed", type=SEED, default=12345)
    r.add_argument("--patching-per-task", type=POSITIVE, default=20,
                   help="prompts per task for run_patching (default 20, as the demo)")
    r.add_argument("--head-method", default="dla")
    r.add_argument("--prompt", type=int, default=0, help="the prompt whose attention the head views show")
    r.add_argument("--no-tsne", action="store_true")
    r.add_argument("--no-emergence", action="store_true", help="skip the views across training checkpoints")
    r.add_argument("--overwrite", action="store_true", help="replace a report of the same name in --out")
    r.add_argument("--threads", type=POSITIVE, default=1, help="CPU threads (default 1: the models are tiny)")
    r.set_defaults(func=cmd_report)

    t = sub.add_parser("train", help="train a small hooked transformer on a task family")
    t.add_argument("--family", help="a family name (tvlens list)")
    t.add_argument("--config", help="a JSON TrainConfig (e.g. configs/sparse_regression_paper.json); flags override it")
    t.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a family parameter")
    t.add_argument("--out", required=True, help="run folder: log.jsonl, checkpoints, resume state")
    defaults = asdict(__import__("tvlens.train", fromlist=["TrainConfig"]).TrainConfig())
    for f in fields(__import__("tvlens.train", fromlist=["TrainConfig"]).TrainConfig):
        if f.name == "family":
            continue
        typ = type(defaults[f.name]) if defaults[f.name] is not None else int
        typ = _finite_float if typ is float else SEED if f.name == "seed" else typ
        typ = json.loads if f.name == "curriculum" else typ  # a JSON object on the command line
        t.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=typ, default=None,
                       help=f"default {defaults[f.name]}")
    t.add_argument("--threads", type=POSITIVE, default=None, help="torch CPU threads")
    t.add_argument("--restart", action="store_true",
                   help="start afresh in a --out that holds a run or other files: removes only tvlens' own files "
                        "there (step_*, log.jsonl, train_config.json, resume.*); other files are kept")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--track-encoding", action="store_true", help="log task decodability per layer at each eval")
    t.set_defaults(func=cmd_train)

    ls = sub.add_parser("list", help="task families and shipped models")
    ls.set_defaults(func=cmd_list)
    return p


def _split_imports(argv: list[str]) -> tuple[list[str], list[str]]:
    """``--import MODULE`` (anywhere, repeatable) taken out of ``argv``: the modules, and the rest."""
    mods, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--import":
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                raise SystemExit("tvlens: --import expects a module name (e.g. --import mytasks)")
            mods.append(argv[i + 1])
            i += 2
            continue
        if a.startswith("--import="):
            mods.append(a.split("=", 1)[1])
        else:
            rest.append(a)
        i += 1
    return mods, rest


def import_user_modules(modules: list[str]) -> None:
    """Import the modules that register your own task families (``tvlens.tasks.register``); the current
    folder is on the path, as for ``python -m``. A ``path/to/file.py`` is imported from that file."""
    import importlib
    import importlib.util
    import os
    from pathlib import Path

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for mod in modules:
        try:
            if mod.endswith(".py"):
                path = Path(mod)
                if not path.is_file():
                    raise SystemExit(f"tvlens: --import {mod}: no such file")
                spec = importlib.util.spec_from_file_location(path.stem, path)
                module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
                sys.modules[path.stem] = module
                spec.loader.exec_module(module)  # type: ignore[union-attr]
            else:
                importlib.import_module(mod)
        except ImportError as e:
            raise SystemExit(f"tvlens: --import {mod}: cannot import it ({e}); give a module on the path (run from "
                             "its folder or set PYTHONPATH) or a path to a .py file") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    imports, rest = _split_imports(argv)
    args = build_parser().parse_args(rest)
    args.command_line = "tvlens " + shlex.join(argv)
    from tvlens.errors import TvlensError

    try:
        import_user_modules(imports)
        return int(args.func(args) or 0)
    except TvlensError as e:
        print(f"tvlens: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
