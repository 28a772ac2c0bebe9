#!/usr/bin/env bash
# Prefilter a prepared parquet file by token length.
#   ./preprocess_data.sh IN.parquet OUT.parquet TOKENIZER [--config CONFIG] [key=value ...] [--workers N]
# The budget comes from the config that trains on the data (SFT: data.max_length; RL: data.max_prompt_length).
# Thin wrapper over `python -m recipe.retool.prefilter_dataset` (see --help there).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 IN.parquet OUT.parquet TOKENIZER [prefilter options...]" >&2
  exit 2
fi
in=$1 out=$2 tokenizer=$3
shift 3
exec "${PYTHON:-python}" -m recipe.retool.prefilter_dataset --input "$in" --output "$out" --tokenizer "$tokenizer" "$@"
