#!/usr/bin/env bash
# Recreate the free-form demo's models (docs/models.md, "A free-form task"):
#   artifacts/freeform/teacher  base BPE + ChatML Llama trained on the teacher's correction request
#   artifacts/freeform/policy   tiny BPE + ChatML Llama, warm-started only partly on the task
#   artifacts/freeform/freeform.json  the teacher's measured held-out accuracy, the policy's
# Usage: configs/freeform/make_models.sh [OUT_DIR] [extra flags of correction_rl.tools.freeform]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-artifacts/freeform}"
shift || true
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
exec "$PYTHON" -m correction_rl.tools.freeform --out "$OUT" "$@"
