#!/usr/bin/env bash
# Runs the five benchmarks one after another (default sizes, ~14 minutes on 2 CPU cores)
# and prints each one's results; the full output also goes to a log file.
#
#   bash benchmarks/run_all.sh            # PYTHON=... to use another interpreter than .venv/bin/python
#
# Needs the project's .venv (scripts/setup.sh) plus the benchmark peers:
#   .venv/bin/pip install -r requirements/bench.txt -c requirements/constraints.txt
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LOG=$(mktemp -t iterdpo-bench-XXXXXX.log)

if ! "$PY" -c "import trl, vllm, deepspeed" >/dev/null 2>&1; then
  echo "missing packages: run scripts/setup.sh, then" >&2
  echo "  .venv/bin/pip install -r requirements/bench.txt -c requirements/constraints.txt" >&2
  exit 1
fi

failed=()
for bench in reward_server generate train reward_model selection; do
  echo
  started=$(date +%s)
  # stderr and DeepSpeed's "Setting accelerator to CPU" notice go to the log only.
  if "$PY" "benchmarks/bench_${bench}.py" 2>>"$LOG" | tee -a "$LOG" | grep --line-buffered -v "real_accelerator.py"; then
    echo "-- bench_${bench}.py finished in $(( $(date +%s) - started )) s"
  else
    echo "!! bench_${bench}.py failed; see $LOG"
    failed+=("$bench")
  fi
done

echo
echo "full output: $LOG"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
