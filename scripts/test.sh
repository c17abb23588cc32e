#!/usr/bin/env bash
# Set up and run the whole test suite. SQLite always; PostgreSQL too when VEIL_TEST_POSTGRES_URL
# names a server (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/postgres).
set -euo pipefail
cd "$(dirname "$0")/.."
# The lab extension's browser tests (Galata) drive Debian's Chromium; Playwright never downloads one.
chromium="${VEIL_CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's Chromium for the browser tests" >&2
    apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium >/dev/null
  else
    echo "the browser tests need Chromium at $chromium: run 'sudo apt-get install -y chromium'," \
         "or set VEIL_CHROMIUM to a Chromium binary" >&2
    exit 1
  fi
fi
bash scripts/setup.sh
bash scripts/setup-syft.sh  # the PySyft bridge's own environment (.venv-syft): tests/test_syft_bridge.py
bash scripts/lint.sh  # ruff, the trust boundary's import contracts, mypy: any failure stops the run
if [ -z "${VEIL_TEST_POSTGRES_URL:-}" ]; then
  echo "VEIL_TEST_POSTGRES_URL is not set: ledger and audit tests run on SQLite only."
fi
# two pytest-xdist workers, one test file each at a time (files share module-scoped executors); most tests
# wait on processes they start (executors, kernels, JupyterLab, pip), so two overlap well on two cores
exec "${VEIL_VENV:-.venv}/bin/python" -m pytest -q -p no:cacheprovider -n "${VEIL_TEST_WORKERS:-2}" --dist loadfile "$@"
