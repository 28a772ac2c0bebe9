#!/usr/bin/env bash
# AIME24 pass@k with tool use against an OpenAI-compatible server (vLLM/SGLang) and a sandbox.
#   ./evaluate_model.sh MODEL OUTPUT_PATH [BASE_URL] [SANDBOX_URL] [API_KEY] [more eval flags ...]
# An empty or missing BASE_URL / SANDBOX_URL / API_KEY takes the evaluation's default (see --help there).
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
args=(--model "$model" --output "$output")
[ -n "${3:-}" ] && args+=(--base-url "$3")
[ -n "${4:-}" ] && args+=(--sandbox-url "$4")
[ -n "${5:-}" ] && args+=(--api-key "$5")
shift $(( $# < 5 ? $# : 5 ))
exec "${PYTHON:-python}" -m recipe.retool.evaluate "${args[@]}" "$@"
