#!/usr/bin/env bash
# The whole ReTool run on one GPU node, from a fresh checkout: install, then every stage in order
# (data → prefilter → sandbox → SFT → merge → GRPO → merge → serve + evaluate) with a log.
#   scripts/speedrun.sh [OUT_DIR] [--config EXPERIMENT.yaml] [key=value overrides ...]
# A rerun resumes every stage. Settings: the experiment config (default config/experiments/default.yaml);
# the commands are those of `python -m recipe.retool.pipeline --dry-run`.
set -euo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout first: verl's wheel installs a top-level `recipe`
cd "$(dirname "$0")/.."
out="${1:-outputs/run}"
[ $# -gt 0 ] && shift
if ! python -c "import verl, sglang" 2>/dev/null; then
  echo "== install (.[gpu]: SGLang + verl 0.9.1)"
  pip install -q -e ".[gpu]"
fi
mkdir -p "$out"
echo "== pipeline → $out (log: $out/speedrun.log)"
python -m recipe.retool.pipeline --out "$out" "$@" 2>&1 \
  | tee -a "$out/speedrun.log"
