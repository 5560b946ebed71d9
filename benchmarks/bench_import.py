"""How long ``import tvlens`` takes, and what the first use of each part costs (fresh processes).

    .venv/bin/python benchmarks/bench_import.py [--repeat 3]

Each line runs a fresh interpreter (``python -X importtime``) and reports the cumulative import time of the
statement's modules, best of ``--repeat`` runs. ``import tvlens`` imports nothing heavy: the public names are
loaded on first use (``tvlens/__init__.py``'s module-level ``__getattr__``), so sampling prompts costs torch
(~1.4 s here) and loading a model costs TransformerLens + transformers (several seconds more).
Measured on the shared 2-core development machine (2026-12-01, ``-X importtime`` cumulative, under load):
``import tvlens`` 10.2 s in issue 12, 3.8-6.4 s on main before the backends merge, 2.25 s on main after it
(torch still eager), 0.006-0.011 s with the lazy package; torch (~1.4-2.5 s) comes with the first PromptSet
or family, TransformerLens with the first model.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

CASES = {
    "import tvlens": "import tvlens",
    "tvlens.tasks.get('codes').sample(...)": "import tvlens; tvlens.tasks.get('codes').sample(2, shots=2)",
    "from tvlens import PromptSet": "from tvlens import PromptSet",
    "tvlens.run_patching": "import tvlens; tvlens.run_patching",
    "tvlens.load_model (TransformerLens)": "import tvlens; tvlens.load_model",
}


def import_seconds(stmt: str) -> tuple[float, list[str]]:
    """Total import time of ``stmt`` in a fresh interpreter (seconds), and its heaviest top-level imports."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", stmt], capture_output=True, text=True, env=env,
                       check=True)
    total, tops = 0, []
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)", line)
        if m and not m.group(3):  # top-level imports of the statement
            total += int(m.group(2))
            tops.append((int(m.group(2)), m.group(4)))
    return total / 1e6, [f"{name} {us / 1e6:.2f}s" for us, name in sorted(tops, reverse=True)[:3]]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    for label, stmt in CASES.items():
        runs = [import_seconds(stmt) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r[0])
        print(f"{label:48s} {best[0]:6.2f} s   (heaviest: {', '.join(best[1])})")


if __name__ == "__main__":
    main()
