#!/usr/bin/env bash
# Static checks, each of which fails CI when broken: ruff, the import-linter contracts of the trust
# boundary (pyproject.toml, [tool.importlinter]) and mypy with ipykernel's settings ([tool.mypy]).
# import-linter and mypy read the package as it installs (scripts/stage_package.py): the checkout maps
# executor/ and kernel/ onto veil.executor and veil.kernel, which tools that read folders cannot see.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
py="$(realpath -s "${VEIL_VENV:-.venv}")/bin/python"
[ -x "$py" ] || py="$(command -v python3)"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
"$py" scripts/stage_package.py "$stage" >/dev/null
echo "== ruff"
"$py" -m ruff check .
echo "== import-linter"
(cd "$stage" && PYTHONPATH="$stage" "$(dirname "$py")/lint-imports" --config "$root/pyproject.toml" >"$stage/lint.log" 2>&1) \
  || { cat "$stage/lint.log"; exit 1; }
grep -E "KEPT|BROKEN|Contracts" "$stage/lint.log"
echo "== mypy"
(cd "$stage" && MYPYPATH="$stage" "$py" -m mypy --config-file "$root/pyproject.toml" --python-executable "$py" \
  --cache-dir "$root/.mypy_cache" -p veil)
