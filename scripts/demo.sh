#!/usr/bin/env bash
# One command from a fresh machine to napari with the sample data, the
# widget docked, the fit run and the coefficient plot shown. Without a
# display it runs on a virtual one and saves a screenshot instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${DISPLAY:-}" ] && [ -z "${WAYLAND_DISPLAY:-}" ]; then
  out=${1:-mixcoef-demo.png}
  echo "demo: no display; running on a virtual one, screenshot -> $out"
  exec xvfb-run -a -s "-screen 0 1600x1000x24" \
    .venv/bin/napari-mixcoef demo --screenshot "$out"
fi
exec .venv/bin/napari-mixcoef demo "$@"
