#!/usr/bin/env bash
# The starting policies of the sweeps in configs/sweeps/ (docs/results.md): tiny models
# warm-started by `correction-rl warmstart` into the 20-60% accuracy band, seed 0, written under
# artifacts/sweeps/ (gitignored). Each is skipped when its directory already exists. Training is
# deterministic for a seed on one machine; measured 15 s (reverse), 33 s (sorting), 69 s
# (addition) and 35 s (reverse + sorting) on the project's 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
CRL=${CRL:-.venv/bin/correction-rl}
out=artifacts/sweeps
mkdir -p "$out"
for task in reverse sorting addition; do
  [ -d "$out/policy-$task" ] || "$CRL" warmstart --task "$task" --seed 0 --out "$out/policy-$task"
done
# Experiment 2: ONE policy that knows two tasks (trained with corrections on sorting only).
[ -d "$out/policy-reverse-sorting" ] || "$CRL" warmstart --task reverse sorting --seed 0 --out "$out/policy-reverse-sorting"
