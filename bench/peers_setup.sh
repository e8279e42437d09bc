#!/usr/bin/env bash
# Set up bench/.peers-venv for bench/peers.py: SpikingJelly beside edgesnn.
#
#     bash bench/peers_setup.sh
#
# A separate virtualenv, so that peer frameworks never become dependencies of
# edgesnn (its own .venv is left untouched). torch is pinned to 2.13.0, the CPU
# build on this machine; an unpinned or other torch pulls multi-GB CUDA wheels.
# SpikingJelly 2.0.0 is installed with --no-deps: its declared requirements
# include torchvision and torchaudio (which would bring in another torch),
# tensorboard and SciencePlots. `spikingjelly.activation_based.ann2snn` imports
# none of those; at import time it needs only numpy, tqdm (the calibration
# loop), loguru (spikingjelly.logger) and requests (ann2snn.utils.download_url),
# so pip reports the others as missing requirements: that is expected.
# edgesnn itself is installed editable with --no-deps (it needs torch and numpy).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${PEERS_VENV:-$ROOT/bench/.peers-venv}"
PYTHON="${PYTHON:-python3.11}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" --no-deps spikingjelly==2.0.0
"${PIP[@]}" numpy tqdm loguru requests
"${PIP[@]}" --no-deps -e "$ROOT"
"$VENV/bin/python" - <<'PY'
import torch
from spikingjelly.activation_based import ann2snn, functional
import edgesnn.pipeline, edgesnn.synth
print(f"peers venv ready: torch {torch.__version__}, spikingjelly ann2snn {ann2snn.__name__}, edgesnn {edgesnn.__version__}")
PY
