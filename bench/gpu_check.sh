#!/usr/bin/env bash
# The GPU check: every GPU figure ftune needs, in one run of at most 8 minutes, into one results file.
#
#     bash bench/gpu_wheels.sh                         # here, once: the wheels the GPU machine lacks -> .whl/
#     bash bench/gpu_check.sh                          # on the GPU machine, with .whl/ beside it
#     FTUNE_GPU_CHECK_TINY=1 bash bench/gpu_check.sh   # anywhere, on CPU with a tiny model: the script runs
#
# Steps, each under its own timeout (and all under FTUNE_GPU_CHECK_BUDGET_S, default 450 s), each
# recorded as ok / failed (with the last lines of its log) / timed out / skipped (with the reason):
#   install     the carried wheels (.whl/*.whl) into $WORK/site, first on PYTHONPATH
#   environment python, torch, CUDA, GPU and package versions
#   train-lora  bench/train_gpu.py: LoRA r=16 bf16, DeepSpeed ZeRO-2 on 1 GPU, a random-weight Llama of
#               Llama-3.2-1B's shape (1.24B matmul parameters): tokens/s, MFU against 790 TFLOP/s
#   train-qlora the same with the base model in NF4 (QLoRA)
#   serve       bench/serve.py --no-serve: in-process decoding, batch of 8 on 1 vs 8 adapters, gathered
#               LoRA (serve/gathered_lora.py) and peft's own loop, tokens/s
#   tests-gpu   pytest tests/gpu
# The train steps and tests/gpu import the training loop, which imports Ray: without Ray they are skipped.
# FTUNE_GPU_CHECK_ONLY="train-qlora tests-gpu" runs only those steps (and install, environment): a rerun.
#
# Results: $FTUNE_GPU_CHECK_OUT, else $OUT, else ./gpu-check-out: gpu_check.md (the results, rewritten
# after every step, so a run cut short keeps what it measured) and gpu_check.log (every step's output).
# Tiny mode (FTUNE_GPU_CHECK_TINY=1): the same steps with a 2-layer model on CPU, fp32, installing
# nothing; its figures (MFU above all) mean nothing, it proves the script works.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
TINY=${FTUNE_GPU_CHECK_TINY:-0}
# Tiny mode runs where CPUs may be shared and slow (CI): four times each step's timeout, 30 minutes in all.
[ "$TINY" = 1 ] && SCALE=4 || SCALE=1
[ "$TINY" = 1 ] && DEFAULT_BUDGET=1800 || DEFAULT_BUDGET=450
BUDGET=${FTUNE_GPU_CHECK_BUDGET_S:-$DEFAULT_BUDGET}
ONLY=${FTUNE_GPU_CHECK_ONLY:-}
PEAK_TFLOPS=790  # bf16 matrix products measured on the H200 machine (8192^3, random data)
OUTDIR=${FTUNE_GPU_CHECK_OUT:-${OUT:-$PWD/gpu-check-out}}
RESULTS=$OUTDIR/gpu_check.md
LOG=$OUTDIR/gpu_check.log
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ftune-gpu-check.XXXXXX")
START=$(date +%s)
mkdir -p "$OUTDIR" "$WORK/sections"
: >"$LOG"
: >"$WORK/summary"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export FTUNE_HOME=${FTUNE_HOME:-$WORK/ftune_home}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [ "$TINY" = 1 ]; then
  MODE="tiny (CPU, 2-layer model, fp32; figures and MFU meaningless: this only proves the script runs)"
  TRAIN_ARGS=(--model tiny --device cpu --seq-len 32 --warmup 1 --steps 1)
  SERVE_ARGS=(--model tiny --device cpu --requests 2 --tokens 2 --per-client 1)
else
  MODE="GPU"
  TRAIN_ARGS=(--model 1b --device cuda --seq-len 2048 --micro-batch 4 --warmup 3 --steps 10)
  SERVE_ARGS=(--model 2048x8 --device cuda --requests 20 --tokens 32)
fi

remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }

