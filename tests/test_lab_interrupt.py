"""Interrupt in the browser (Galata, Debian's Chromium): a three-site release while one site's executor is
stopped (SIGSTOP, sent by the spec) is interrupted from JupyterLab; the completed releases are shown above a
one-line VeilInterrupted, and the hung site, once woken, has charged nothing. See tests/test_lab_ui.py for
how the specs run; tests/test_interrupt.py checks the same over the Jupyter protocol."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from test_lab_ui import galata, lab_env  # noqa: F401  (lab_env: the fixture, used by name)

from conftest import Deployment
from veil.executor import audit


def test_interrupt_in_the_browser(lab_env: tuple[Path, dict[str, str]],  # noqa: F811
                                  sites: dict[str, Deployment]) -> None:
    root, env = lab_env
    before = {name: d.spent("patients")["rho"] for name, d in sites.items()}
    process = sites["valley"].executor.process
    assert process is not None
    try:
        galata(["tests/interrupt.spec.ts"], {**env, "VEIL_FREEZE_PID": str(process.pid)}, root / "interrupt.log")
    finally:
        os.kill(process.pid, signal.SIGCONT)
    time.sleep(3)  # the woken site finds the request's client gone, and charges nothing
    assert sites["valley"].spent("patients")["rho"] == before["valley"]
    for name in ("north", "central"):
        assert sites[name].spent("patients")["rho"] > before[name]
    for d in sites.values():
        assert audit.verify(d.engine).ok
