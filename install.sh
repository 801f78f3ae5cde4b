#!/usr/bin/env bash
# Install ftune and everything it needs on a fresh machine (CPU or GPU).
# CPU machines get the CPU build of torch 2.13.0 (never the multi-GB CUDA wheels); GPU machines keep
# the CUDA torch already installed. deepspeed is installed without prebuilding ops (they build on use).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    echo "install: keeping the CUDA build of torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
    echo "install: torch $("$PY" -c 'import torch; print(torch.__version__)') already installed"
elif command -v nvidia-smi >/dev/null 2>&1; then
    pip_install torch
else
    # A local CPU wheel (pip's find-links) wins; otherwise the CPU index, never the CUDA build.
    pip_install torch==2.13.0 || pip_install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
fi

if ! "$PY" -c "import deepspeed" 2>/dev/null; then
    DS_BUILD_OPS=0 pip_install --no-build-isolation "deepspeed>=0.19"
fi
pip_install -e ".[dev]"
echo "install: done ($("$PY" -c 'import ray, torch, deepspeed, peft, transformers; print(f"ray {ray.__version__}, torch {torch.__version__}, deepspeed {deepspeed.__version__}, peft {peft.__version__}, transformers {transformers.__version__}")'))"