write_results() {  # the whole results file, from the summary and the sections so far
  {
    echo "# GPU check"
    echo
    echo "Mode: $MODE. Started $(date -u -d "@$START" '+%Y-%m-%d %H:%M UTC'), $(( $(date +%s) - START )) s so far;"
    echo "commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown); budget ${BUDGET} s."
    echo
    echo "| step | outcome | seconds |"
    echo "|---|---|---|"
    cat "$WORK/summary"
    for section in "$WORK"/sections/*.md; do
      [ -e "$section" ] && { echo; cat "$section"; }
    done
  } >"$RESULTS.tmp" && mv "$RESULTS.tmp" "$RESULTS"
}

record() {  # record NAME TITLE OUTCOME SECONDS BODY-FILE
  local n
  n=$(printf '%02d' "$(( $(wc -l <"$WORK/summary") + 1 ))")
  echo "| $1 | $3 | $4 |" >>"$WORK/summary"
  { echo "## $1: $2"; echo; echo "Outcome: $3"; echo; cat "$5"; } >"$WORK/sections/$n-$1.md"
  write_results
  echo "== $1: $3 (${4} s)"
}

skip() {  # skip NAME TITLE REASON
  echo "$3" >"$WORK/skip.body"
  record "$1" "$2" "skipped: $3" 0 "$WORK/skip.body"
}

# step NAME TITLE TIMEOUT_S REPORT CMD...: run CMD under a timeout (cut to the budget left); the section
# holds REPORT (a file the command writes; "-" for none) and, unless it is ok, the log's last lines.
step() {
  local name=$1 title=$2 limit=$3 report=$4
  shift 4
  local left
  if [ -n "$ONLY" ] && [[ " install environment $ONLY " != *" $name "* ]]; then
    skip "$name" "$title" "not in FTUNE_GPU_CHECK_ONLY"
    return
  fi
  left=$(( $(remaining) - 5 ))
  limit=$(( limit * SCALE ))
  if [ "$left" -lt 10 ]; then
    skip "$name" "$title" "the ${BUDGET} s budget is spent"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local log="$WORK/$name.log" t0 rc outcome shown="$*"
  shown=${shown%%$'\n'*}  # an inline script: its first line
  t0=$(date +%s)
  echo "== $name: $shown (timeout ${limit} s)" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  cat "$log" >>"$LOG"
  case $rc in
    0) outcome=ok ;;
    124|137) outcome="timed out after ${limit} s" ;;
    *) outcome="failed (exit $rc)" ;;
  esac
  {
    echo "\`$shown\`"
    echo
    if [ "$report" != - ] && [ -s "$report" ]; then cat "$report"; echo; fi
    if [ $rc != 0 ] || [ "$report" = - ]; then
      echo '```'
      tail -n 40 "$log"
      echo '```'
    fi
  } >"$WORK/$name.body"
  record "$name" "$title" "$outcome" "$(( $(date +%s) - t0 ))" "$WORK/$name.body"
}

# ---------------------------------------------------------------------------------------------- steps
if [ "$TINY" = 1 ]; then
  skip install "carried wheels" "tiny mode uses this environment's packages"
elif ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
  step install "carried wheels (.whl/)" 120 - \
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    "$REPO"/.whl/*.whl
  export PYTHONPATH="$REPO:$WORK/site${PYTHONPATH#"$REPO"}"
else
  skip install "carried wheels" "no .whl/*.whl: run bash bench/gpu_wheels.sh here and carry .whl"
fi

step environment "versions" 60 - "$PY" -c 'import importlib.metadata as md, importlib.util, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("GPU", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0),
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
for name in ("transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "pydantic", "ray"):
    spec = importlib.util.find_spec(name)
    print(name, md.version(name) if spec else "NOT installed", spec.origin if spec else "")
'

# Looked up, not imported: importing ray and deepspeed takes seconds.
if "$PY" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('ray') and u.find_spec('deepspeed')))"; then
  TRAIN_OK=1
else
  TRAIN_OK=0
  WHY="ray or deepspeed is not installed (train/loop.py imports ray.train): carry .whl from bench/gpu_wheels.sh"
fi
[ "$TINY" = 1 ] && MFU_NOTE="MFU (meaningless on CPU)" || MFU_NOTE="MFU (6N) against ${PEAK_TFLOPS} TFLOP/s bf16"
for method in lora qlora; do
  title="LoRA bf16, DeepSpeed ZeRO-2, 1 GPU, tokens/s and $MFU_NOTE"
  [ $method = qlora ] && title="QLoRA NF4, DeepSpeed ZeRO-2, 1 GPU, tokens/s and $MFU_NOTE"
  if [ $TRAIN_OK = 1 ]; then
    step "train-$method" "$title" 150 "$WORK/train-$method.md" \
      "$PY" bench/train_gpu.py "${TRAIN_ARGS[@]}" --method $method --peak-tflops $PEAK_TFLOPS --no-record \
      --cache "$WORK/models" --out "$WORK/train-$method.md"
  else
    skip "train-$method" "$title" "$WHY"
  fi
done

step serve "gathered-LoRA serving, batch of 8 on 1 vs 8 adapters, tokens/s" 180 "$WORK/serve.md" \
  "$PY" bench/serve.py "${SERVE_ARGS[@]}" --no-serve --no-record --out "$WORK/serve.md"

if [ $TRAIN_OK = 1 ]; then
  step tests-gpu "pytest tests/gpu" 150 - "$PY" -m pytest tests/gpu -q -p no:cacheprovider
else
  skip tests-gpu "pytest tests/gpu" "$WHY"
fi

write_results
status=0
grep -q "| failed\|| timed out" "$WORK/summary" && status=1
rm -rf "$WORK"
echo "results: $RESULTS"
exit $status
