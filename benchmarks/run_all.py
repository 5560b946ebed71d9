"""Every benchmark in one command (``make bench``): each compares against its peer in the same run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent

for script in ("bench_extract.py", "bench_patching.py", "encoding_report.py", "patching_sites_report.py",
               "bench_attribution.py", "readme_figures.py", "bench_circuits.py"):
    print(f"== {script}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *sys.argv[1:]], check=True)
