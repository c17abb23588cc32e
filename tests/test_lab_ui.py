"""The lab extension in a real browser: Galata (Playwright) drives JupyterLab in Debian's Chromium
against three real executors. The specs live in extensions/veil-lab/ui-tests/tests (their reference screenshots beside
them); this module starts the executors, writes the researcher's and the steward's configs, runs the
specs and checks the sites' ledgers afterwards.

Needs Chromium at /usr/bin/chromium (`apt-get install -y chromium`; `.ci/run` installs it) and the
ui-tests' node modules (`scripts/setup.sh` installs them); nothing is downloaded at run time. To make
new reference screenshots (on this machine image): VEIL_UPDATE_SNAPSHOTS=1 pytest tests/test_lab_ui.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_lab_server import write_steward

from conftest import Deployment, write_study
from veil.executor import audit
from veil.kernel.sdk import Site as ResearcherSite
from veil.local import free_port

UI_TESTS = Path(__file__).resolve().parent.parent / "extensions" / "veil-lab" / "ui-tests"
CHROMIUM = os.environ.get("VEIL_CHROMIUM", "/usr/bin/chromium")


def galata(specs: list[str], env: dict[str, str], log: Path) -> None:
    """Run the Galata specs with the Jupyter server's environment; fail with Playwright's report."""
    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set VEIL_CHROMIUM)"
    assert (UI_TESTS / "node_modules").is_dir(), "the ui-tests' node modules are missing: run scripts/setup.sh"
    jlpm = shutil.which("jlpm", path=str(Path(sys.executable).parent)) or "jlpm"
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    update = ["--update-snapshots=all"] if os.environ.get("VEIL_UPDATE_SNAPSHOTS") else []  # new reference images
    done = subprocess.run([jlpm, "playwright", "test", *update, *specs], cwd=UI_TESTS, capture_output=True, text=True,
                          env={**os.environ, **env, "PATH": path, "CI": "1"}, timeout=900)
    log.write_text(done.stdout + done.stderr)
    # Playwright's own report, without the Jupyter server's log lines (those stay in the log file)
    report = "\n".join(line for line in (done.stdout + done.stderr).splitlines() if not line.startswith("[WebServer]"))
    assert done.returncode == 0, f"{report[-8000:]}\n(the Jupyter server's log: {log})"


@pytest.fixture(scope="module")
def lab_env(sites: dict[str, Deployment], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The kernelspec in a temp prefix, the study and steward configs for the three sites."""
    root = tmp_path_factory.mktemp("lab-ui")
    subprocess.run([sys.executable, "-m", "veil.cli", "kernel", "install", "--prefix", str(root / "prefix")],
                   check=True, capture_output=True)
    env = {"JUPYTER_PATH": str(root / "prefix" / "share" / "jupyter"), "VEIL_STUDY": str(write_study(root, sites)),
           "VEIL_STEWARD": str(write_steward(root, sites)), "IPYTHONDIR": str(root / "ipython")}
    return root, env


def test_researcher_and_steward_paths_in_the_browser(lab_env: tuple[Path, dict[str, str]],
                                                      sites: dict[str, Deployment]) -> None:
    root, env = lab_env
    applicant = ResearcherSite("central", sites["central"].url, sites["central"].tokens["outsider"])
    app = applicant.apply("Length of stay by department, for bed planning", ["encounters"], epsilon=1.5,
                          duration_days=30)
    # study1 already holds a grant on central's encounters: approving this one asks add / replace / keep (the
    # spec keeps it: adding would pass the dataset's lifetime cap)
    researcher = ResearcherSite("central", sites["central"].url, sites["central"].tokens["researcher"])
    more = researcher.apply("Readmissions follow-up: more budget on encounters", ["encounters"], epsilon=1.0,
                            duration_days=30)
    held = {g.dataset: g.epsilon for g in sites["central"].client().grants()}
    before = {g.dataset: g.rho_spent for g in sites["north"].client().grants()}
    galata(["tests/budget.spec.ts", "tests/steward.spec.ts"], env, root / "galata.log")
    after = {g.dataset: g.rho_spent for g in sites["north"].client().grants()}
    assert after["patients"] > before["patients"] and after["encounters"] == before["encounters"]
    steward = sites["central"].client("steward")
    decided = steward.application(app.id)
    assert decided.status == "approved" and decided.reviews[0].comment == "bed planning: approved"
    added = steward.application(more.id)
    assert added.status == "approved" and added.reviews[0].comment == "follow-up: keep the grant"
    kept = {g.dataset: g.epsilon for g in sites["central"].client().grants() if g.status == "active"}
    assert kept["encounters"] == held["encounters"]  # "Keep": approved without changing the grant
    revoked = [g for b in steward.budgets() for g in b.grants if g.project == "other_project"]
    assert revoked and all(g.status == "revoked" for g in revoked)


def test_an_unreachable_executor_in_the_browser(lab_env: tuple[Path, dict[str, str]],
                                                sites: dict[str, Deployment]) -> None:
    root, env = lab_env
    offline = root / "offline"
    offline.mkdir()
    study = write_study(offline, sites, {"valley": f"http://127.0.0.1:{free_port()}"})
    galata(["tests/offline.spec.ts"], {**env, "VEIL_STUDY": str(study)}, root / "galata-offline.log")


def test_interrupt_in_the_browser(lab_env: tuple[Path, dict[str, str]], sites: dict[str, Deployment]) -> None:
    """A three-site release while valley's executor is stopped (SIGSTOP, sent by the spec) is interrupted from
    JupyterLab: the completed releases are shown above a one-line VeilInterrupted, and valley, once woken,
    has charged nothing (tests/test_interrupt.py checks the same over the Jupyter protocol). Specs share the
    Jupyter server's port, so they all run from this module, one after another."""
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


def test_standing_queries_in_the_browser(lab_env: tuple[Path, dict[str, str]], sites: dict[str, Deployment]) -> None:
    """A standing query filed from a notebook and approved is listed in the panel with its next release; the
    site charged its whole horizon to the cap once, at approval (audit action `standing`)."""
    root, env = lab_env
    galata(["tests/standing.spec.ts"], env, root / "standing.log")
    [info] = sites["north"].client().standing_queries()
    assert info.spec.name == "visits_weekly" and info.status == "active" and info.windows_released == 0
    charged = sites["north"].client("steward").audit(action="standing")
    assert [e.hash for e in charged] == [info.receipt]
    assert all(d.client().standing_queries() == [] for name, d in sites.items() if name != "north")
