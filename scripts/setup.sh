#!/usr/bin/env bash
# Set up a fresh Debian machine for napari-mixcoef: the Debian packages that
# headless Qt needs, then a virtual environment in .venv holding the package
# (editable) with its testing extra. Safe to run again: it only adds what is
# missing. PYTHON picks the interpreter (default python3, 3.10 or newer).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DEB_PACKAGES=(
  xvfb xauth libgl1 libegl1 libfontconfig1 libdbus-1-3 libxkbcommon-x11-0
  libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0
  libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-xfixes0
)

if command -v dpkg >/dev/null 2>&1; then
  missing=()
  for pkg in "${DEB_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
      --no-install-recommends "${missing[@]}" >/dev/null
  fi
else
  echo "setup: not a Debian system; install Xvfb and Qt's xcb libraries" \
       "yourself if tests need a virtual display" >&2
fi

# uv builds the environment in seconds; plain venv + pip is the fallback.
if ! command -v uv >/dev/null 2>&1; then
  "$PYTHON" -m pip install --quiet --disable-pip-version-check uv \
    >/dev/null 2>&1 || true
fi
if command -v uv >/dev/null 2>&1 || "$PYTHON" -m uv --version >/dev/null 2>&1
then
  uv() { if command -v uv >/dev/null 2>&1; then command uv "$@"; \
         else "$PYTHON" -m uv "$@"; fi; }
  [ -x .venv/bin/python ] || uv venv --quiet --python "$PYTHON" .venv
  uv pip install --quiet --python .venv/bin/python -e ".[testing]"
else
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[testing]"
fi
echo "setup: ready ($(.venv/bin/python --version), .venv)"
