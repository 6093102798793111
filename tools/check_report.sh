#!/usr/bin/env bash
# Renders a kiln run report in headless Chromium (Debian's `chromium` package) with the network
# off, and writes a screenshot beside it: a person's view of report.html.
#   bash tools/check_report.sh runs/default/report.html
set -euo pipefail
report="$(realpath "$1")"
out="${report%.html}.png"
command -v chromium >/dev/null || { echo "install Debian's chromium: apt-get install -y chromium"; exit 1; }
profile="$(mktemp -d)"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --window-size=1200,2400 --screenshot="$out" "file://$report" 2>/dev/null
rm -rf "$profile"
test -s "$out" && echo "rendered $report -> $out"
