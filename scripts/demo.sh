#!/usr/bin/env bash
# The main job on the embedded default: three synthetic hospitals, their executors on loopback
# (SQLite ledgers), DP queries against them, the releases printed. Extra arguments go to `veil demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VEIL_VENV:-.venv}/bin/veil" demo "$@"
