"""``import tvlens`` is light: heavy parts load on first use (prints the times; no timed assertion)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import sys, time
t = time.perf_counter(); import tvlens; t_import = time.perf_counter() - t
heavy = [m for m in ("torch", "transformer_lens", "transformers") if m in sys.modules]
t = time.perf_counter(); p = tvlens.tasks.get("categories").sample(2, shots=1); t_tasks = time.perf_counter() - t
after_tasks = "transformer_lens" in sys.modules
print(f"import tvlens {t_import:.2f}s; sampling prompts (torch) +{t_tasks:.2f}s; benchmarks/bench_import.py: more")
print("HEAVY", heavy, after_tasks, sorted(set(tvlens.__all__) - set(dir(tvlens))))
"""


def test_functions_named_like_their_modules_stay_functions():
    import tvlens
    import tvlens.finetune
    import tvlens.train  # noqa: F401 - the import sets the package attribute; the function must win

    assert callable(tvlens.train) and callable(tvlens.finetune) and tvlens.train.__module__ == "tvlens.train"


def test_import_is_lazy_and_public_names_stay():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True).stdout
    print(out)
    heavy = out.split("HEAVY", 1)[1].strip()
    assert heavy == "[] False []", heavy  # nothing heavy at import, no TransformerLens to sample prompts
