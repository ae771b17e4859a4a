#!/usr/bin/env bash
# Debian's chromium for the report test (tests/test_report.py opens OUT/report.html headless).
# Installed once with apt-get when missing; needs root (as in CI here) or a chromium on PATH.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: no chromium on PATH; install Debian's 'chromium' package (apt-get install -y chromium)" >&2
  exit 1
fi
echo "install_browser: apt-get install chromium"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
