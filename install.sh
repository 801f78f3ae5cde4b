#!/usr/bin/env bash
# Install ftune and everything it needs into the active Python (use a virtualenv).
#
#   bash install.sh              the known-good set: exact versions from constraints.txt (what CI tests)
#   bash install.sh --unpinned   newest releases allowed by pyproject.toml (pip resolves; slower, untested)
#
# torch: a CUDA build already installed is kept as it is. Otherwise CPU machines get the CPU build of
# torch 2.13.0 (about 190 MB; never the multi-GB CUDA wheels) and machines with nvidia-smi get PyPI's
# CUDA build. Whatever torch ends up installed is then held fixed while the rest is resolved.
# Last, DeepSpeed's CPU communication op is compiled once (g++, 1-2 minutes) so that no run waits for it.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
PINNED=1
for arg in "$@"; do
    case "$arg" in
        --unpinned) PINNED=0 ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown option '$arg' (options: --unpinned, --help)" >&2; exit 2 ;;
    esac
done

say() { echo "install: $*"; }
pip_install() { "$PY" -m pip install --disable-pip-version-check --no-input -q "$@"; }
started=$(date +%s)

"$PY" - <<'EOF' || exit 1
import sys
if not (3, 10) <= sys.version_info[:2] <= (3, 12):
    sys.exit(f"install: ftune needs Python 3.10-3.12; {sys.executable} is {sys.version.split()[0]}")
if sys.prefix == sys.base_prefix and not __import__("os").environ.get("FTUNE_ALLOW_SYSTEM_PYTHON"):
    print(f"install: note: {sys.executable} is not a virtualenv; packages go into the system Python")
EOF
say "python $("$PY" -c 'import sys; print(sys.version.split()[0])') at $("$PY" -c 'import sys; print(sys.prefix)'), pip $("$PY" -m pip --version | cut -d' ' -f2)"

installed_torch() { "$PY" -c "import torch; print(torch.__version__)" 2>/dev/null || true; }
torch_now=$(installed_torch)
if [ -n "$torch_now" ] && "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    say "keeping the CUDA build of torch $torch_now"
elif [[ "$torch_now" == "$TORCH_VERSION"* ]]; then
    say "torch $torch_now already installed"
elif command -v nvidia-smi >/dev/null 2>&1; then
    say "GPU machine without torch: installing torch $TORCH_VERSION (CUDA build, several GB)"
    pip_install "torch==$TORCH_VERSION"
else
    say "installing torch $TORCH_VERSION, CPU build"
    # The +cpu local version never matches PyPI's CUDA build: a local wheel (pip's find-links) or
    # PyTorch's CPU index.
    pip_install "torch==$TORCH_VERSION+cpu" 2>/dev/null \
        || pip_install "torch==$TORCH_VERSION+cpu" --extra-index-url "$TORCH_CPU_INDEX"
fi
torch_now=$(installed_torch)
[ -n "$torch_now" ] || { echo "install: torch did not install" >&2; exit 1; }

# The constraints pip resolves against: the torch just found or installed, plus the known-good set.
constraints=$(mktemp "${TMPDIR:-/tmp}/ftune-constraints.XXXXXX")
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_now" > "$constraints"
if [ "$PINNED" = 1 ]; then
    grep -v '^torch==' constraints.txt >> "$constraints"
    say "resolving against constraints.txt (an exact version for every package)"
else
    say "unpinned: resolving the newest releases pyproject.toml allows (torch stays $torch_now)"
fi

# deepspeed's setup.py imports torch, so it builds against the installed one (no build isolation);
# its ops are compiled on first use (DS_BUILD_OPS=0), the CPU comm op below.
if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    say "installing deepspeed"
    "$PY" -m pip install --disable-pip-version-check -q -c "$constraints" setuptools wheel
    DS_BUILD_OPS=0 pip_install --no-build-isolation -c "$constraints" deepspeed
fi
say "installing ftune and its dependencies"
pip_install -c "$constraints" -e ".[dev]"

"$PY" -m ftune.deepspeed_ops --build

"$PY" - <<'EOF'
import importlib.metadata as md
names = ["ray", "torch", "deepspeed", "transformers", "peft", "bitsandbytes", "datasets", "optuna", "wandb"]
print("install: done:", ", ".join(f"{n} {md.version(n)}" for n in names))
EOF
say "took $(( $(date +%s) - started )) s; next: ftune demo"
