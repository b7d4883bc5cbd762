#!/usr/bin/env bash
# The engine on one CUDA GPU (see bench/gpu_check.py): run from the repository root on a machine with torch (CUDA)
# and transformers; needs no network and none of Stoker's other dependencies. About 5 minutes on one H200.
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 480 python bench/gpu_check.py "$@"
