#!/usr/bin/env bash
# ReTool SFT with verl's FSDP2 SFT trainer (torchrun; GPU count from config/retool_sft.yaml).
#   ./train_sft.sh MODEL DATA_DIR OUT_DIR [EXPERIMENT_NAME] [hydra key=value ...] [--dry-run]
# Thin wrapper over `python -m recipe.retool.train sft` (see --help there).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 MODEL DATA_DIR OUT_DIR [EXPERIMENT_NAME] [key=value ...] [--dry-run]" >&2
  exit 2
fi
exec "${PYTHON:-python}" -m recipe.retool.train sft "$@"
