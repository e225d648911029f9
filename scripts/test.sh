#!/usr/bin/env bash
# Installs what the tests need (Debian's redis-server, the package with its test extras) and runs them all.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
python3 -m pip install -q -e '.[test]'
python3 -m pytest "$@"
