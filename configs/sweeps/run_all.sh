#!/usr/bin/env bash
# Every experiment of docs/results.md, smallest first, then their reports: the starting
# policies (make_policies.sh), the eight sweeps into runs/sweeps/<name>/, `correction-rl report`
# for each, and experiment 2's per-task tables. Rerunning resumes: finished trials are skipped
# (docs/sweeps.md). On the project's 2-core CPU machine: ~4 min of warm starts, then 20-50 s per
# trial with two trials side by side (the sweeps took 1-8 min each, docs/results.md).
set -uo pipefail
cd "$(dirname "$0")/../.."
CRL=${CRL:-.venv/bin/correction-rl}
PY=${PY:-.venv/bin/python}
configs/sweeps/make_policies.sh
for spec in regularization online_offline objectives objectives_sorting objectives_addition \
            regularization_gentle online_offline_long objectives_warmup; do
  start=$(date +%s)
  "$CRL" sweep "configs/sweeps/$spec.yaml" --sweep-dir "runs/sweeps/$spec"
  echo "sweep $spec: exit $? after $(( $(date +%s) - start )) s"
  "$CRL" report "runs/sweeps/$spec" > /dev/null && echo "report: runs/sweeps/$spec/report.md"
done
for spec in regularization regularization_gentle; do
  "$PY" configs/sweeps/per_task.py "runs/sweeps/$spec" --trained sorting --other reverse \
    --plot "runs/sweeps/$spec/report/per_task.png" > "runs/sweeps/$spec/per_task.md"
  echo "per-task tables: runs/sweeps/$spec/per_task.md"
done
