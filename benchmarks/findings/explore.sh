#!/usr/bin/env bash
# Exploratory GPU call: PRESET's base and r1-zero stages, then copy what they wrote (no models) to $OUT.
set -u
OUT=${OUT:-/tmp/out}; PRESET=${PRESET:-benchmarks/findings/base110m.yaml}; STAGES=${STAGES:-base r1-zero}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  .whl/pydantic*.whl .whl/annotated_types*.whl .whl/typing_*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
RUN=/tmp/run
for s in $STAGES; do
  echo "==== $s $(date +%T)"
  python3 -c "import sys; from r1lab.cli import main; sys.argv=['r1lab','run','--preset','$PRESET','--out','$RUN','--only','$s']; main()" 2>&1 | tail -5
  tail -25 $RUN/logs/$s.log
done
cd $RUN && find . -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.log' -o -name '*.yaml' -o -name '*.png' | grep -v '/model/\|/state/' | tar -czf "$OUT/run.tgz" -T -
echo "==== done $(date +%T)"
