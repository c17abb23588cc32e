"""The lab extension's TypeScript: its jest unit tests (budget model, release history) and the
template's lint and formatting checks, run with the JupyterLab 4.6 tools the venv holds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LAB = Path(__file__).resolve().parent.parent / "extensions" / "veil-lab"


def jlpm(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "CI": "1"}
    return subprocess.run([str(Path(sys.executable).with_name("jlpm")), *args], cwd=LAB, env=env,
                          capture_output=True, text=True, timeout=600)


def test_jest_unit_tests_pass() -> None:
    done = jlpm("jest", "--ci")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert " failed" not in done.stderr and "passed" in done.stderr, done.stderr[-2000:]


def test_lint_and_formatting() -> None:
    done = jlpm("lint:check")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def test_jupyter_lists_the_prebuilt_extension_and_the_server_extension() -> None:
    """What the README's setup put in place: the prebuilt lab extension and veil.lab, both enabled and OK."""
    bin_dir = Path(sys.executable).parent
    labextensions = subprocess.run([str(bin_dir / "jupyter"), "labextension", "list"], capture_output=True, text=True)
    line = next((x for x in (labextensions.stdout + labextensions.stderr).splitlines() if "veil-lab" in x), "")
    assert "enabled" in line and "OK" in line, labextensions.stdout + labextensions.stderr
    servers = subprocess.run([str(bin_dir / "jupyter"), "server", "extension", "list"], capture_output=True, text=True)
    text = servers.stdout + servers.stderr
    assert "veil.lab" in text and "enabled" in text.split("veil.lab", 1)[1].splitlines()[0], text
