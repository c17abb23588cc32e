#!/usr/bin/env bash
# The PySyft bridge's own virtual environment (.venv-syft, or $VEIL_SYFT_VENV): PySyft 0.10 and syft-rds
# pinned, plus httpx for the executor's HTTP API. It holds no Veil install and no torch: the bridge
# (veil_syft/) is put on the path by `veil syft serve` and talks to the executor over HTTP only.
# Idempotent and quick when the pins are already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VEIL_SYFT_VENV:-.venv-syft}"
pins=("syft==0.10.0" "syft-rds==0.6.1" "syft-dataset==0.1.21" "syft-job==0.1.40" "httpx>=0.27")
stamp="$venv/.veil-syft-pins"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${pins[*]}" ]; then
  echo "PySyft bridge environment ready in $venv"
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet "${pins[@]}"
echo "${pins[*]}" >"$stamp"
echo "PySyft bridge environment installed in $venv"
