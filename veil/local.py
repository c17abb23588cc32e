"""Run site executors as real local processes (uvicorn on loopback): for the demo, tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60.0) -> None:
    """Return once something listens on 127.0.0.1:`port`; RuntimeError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def stop_group(process: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """Stop a process started with `start_new_session=True` and everything in its group: SIGTERM, then
    SIGKILL if it has not exited after `timeout` seconds."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def local_superlink(home: Path, log: Path) -> tuple[dict[str, str], int, subprocess.Popen[Any]]:
    """A Flower SuperLink on loopback without TLS, for tests and benchmarks, in its own process group: its
    Flower home `home` holds a config whose default connection (`local`) is this SuperLink. Returns, once it
    listens, the environment for `flwr` and Flower's daemons, its Fleet API port and the process."""
    fleet, control, appio = free_port(), free_port(), free_port()
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                      f'address = "127.0.0.1:{control}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(home),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("flower-superlink")), "--insecure",
             "--fleet-api-address", f"127.0.0.1:{fleet}", "--control-api-address", f"127.0.0.1:{control}",
             "--serverappio-api-address", f"127.0.0.1:{appio}"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(control)
        wait_port(fleet)
    except RuntimeError:
        stop_group(process)
        raise
    return env, fleet, process


class LocalExecutor:
    """`veil executor serve` in a child process; `start()` waits until /health answers."""

    def __init__(self, site_config: Path, database_url: str | None = None, port: int | None = None,
                 log: Path | None = None, workers: int = 1) -> None:
        self.site_config, self.database_url, self.workers = Path(site_config), database_url, workers
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or self.site_config.parent / "executor.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> LocalExecutor:
        cmd = [sys.executable, "-m", "veil.cli", "executor", "serve", "--site-config", str(self.site_config),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers)]
        if self.database_url:
            cmd += ["--database-url", self.database_url]
        with open(self.log, "ab") as log:
            # its own process group, so that stop() and kill() reach every worker process too
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_environment(),
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"executor for {self.site_config} exited with {self.process.returncode}; "
                                   f"see {self.log}:\n{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"executor for {self.site_config} did not answer on {self.url} within {timeout:.0f} s")

    def kill(self) -> None:
        """SIGKILL to the whole process group: no shutdown handlers run (for crash tests)."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            stop_group(self.process)

    def __enter__(self) -> LocalExecutor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


SERVE_SETTINGS = ("VEIL_SITE_CONFIG", "VEIL_DATABASE_URL", "VEIL_HOST", "VEIL_PORT", "VEIL_WORKERS")
"""`veil executor serve`'s settings from the environment: a LocalExecutor names its own on the command line,
and without a database URL means the catalog's, not one the environment happens to hold."""


def _child_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in SERVE_SETTINGS}

