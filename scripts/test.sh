#!/usr/bin/env bash
# Set up and run the whole test suite. SQLite always; PostgreSQL too when VEIL_TEST_POSTGRES_URL
# names a server (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/postgres).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh  # ruff, the trust boundary's import contracts, mypy: any failure stops the run
if [ -z "${VEIL_TEST_POSTGRES_URL:-}" ]; then
  echo "VEIL_TEST_POSTGRES_URL is not set: ledger and audit tests run on SQLite only."
fi
# two pytest-xdist workers, one test file each at a time (files share module-scoped executors); most tests
# wait on processes they start (executors, kernels, JupyterLab, pip), so two overlap well on two cores
exec "${VEIL_VENV:-.venv}/bin/python" -m pytest -q -p no:cacheprovider -n "${VEIL_TEST_WORKERS:-2}" --dist loadfile "$@"
