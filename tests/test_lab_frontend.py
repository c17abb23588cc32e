"""The lab extension's TypeScript: its jest unit tests (budget model, release history) and the
template's lint and formatting checks, run with the JupyterLab 4.6 tools the venv holds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LAB = Path(__file__).resolve().parent.parent / "lab"


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
