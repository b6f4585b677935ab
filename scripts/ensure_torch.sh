#!/usr/bin/env bash
# Makes sure the interpreter given as $1 has torch >= 2.4, without ever pulling a CUDA build
# onto a CPU machine:
#   1. a torch >= 2.4 that is already importable (system site-packages, a conda env) is kept;
#   2. else torch==2.13.0 from wheels already on disk (pip's find-links, no network);
#   3. else torch==2.13.0 from PyTorch's CPU-only wheel index.
set -euo pipefail
py=${1:?usage: ensure_torch.sh PYTHON}
if "$py" - <<'PY' 2>/dev/null
import sys, torch
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 4) else 1)
PY
then
  echo "keeping torch $("$py" -c 'import torch; print(torch.__version__)')"
  exit 0
fi
# --no-index --no-deps: only a wheel already on disk (pip's find-links) qualifies; its small
# pure-Python dependencies then come from the ordinary index.
if "$py" -m pip install -q --no-index --no-deps torch==2.13.0 2>/dev/null; then
  "$py" -m pip install -q torch==2.13.0
  echo "installed torch 2.13.0 from a wheel on disk"
else
  "$py" -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  echo "installed torch 2.13.0 (CPU build)"
fi
