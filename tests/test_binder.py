"""Binder without Docker: a fresh virtual environment gets exactly the packages binder/ declares,
binder/postBuild installs Veil, and binder/start launches the demo's executors before running a
command that executes every tutorial on the `veil` kernel. Binder's PyTorch CPU index is the one thing
not used: this machine's package registries stand in for it (same packages, no internet)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def working_tree(target: Path) -> Path:
    """A copy of the repository's files as Binder would clone them (tracked and not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    for name in listed:
        source = REPO / name
        if source.is_file() or source.is_symlink():  # links stay links, as git checks them out
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name, follow_symlinks=False)
    return target


@pytest.mark.timeout(1500)  # a fresh environment, the whole setup and four tutorials: 10+ min on 2 cores
def test_binder_builds_and_runs_every_tutorial(tmp_path: Path) -> None:
    spec = yaml.safe_load((REPO / "binder" / "environment.yml").read_text())
    dependencies = spec["dependencies"]
    assert "python=3.11" in dependencies, "Binder reads a Python range as unspecified: pin python=3.11"
    assert any(str(d).startswith("nodejs") for d in dependencies)
    packages = [r for d in dependencies if isinstance(d, dict) for r in d["pip"] if not r.startswith("-")]
    assert packages and all("torch" not in p or "==" in p for p in packages)

    repo = working_tree(tmp_path / "repo")
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages], check=True, timeout=900)
    env = {**os.environ, "PATH": f"{env_dir / 'bin'}:{os.environ['PATH']}", "HOME": str(tmp_path / "home"),
           "VIRTUAL_ENV": str(env_dir), "VEIL_DEMO_PATIENTS": "3000"}
    for variable in ("VEIL_STUDY", "VEIL_STEWARD", "VEIL_DEMO_DIR", "JUPYTER_PATH", "VEIL_VENV"):
        env.pop(variable, None)
    (tmp_path / "home").mkdir()
    built = subprocess.run(["bash", "binder/postBuild"], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=1800)
    assert built.returncode == 0, (built.stdout + built.stderr)[-4000:]

    notebooks = sorted(str(p.relative_to(repo)) for p in (repo / "notebooks").glob("*.ipynb"))
    assert len(notebooks) == 4, notebooks
    started = subprocess.Popen(["bash", "binder/start", str(python), "-m", "veil.tutorials", *notebooks],
                               cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        out, _ = started.communicate(timeout=2400)
    finally:
        os.killpg(started.pid, signal.SIGTERM)  # the demo's executors, started in the background by start
    assert started.returncode == 0, out[-6000:]
    assert f"all {len(notebooks)} tutorials ran without an error" in out, out[-3000:]
    assert _gone(tmp_path), "the demo's executors outlived it"


def _gone(tmp_path: Path, seconds: float = 20.0) -> bool:
    """Whether the demo's executors under `tmp_path` are gone within `seconds` of the SIGTERM."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        if not [line for line in ps.splitlines() if "executor serve" in line and str(tmp_path) in line]:
            return True
        time.sleep(0.5)
    return False
