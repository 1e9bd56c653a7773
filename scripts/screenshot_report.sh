#!/usr/bin/env bash
# Render a report.html in headless Chromium and save a PNG screenshot (issue 7: "check it renders
# in a real headless browser").
#
#   scripts/screenshot_report.sh REPORT.html [OUT.png] [WIDTHxHEIGHT]
#
# Needs Debian's `chromium` (apt-get install -y chromium) or $CHROMIUM pointing at a Chrome binary.
# Networking, sync and component updates are disabled: the report must render fully offline.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 REPORT.html [OUT.png] [WIDTHxHEIGHT]" >&2
  exit 2
fi
report=$(realpath "$1")
out=$(realpath -m "${2:-report.png}")
size=${3:-1280x2000}
browser=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}
if [ -z "$browser" ]; then
  echo "$0: no chromium found; install it with 'apt-get install -y chromium' or set CHROMIUM" >&2
  exit 3
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking \
  --disable-component-update --disable-sync --no-first-run --user-data-dir="$profile" \
  --hide-scrollbars --screenshot="$out" --window-size="${size/x/,}" "file://$report" >/dev/null 2>&1
test -s "$out" || { echo "$0: chromium wrote no screenshot to $out" >&2; exit 4; }
echo "$out"
