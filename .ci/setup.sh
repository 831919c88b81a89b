#!/usr/bin/env bash
# Installs everything pianoforge needs on a fresh Debian machine (run as root):
# system packages with apt-get, Python packages into ./.venv. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES=(python3 python3-venv python3-dev build-essential portaudio19-dev libfluidsynth3
  fluid-soundfont-gm libgl1 libegl1 libosmesa6 libglfw3 ffmpeg
  munge slurmctld slurmd slurm-client chromium procps psmisc iproute2 util-linux)

missing=()
for p in "${SYSTEM_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PIANOFORGE_PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3; do command -v "$c" >/dev/null && { PY=$(command -v "$c"); break; }; done
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PY"
  "$PY" -m venv .venv
fi
VPIP=".venv/bin/python -m pip"
$VPIP install -q --upgrade pip wheel setuptools
# torch first: the local CPU wheel when present, so that no CUDA packages are pulled in.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  wheel=$(ls /opt/wheels/torch-2.13.0*cp311*.whl 2>/dev/null | head -n1 || true)
  if [ -n "$wheel" ] && .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    $VPIP install -q "$wheel"
  else
    $VPIP install -q "torch==2.13.0"
  fi
fi
echo "[setup] pip install -e .[dev]"
$VPIP install -q -e ".[dev]"
echo "[setup] done: $(.venv/bin/python --version), $(.venv/bin/pianoforge --version 2>/dev/null || echo 'pianoforge not yet importable')"
