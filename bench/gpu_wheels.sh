#!/usr/bin/env bash
# Fetch, here, the wheels bench/gpu_check.sh installs on a GPU machine that has no network.
#
#     bash bench/gpu_wheels.sh          # fills .whl/ (ignored by git; never committed), about 55 MiB
#
# The GPU machine has Python 3.12 (x86_64, manylinux) with torch (CUDA 13), transformers, peft and
# accelerate, and lacks ray, deepspeed, bitsandbytes and pydantic. What travels to it with the working
# tree may not pass 64 MiB, so two wheels are trimmed of files ftune never loads:
#   bitsandbytes  41 MiB -> 3 MiB: only its CPU and CUDA 13.0 libraries (the machine's torch is cu130)
#   ray           75 MiB -> 45 MiB: without ray/jars (the Java worker runtime; ftune runs Python only)
# deepspeed ships an sdist only: its pure-Python wheel is built here (no ops compiled; ZeRO-2 with
# torch's AdamW needs none).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
mkdir -p "$DEST" "$DEST.tmp"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() {  # download DIR SPEC...: binary wheels for CPython 3.12 on x86_64 Linux, no dependencies
  local dir=$1; shift
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$dir" "$@"
}
trim() {  # trim WHEEL REGEX: copy WHEEL into $DEST without the files whose name matches REGEX
  "$PY" - "$1" "$DEST" "$2" <<'PYEOF'
import pathlib, re, sys, zipfile
src, dst_dir, pattern = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), re.compile(sys.argv[3])
dst = dst_dir / src.name
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if pattern.search(item.filename):
            continue
        data = zin.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):  # no lines for the files left out
            kept = [l for l in data.decode().splitlines() if not pattern.search(l.split(",")[0])]
            data = ("\n".join(kept) + "\n").encode()
        zout.writestr(item, data)
print(f"{src.name}: {src.stat().st_size / 2**20:.0f} MiB -> {dst.stat().st_size / 2**20:.0f} MiB")
PYEOF
}

# Versions as in constraints.txt (the set CI tests). Dependencies of ray, deepspeed and ftune that the
# machine lacks; peft for the version ftune is tested with.
download "$DEST" pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  hjson==3.1.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
  rpds-py==2026.9.1 tensorboardX==2.6.5 peft==0.21.2

if ! ls "$DEST"/bitsandbytes-*.whl >/dev/null 2>&1; then
  download "$DEST.tmp" bitsandbytes==0.50.2
  trim "$DEST.tmp"/bitsandbytes-*.whl 'libbitsandbytes_(?!cpu\.so|cuda130\.so)[^/]*\.so$'
fi
if ! ls "$DEST"/ray-*.whl >/dev/null 2>&1; then
  download "$DEST.tmp" ray==2.60.0
  trim "$DEST.tmp"/ray-*.whl '^ray/jars/'
fi
if ! ls "$DEST"/deepspeed-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
fi
rm -rf "$DEST.tmp"
echo "$(du -sm "$DEST" | cut -f1) MiB in $DEST (with the working tree, at most 64 MiB may travel)"
