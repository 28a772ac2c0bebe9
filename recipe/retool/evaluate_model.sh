#!/usr/bin/env bash
# AIME24 pass@k with tool use against an OpenAI-compatible server (vLLM/SGLang) and a sandbox.
#   ./evaluate_model.sh MODEL OUTPUT_PATH [BASE_URL] [SANDBOX_URL] [API_KEY] [more eval flags ...]
# Defaults: BASE_URL=http://localhost:8000/v1  SANDBOX_URL=http://localhost:8080  API_KEY=EMPTY
# Thin wrapper over `python -m recipe.retool.evaluate` (see --help there). Useful flags:
#   --config GRPO_CONFIG (sampling and budgets default to its validation settings) --samples N --max-turns N
#   --max-tokens N (TOTAL response tokens per sample, all turns) --temperature T
#   --top-p P --concurrency N --limit N --data FILE.parquet --no-tools --max-error-rate F --allow-resume-mismatch
# Exit codes: 0 done; 2 bad data, server/sandbox not answering, or mismatched resume; 3 too many errors.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 MODEL OUTPUT_PATH [BASE_URL] [SANDBOX_URL] [API_KEY] [eval flags ...]" >&2
  exit 2
fi
model=$1 output=$2
base_url=${3:-http://localhost:8000/v1}
sandbox_url=${4:-http://localhost:8080}
api_key=${5:-EMPTY}
shift $(( $# < 5 ? $# : 5 ))
exec "${PYTHON:-python}" -m recipe.retool.evaluate --model "$model" --output "$output" \
  --base-url "$base_url" --sandbox-url "$sandbox_url" --api-key "$api_key" "$@"
