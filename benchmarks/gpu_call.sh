#!/usr/bin/env bash
# One call on the GPU machine: TRL's wheels installed, then the given steps; every file the
# steps write goes to $RES and comes back as one archive, $OUT/results.tgz.
#   bash benchmarks/gpu_call.sh tests kernels bench
#   SHAPES=0.5b bash benchmarks/gpu_call.sh bench varlen   (one shape; default both)
# Steps: tests (the GPU tests), paths (benchmarks/train_paths.py), smoke (the tiny shape,
# both tools: TRL imports and runs), profile (1.5b then 0.5b, r1lab, one profiled step),
# kernels (the decode attention's launch shapes swept at 1.5b and 0.5b; bench and varlen
# then run with each shape's fastest), bench (1.5b then 0.5b, r1lab and TRL side by side,
# STEPS timed steps after one warm-up), varlen (the same on the variable-length workload),
# auto (1.5b then 0.5b, r1lab, checkpoint_layers auto), stage (`r1lab grpo` on a random
# 0.5b-shaped checkpoint, 128-token prompts as bench's, twice: steady step time, and the
# first step with empty and with warm compile caches), two-gpus (issue 15's comparison: 1.5b on one GPU and on two).
# Wall time of each step on one H200 (2026-11-30; plan calls by it, 600 s a call at most):
# tests ~135 s, kernels ~40-80 s, bench ~210 s at 1.5b and ~170 s at 0.5b, varlen ~300 s at
# 1.5b (TRL's 1,024-token rollouts) and more than 150 s at 0.5b, profile ~75 s a shape,
# auto ~60 s a shape, stage ~60 s a run (warm caches) and more with empty ones. A machine
# start adds ~30 s.
set -u
OUT=${OUT:-/tmp/out}
RES=/tmp/res
mkdir -p "$OUT" "$RES"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
git rev-parse --short HEAD 2>/dev/null
python3 -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)'
kernel_config() {  # the sweep's fastest launch shapes for this shape, when swept
  [ -f "$RES/k$1.json" ] && echo "--kernel-config $RES/k$1.json"
}
for step in "$@"; do
  echo "==== $step $(date +%T)"
  case $step in
    tests) timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_engine.py \
             tests/test_gpu_host_sync.py 2>&1 | tee "$RES/tests.log" | tail -15 ;;
    paths) python3 benchmarks/train_paths.py --out "$RES/paths.json" 2>&1 | tail -20 ;;
    smoke) python3 benchmarks/grpo_step.py --shape tiny --steps 1 --out /tmp/tiny.json 2>&1 | tail -15 ;;
    profile)
      for s in ${SHAPES:-1.5b 0.5b}; do
        python3 benchmarks/grpo_step.py --shape $s --tools r1lab --steps 1 --profile \
          $(kernel_config $s) --out "$RES/p$s.json" 2>&1 | grep -v '^{"tool"' | tail -60
      done ;;
    kernels)
      for s in ${SHAPES:-1.5b 0.5b}; do
        python3 benchmarks/decode_kernels.py --shape $s --attention-only --out "$RES/k$s.json" \
          2>&1 | tail -4
      done ;;
    bench)
      for s in ${SHAPES:-1.5b 0.5b}; do
        python3 benchmarks/grpo_step.py --shape $s --steps ${STEPS:-2} --tool-timeout 200 \
          $(kernel_config $s) --out "$RES/b$s.json" 2>&1 | grep -v '^{"tool"' | tail -25
      done ;;
    varlen)
      for s in ${SHAPES:-1.5b 0.5b}; do
        python3 benchmarks/grpo_step.py --shape $s --workload varlen --steps ${STEPS:-2} \
          --tool-timeout 240 $(kernel_config $s) --out "$RES/v$s.json" 2>&1 \
          | grep -v '^{"tool"' | tail -12
      done ;;
    auto)
      for s in ${SHAPES:-1.5b 0.5b}; do
        python3 benchmarks/grpo_step.py --shape $s --tools r1lab --steps 2 --checkpoint-auto \
          $(kernel_config $s) --out "$RES/auto$s.json" 2>&1 | grep -v '^{"tool"' | tail -10
      done ;;
    stage)
      # cold: empty Inductor and Triton caches; warm: the same caches, a second process
      rm -rf /tmp/stage_cache
      for run in cold warm; do
        TORCHINDUCTOR_CACHE_DIR=/tmp/stage_cache/inductor TRITON_CACHE_DIR=/tmp/stage_cache/triton \
          python3 benchmarks/distributed_grpo.py --shape 0.5b --runs 1:32 --steps 5 \
          --prompt-tokens 128 --work /tmp/stage_$run --out "$RES/stage_$run.json" 2>&1 \
          | cut -c1-600
      done ;;
    two-gpus)
      python3 benchmarks/distributed_grpo.py --shape 1.5b --runs 1:32 2:64 --steps 4 \
        --micro-batch-size 64 --out "$RES/two.json" 2>&1 | cut -c1-900 ;;
    *) echo "unknown step $step" ;;
  esac
  tar czf "$OUT/results.tgz" -C "$RES" .  # after every step: a call cut short keeps what ran
done
echo "==== done $(date +%T)"
