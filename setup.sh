#!/usr/bin/env bash
# Set up rayssl in ./.venv (Python >= 3.10). `./setup.sh test` also installs the test tools.
# CPU-only machines get PyTorch's CPU build (torch==2.13.0; set TORCH_INDEX_URL to PyTorch's CPU
# wheel index where that version is not already available to pip); machines with an NVIDIA GPU
# keep whatever CUDA build pip resolves, so GPU users are never forced onto the CPU build.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! command -v nvidia-smi >/dev/null 2>&1 && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[setup] no NVIDIA GPU found: installing the CPU build of torch==2.13.0"
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${pip[@]}" install torch==2.13.0 --index-url "$TORCH_INDEX_URL"
  else
    "${pip[@]}" install torch==2.13.0
  fi
fi
extra=""
if [ "${1:-}" = "test" ]; then extra="[test]"; fi
echo "[setup] installing rayssl$extra and its dependencies into .venv"
"${pip[@]}" install -e ".$extra"
echo "[setup] ready: .venv/bin/rayssl --help"
