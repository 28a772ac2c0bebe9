#!/usr/bin/env bash
# ReTool GRPO with verl's PPO trainer: SGLang multi-turn rollouts + code sandbox + math reward.
#   ./train_retool_grpo.sh SFT_MODEL_PATH DATA_DIR OUTPUT_DIR [EXPERIMENT_NAME] [hydra overrides ...] [--dry-run]
# SFT_MODEL_PATH may be an HF model or an SFT checkpoint root (latest global_step_N, merged if sharded).
# The sandbox URL comes from RETOOL_SANDBOX_URL (default: the GRPO config's retool.sandbox_url).
# Thin wrapper over `python -m recipe.retool.train grpo` (see --help there).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 SFT_MODEL_PATH DATA_DIR OUTPUT_DIR [EXPERIMENT_NAME] [key=value ...] [--dry-run]" >&2
  exit 2
fi
exec "${PYTHON:-python}" -m recipe.retool.train grpo "$@"
