"""The Dockerfile and compose.yaml start the executor the way `veil executor serve` accepts: Docker cannot run
here, so the compose file's exact command line and environment run as a real process (a real PostgreSQL
state database when VEIL_TEST_POSTGRES_URL names a server, else SQLite) and must answer /health."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import BACKENDS, make_database
from veil.local import free_port

ROOT = Path(__file__).resolve().parents[1]
SERVE_SETTINGS = {"VEIL_SITE_CONFIG", "VEIL_DATABASE_URL", "VEIL_HOST", "VEIL_PORT", "VEIL_WORKERS",
                  "VEIL_LOG_LEVEL", "VEIL_LOG_FORMAT", "VEIL_METRICS_TOKEN"}


def _compose() -> dict[str, object]:
    loaded = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def _executor() -> dict[str, object]:
    services = _compose()["services"]
    assert isinstance(services, dict)
    return services["executor"]  # type: ignore[no-any-return]


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${NAME:-default}` and `${NAME:?message}`, as `docker compose` would with `env`."""
    def one(match: re.Match[str]) -> str:
        name, how, rest = match.group(1), match.group(2), match.group(3) or ""
        if env.get(name):
            return env[name]
        if how == ":?":
            raise AssertionError(f"compose needs {name}: {rest}")
        return rest
    return re.sub(r"\$\{([A-Z_]+)(:-|:\?)?([^}]*)\}", one, value)


def _dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions (continuation lines joined), as (INSTRUCTION, arguments)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def _exec_form(arguments: str) -> list[str]:
    return json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)  # type: ignore[no-any-return]


def test_the_dockerfile_runs_the_compose_command_as_a_non_root_user() -> None:
    instructions = _dockerfile()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = " ".join(args for word, args in instructions if word == "RUN")
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in runs
    assert runs.index("torch==2.13.0") < runs.index("[site,postgres]")  # the CPU build first
    cmd = [args for word, args in instructions if word == "CMD"]
    assert len(cmd) == 1 and not [w for w, _ in instructions if w == "ENTRYPOINT"]
    assert _exec_form(cmd[0]) == _executor()["command"] == ["veil", "executor", "serve"]
    users = [args for word, args in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    env = " ".join(args for word, args in instructions if word == "ENV")
    assert "VEIL_PORT=8700" in env and ("EXPOSE", "8700") in instructions
    healthcheck = next(args for word, args in instructions if word == "HEALTHCHECK")
    assert "/health" in healthcheck and "VEIL_PORT" in healthcheck
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "extensions/veil-lab/package.json" in ignored  # no Node.js build of the lab in a site image


def test_compose_sets_only_settings_that_serve_reads_and_a_postgres_state_database() -> None:
    compose = _compose()
    executor = _executor()
    environment = executor["environment"]
    assert isinstance(environment, dict)
    assert set(environment) <= SERVE_SETTINGS
    help_text = subprocess.run([sys.executable, "-m", "veil.cli", "executor", "serve", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert all(name in help_text for name in environment)
    assert str(environment["VEIL_DATABASE_URL"]).startswith("postgresql+psycopg://")
    services = compose["services"]
    assert isinstance(services, dict)
    database = services["state-db"]
    assert database["image"] == "postgres:16"
    host = re.search(r"@([^:/]+)", str(environment["VEIL_DATABASE_URL"]))
    assert host and host.group(1) == "state-db"
    assert executor["depends_on"]["state-db"]["condition"] == "service_healthy"
    assert any(str(v).endswith(":/srv/veil/site") for v in executor["volumes"])
    assert str(environment["VEIL_SITE_CONFIG"]).startswith("/srv/veil/site/")
    assert executor["ports"] == [f"{environment['VEIL_PORT']}:{environment['VEIL_PORT']}"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_compose_command_and_environment_start_a_healthy_executor(backend: str, site_config: Path,
                                                                      tmp_path: Path) -> None:
    executor = _executor()
    command = executor["command"]
    assert isinstance(command, list) and command[0] == "veil"
    url, drop = make_database(backend, tmp_path)
    port = free_port()
    secret = "scraper-secret-" + "9" * 16
    compose_env = {"VEIL_DB_PASSWORD": "unused", "VEIL_METRICS_TOKEN": secret}
    environment = {name: _interpolate(str(value), compose_env)
                   for name, value in executor["environment"].items()}  # type: ignore[union-attr]
    # what differs from the container: the site's folder, the database server, and loopback only here
    environment.update(VEIL_SITE_CONFIG=str(site_config), VEIL_DATABASE_URL=url, VEIL_HOST="127.0.0.1",
                       VEIL_PORT=str(port))
    base = {k: v for k, v in os.environ.items() if not k.startswith("VEIL_")}
    binary = Path(sys.executable).with_name(command[0])
    log = tmp_path / "executor.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(binary), *command[1:]], env={**base, **environment}, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, status = time.monotonic() + 120, None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code
            except httpx.HTTPError:
                status = None
            if status == 200:
                break
            time.sleep(0.2)
        assert status == 200, log.read_text()[-3000:]
        health = httpx.get(f"http://127.0.0.1:{port}/health").json()
        assert health["database"] == "ok" and health["site"] == "north"
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {secret}"})
        assert scraped.status_code == 200 and "veil_requests_total" in scraped.text
    finally:
        # `docker stop`: SIGTERM to the container's first process only, then SIGKILL after its grace period
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=int(str(executor.get("stop_grace_period", "30s")).rstrip("s")))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        drop()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any(line.get("event") == "request" and line["path"] == "/health" for line in lines)
    assert int(environment["VEIL_WORKERS"]) == 2 and "(2 workers)" in log.read_text()
    assert process.returncode == 0, "the executor did not stop within the compose file's stop_grace_period"
