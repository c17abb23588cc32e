#!/usr/bin/env bash
# Set up a virtual environment (.venv, or $VEIL_VENV) with Veil and its test tools.
# torch comes first and pinned: 2.13.0 is the CPU build on this machine's disk; an unpinned torch
# would pull a CUDA build of several GB (later issues train models with it).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VEIL_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet "torch==2.13.0"
"$py" -m pip install --quiet -e ".[test,lab]"
# The lab extension (extensions/veil-lab): its front end is built with the JupyterLab 4.6 tools the venv
# holds (jlpm, jupyter-builder) and Node >= 20 from npm's registry. An editable install ships no data
# files, so the bundle and the server half's config are linked into the environment where a wheel
# (`pip install ".[lab]"`, setup.py's data files) puts them. (`jupyter server extension enable` only
# toggles an extension whose config file is already there.)
if ! command -v node >/dev/null 2>&1; then
  echo "Node.js >= 20 is needed to build the lab extension (extensions/veil-lab): install it (e.g. apt-get install nodejs npm)" >&2
  exit 1
fi
(
  export PATH="$PWD/$venv/bin:$PATH"
  cd extensions/veil-lab
  jlpm install --immutable >/dev/null
  jlpm build:prod >/dev/null
  cd ui-tests  # Galata's browser tests: Playwright drives Debian's Chromium, so no browser is downloaded
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 jlpm install --immutable >/dev/null
)
mkdir -p "$venv/share/jupyter/labextensions"
ln -sfn "$PWD/extensions/veil-lab/veil_lab/labextension" "$venv/share/jupyter/labextensions/veil-lab"
mkdir -p "$venv/etc/jupyter/jupyter_server_config.d"
ln -sfn "$PWD/extensions/veil-lab/jupyter-config/server-config/veil_lab.json" \
  "$venv/etc/jupyter/jupyter_server_config.d/veil_lab.json"
echo "veil installed in $venv"
