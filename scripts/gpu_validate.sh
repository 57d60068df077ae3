#!/usr/bin/env bash
# Issue #6 on an NVIDIA GPU, in one call: install the carried wheels (moshi and soundfile; the
# machine has torch but no network), then the CUDA tests, the validation and the benchmarks.
# Everything lands in $OUT (default /tmp/xbackend-gpu). Wheels were fetched here with:
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl moshi==0.2.13 soundfile cffi pycparser
# Stages: STAGES="tests validate bench7b benchtiny" (the default), plus cli (xbackend repeat and
# compare on cuda, cuda:bf16 and cpu, the bundled model), probe (run-to-run
# repeatability of the 7B bf16 model per attention backend and cuBLAS workspace setting) and
# bench7beager (plain and capture with --compile off).
set -u
OUT=${OUT:-/tmp/xbackend-gpu}
STAGES=${STAGES:-"tests validate bench7b benchtiny"}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit --format=csv
  python3 -c "import torch, moshi, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'moshi', moshi.__version__, 'numpy', numpy.__version__)"
  nproc
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

for stage in $STAGES; do
  start=$(date +%s)
  case $stage in
    tests)
      timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_graph_capture.py > "$OUT/pytest.txt" 2>&1 ;;
    validate)
      timeout 300 python3 scripts/gpu_validate.py --json "$OUT/validate.json" > "$OUT/validate.txt" 2>&1 ;;
    bench7b)
      timeout 420 python3 scripts/bench.py --model 7b-random --device cuda --dtype bf16 --steps ${STEPS7B:-300} \
        --warmup 20 --rounds ${ROUNDS7B:-3} --host-modes=${HOST7B-native,portable} --json "$OUT/bench-7b.json" \
        > "$OUT/bench-7b.txt" 2>&1 ;;
    bench7beager)
      timeout 300 python3 scripts/bench.py --model 7b-random --device cuda --dtype bf16 --steps 300 --warmup 20 \
        --rounds 2 --modes native,portable --compile off --write-steps 0 --diff-steps 0 --json "$OUT/bench-7b-eager.json" \
        > "$OUT/bench-7b-eager.txt" 2>&1 ;;
    probe)
      { timeout 150 python3 scripts/gpu_repeat_probe.py --paths device --tag default
        timeout 60 python3 scripts/gpu_repeat_probe.py --sdp default --paths host --tag host
        CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout 60 python3 scripts/gpu_repeat_probe.py --sdp default --paths device \
          --tag cublas-4096-8; } > "$OUT/probe.txt" 2>&1 ;;
    cli)
      { timeout 120 python3 -m xbackend repeat -b cuda --runs 2 --steps 50 -o /tmp/xb-repeat
        timeout 120 python3 -m xbackend repeat -b cuda:bf16 --runs 2 --steps 50 -o /tmp/xb-repeat16
        timeout 300 python3 -m xbackend compare --backends cpu,cuda,cuda:bf16 --steps 50 -o /tmp/xb-compare
        echo "compare exit $?"; } > "$OUT/cli.txt" 2>&1 ;;
    benchtiny)
      timeout 200 python3 scripts/bench.py --model tiny --device cuda --steps 200 --warmup 20 --rounds 3 \
        --host-modes=${HOSTTINY-native} --write-steps 0 --diff-steps 0 --json "$OUT/bench-tiny.json" > "$OUT/bench-tiny.txt" 2>&1 ;;
  esac
  echo "== $stage: exit $? in $(( $(date +%s) - start )) s"
done
for f in pytest.txt validate.txt bench-7b.txt bench-tiny.txt bench-7b-eager.txt probe.txt cli.txt; do
  [ -f "$OUT/$f" ] && { echo "---- $f"; grep -v '^ \|^{\|^}' "$OUT/$f" | tail -25; }
done
true
