#!/usr/bin/env bash
# One call on the GPU machine: TRL's wheels installed, then the given steps, logs to $OUT.
#   bash benchmarks/gpu_call.sh tests paths smoke bench15-profile bench
# Steps: tests (the GPU tests), paths (benchmarks/train_paths.py), smoke (the tiny shape,
# both tools: TRL imports and runs), bench15-profile (1.5b, r1lab, one profiled step),
# bench (1.5b then 0.5b, r1lab and TRL side by side, STEPS timed steps after one warm-up).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
git rev-parse --short HEAD 2>/dev/null
python3 -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)'
for step in "$@"; do
  echo "==== $step $(date +%T)"
  case $step in
    tests) timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_engine.py 2>&1 | tee "$OUT/tests.log" ;;
    paths) python3 benchmarks/train_paths.py --out "$OUT/paths.json" 2>&1 | tail -20 ;;
    smoke) python3 benchmarks/grpo_step.py --shape tiny --steps 1 --out /tmp/tiny.json 2>&1 | tail -15 ;;
    bench15-profile)
      python3 benchmarks/grpo_step.py --shape 1.5b --tools r1lab --steps 1 --profile \
        --out "$OUT/p15.json" 2>&1 | grep -v '^{"tool"' | tail -30 ;;
    bench)
      for s in 1.5b 0.5b; do
        python3 benchmarks/grpo_step.py --shape $s --steps ${STEPS:-2} --tool-timeout 200 \
          --out "$OUT/b$s.json" 2>&1 \
          | grep -v '^{"tool"' | tail -25
      done ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "==== done $(date +%T)"
