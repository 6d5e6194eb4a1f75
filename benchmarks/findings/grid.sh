#!/usr/bin/env bash
# Exploratory GPU call: for each preset in benchmarks/findings/grid/, the base then r1-zero,
# all variants at once on one GPU; what they wrote (no models) goes to $OUT.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  .whl/pydantic*.whl .whl/annotated_types*.whl .whl/typing_*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
one() {
  for s in base r1-zero; do
    python3 -c "import sys; from r1lab.cli import main; sys.argv=['r1lab','run','--preset','$1','--out','/tmp/g/$2','--only','$s',${EXTRA:-}]; main()" > /tmp/g_$2_$s.log 2>&1
  done
  echo "$2 done $(date +%T)"
}
for f in benchmarks/findings/grid/*.yaml; do n=$(basename $f .yaml); one $f $n & done
wait
for f in /tmp/g_*.log; do echo "== $f"; tail -3 $f; done
cd /tmp/g && find . -name '*.json' -o -name 'samples.jsonl' -o -name '*.md' -o -name '*.log' | grep -v '/model/\|/state/' | tar -czf "$OUT/grid.tgz" -T -
