#!/usr/bin/env bash
# The speed table of benchmarks/bench_speed.py on CUDA, in one process (TL 4.3 + nnsight), in under 8 minutes
# on one H100/H200: two rounds, the GPT-2-small-shaped model at its full 12 blocks.
#
# Needs a python3 whose torch sees a GPU (PYTHON=..., default python3). A machine without network (the lent
# GPU machines) gets the packages its image lacks as wheels, made here on a machine with PyPI:
#     bash benchmarks/gpu.sh --download      # writes .whl/ (git-ignored; about 20 MB)
# and installs them at the start of the run (into /tmp/site, nothing else is touched):
#     bash benchmarks/gpu.sh                 # prints the table; the raw rows go to $OUT or ./gpu-speed.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# What the GPU image (KINDS.md: PyTorch, transformers, numpy, pandas, einops, jaxtyping, ...) lacks or holds in
# another version: the TL 4.3 line's pinned set (constraints-tl4.txt) plus nnsight, less what the image has,
# except the Hugging Face stack, carried at the pinned versions TransformerLens 4.3 was tested with.
IMAGE_HAS="torch triton numpy pandas scipy scikit-learn joblib threadpoolctl einops jaxtyping wadler-lindig pyyaml
requests tqdm regex packaging filelock fsspec jinja2 markupsafe sympy mpmath networkx typing-extensions pillow psutil
protobuf pyarrow rich pygments markdown-it-py mdurl click typer shellingham certifi idna urllib3 charset-normalizer
anyio h11 httpx httpcore attrs six python-dateutil cloudpickle xxhash multidict yarl aiohttp aiosignal frozenlist
propcache annotated-doc accelerate sentencepiece tiktoken tabulate narwhals pytest pluggy iniconfig ruff zipp
matplotlib contourpy cycler fonttools kiwisolver pyparsing lxml wrapt msgpack"
FORCE="transformers tokenizers huggingface-hub safetensors"
# required on paper, never imported by the benchmark (training logs, figures, hub downloads): 40 MB of wheels
SKIP="wandb plotly zstandard hf-xet"

if [ "${1:-}" = "--download" ]; then
  mkdir -p .whl
  norm() { echo "$1" | tr 'A-Z_.' 'a-z--'; }
  # what tvlens, TransformerLens 4.3 and nnsight need at run time (their requirements, walked in the
  # benchmark's venv, which make bench-speed creates), at the versions installed there
  VPY=${VENV_PY:-benchmarks/.venv-nnsight/bin/python}
  "$VPY" - > .whl/requirements.txt <<'PYEOF'
import re
from importlib.metadata import PackageNotFoundError, requires, version
seen, todo = {}, ["tvlens", "transformer-lens", "nnsight"]
while todo:
    n = todo.pop()
    k = re.sub(r"[-_.]+", "-", n).lower()
    if k in seen:
        continue
    try:
        seen[k] = version(n)
    except PackageNotFoundError:
        seen[k] = None
        continue
    todo += [re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0] for r in requires(n) or [] if "extra ==" not in r]
print("\n".join(f"{k}=={v}" for k, v in sorted(seen.items()) if v and k != "tvlens"))
PYEOF
  while read -r req; do
    name=$(norm "${req%%==*}")
    case " $(norm "$FORCE") " in *" $name "*) ;; *)
      case " $(echo $IMAGE_HAS | tr 'A-Z_.' 'a-z--') " in *" $name "*) continue ;; esac
      case " $SKIP " in *" $name "*) continue ;; esac
      case "$name" in torch|nvidia-*|triton|cuda-*) continue ;; esac ;;
    esac
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "${req%+*}" 2>/dev/null || echo "gpu.sh: no wheel for $req (skipped; fine unless an import fails there)" >&2
  done < .whl/requirements.txt
  du -sh .whl
  exit 0
fi

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1
"$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu.sh: this python's torch sees no GPU (torch %s)" % torch.__version__)
missing = []
for mod in ("transformer_lens", "transformers", "nnsight", "jaxtyping", "tvlens"):
    try:
        __import__(mod)
    except Exception as e:  # noqa: BLE001
        missing.append(f"{mod} ({type(e).__name__}: {e})")
if missing:
    sys.exit("gpu.sh: cannot import " + "; ".join(missing) + " - make the wheels with: bash benchmarks/gpu.sh --download")
print("gpu.sh:", torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)
EOF
nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv || true
JSON=${OUT:-.}/gpu-speed.json
timeout 470 "$PY" benchmarks/bench_speed.py --in-process --device cuda --rounds 2 --layers 12 \
  --only sweeps,scaling,attribution,extract,smollm2 --json-out "$JSON"
