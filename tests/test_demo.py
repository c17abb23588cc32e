"""The README's main command and the command-line tools, run as a user would run them."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import nbformat
import polars as pl

from veil.demo import NOTEBOOKS


def veil(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "veil.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def _executors_running(directory: Path) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in ps if "executor serve" in line and str(directory) in line]


def test_demo_releases_from_three_sites_and_leaves_nothing_running(tmp_path: Path) -> None:
    run = veil("demo", "--dir", str(tmp_path / "demo"), "--patients", "3000", "--no-lab")
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    for site in ("north", "central", "valley"):
        assert f"site {site}" in out
        assert f"--- {site}: cost epsilon=" in out
    assert "refused" not in out
    assert "receipt" in out and "[" in out  # intervals are shown
    assert not _executors_running(tmp_path / "demo")
    study = (tmp_path / "demo" / "study.toml").read_text()  # for notebooks: tokens stay in their files
    assert 'token_file = "north/researcher.token"' in study and "veil_" not in study
    for site in ("north", "central", "valley"):
        check = veil("audit", "verify", "--site-config", str(tmp_path / "demo" / site / "site.toml"))
        assert check.returncode == 0, check.stdout
    # a second run reuses the data and tokens, and spends more of the same grants
    again = veil("demo", "--dir", str(tmp_path / "demo"), "--patients", "3000", "--no-lab")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "synthesizing" not in again.stdout


def test_cli_synth_tokens_and_errors(tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    run = veil("data", "synth", "--sites", "2", "--patients", "500", "--out", str(out), "--seed", "3")
    assert run.returncode == 0, run.stderr
    config = out / "north" / "site.toml"
    assert config.exists() and (out / "central" / "encounters.parquet").exists()
    assert pl.read_parquet(out / "north" / "patients.parquet").height > 300

    steward = veil("executor", "token", "create", "--site-config", str(config), "--role", "steward",
                   "--principal", "erin", "--office", "data_center", "--out", str(tmp_path / "erin.token"))
    assert steward.returncode == 0 and (tmp_path / "erin.token").read_text().startswith("veil_")
    wrong = veil("executor", "token", "create", "--site-config", str(config), "--role", "researcher",
                 "--principal", "bob", "--project", "p1", "--office", "data_center")
    assert wrong.returncode == 2 and "--office is for stewards" in wrong.stderr
    missing = veil("audit", "verify", "--site-config", str(tmp_path / "absent.toml"))
    assert missing.returncode == 2 and "no site catalog" in missing.stderr
    assert veil("audit", "verify", "--site-config", str(config)).returncode == 0


def test_demo_refuses_a_busy_port_and_a_foreign_directory(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        clash = veil("demo", "--dir", str(tmp_path / "demo"), "--no-browser", "--port", str(port))
    assert clash.returncode == 2 and f"port {port} is in use" in clash.stderr and "--port" in clash.stderr
    assert not (tmp_path / "demo").exists()  # refused before anything was made
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("not a demo")
    stale = veil("demo", "--dir", str(foreign), "--no-lab")
    assert stale.returncode == 2 and "--reset" in stale.stderr and (foreign / "thesis.txt").exists()


def test_demo_headless_runs_every_tutorial_and_stops_cleanly(tmp_path: Path) -> None:
    """`veil demo --headless`: the executors start and answer a probe, the six tutorials run on the `veil`
    kernel against them, and nothing is left running; the repository's notebooks are not touched."""
    originals = {p.name: p.read_bytes() for p in NOTEBOOKS.glob("*.ipynb")}
    run = veil("demo", "--dir", str(tmp_path / "demo"), "--patients", "3000", "--headless")
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "all 6 tutorials ran without an error" in run.stdout and run.stdout.count("ok    ") == 6
    assert "--- valley: cost epsilon=" in run.stdout  # the probe: each executor answered a live query
    assert not _executors_running(tmp_path / "demo")
    executed = nbformat.read(tmp_path / "demo" / "notebooks" / "02-rare-disease-study.ipynb", as_version=4)
    assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code")
    assert {p.name: p.read_bytes() for p in NOTEBOOKS.glob("*.ipynb")} == originals
