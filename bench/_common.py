"""Shared helpers for the benchmarks: synthetic cohorts sized in rows, a site with tokens and grants
served by a real executor process on loopback, percentiles, /proc readings and result tables.

Benchmarks are plain scripts (`python bench/<name>.py`), not tests: they print their figures and
ratios against baselines measured in the same run, and write them to bench/results/<name>.json.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from sqlalchemy import Engine, create_engine, text

from veil.executor import ledger
from veil.executor.auth import create_token
from veil.executor.catalog import Catalog, load_catalog
from veil.executor.store import open_store, write
from veil.executor.synth import synthesize
from veil.local import LocalExecutor

# OpenDP warns that dp.len()'s default `signed` will change; the benchmarks pass it explicitly where
# they can, and the warning is noise in their output either way.
warnings.filterwarnings("ignore", category=FutureWarning, module="opendp")

PROJECT = "bench"
RESULTS = Path(__file__).resolve().parent / "results"

QUERIES = {
    "count": "SELECT COUNT(*) AS n FROM encounters",
    "mean": "SELECT AVG(hemoglobin_g_dl) AS hb FROM encounters",
    "group-by": "SELECT department, COUNT(*) AS n FROM encounters GROUP BY department",
}


# ---------------------------------------------------------------- sizes and data


def parse_rows(text_: str) -> int:
    """'1M' -> 1_000_000, '250k' -> 250_000, '2000' -> 2000."""
    s = text_.strip().lower().replace("_", "")
    scale = {"k": 10**3, "m": 10**6}.get(s[-1:], 1)
    return int(float(s[:-1] if scale > 1 else s) * scale)


def label(rows: int) -> str:
    if rows >= 10**6 and rows % 10**6 == 0:
        return f"{rows // 10**6}M"
    if rows >= 10**3 and rows % 10**3 == 0:
        return f"{rows // 10**3}k"
    return str(rows)


@dataclass
class Cohort:
    """One synthetic site ('north') written under `root`."""

    root: Path
    site_config: Path
    encounters: Path
    rows: int
    patients: int
    seconds: float


def make_cohort(
    root: Path,
    target_rows: int | None = None,
    patients: int | None = None,
    seed: int = 7,
    lifetime_epsilon: float | None = None,
) -> Cohort:
    """Synthesize one site with about `target_rows` encounter rows (or exactly `patients` nominal patients).

    The site's size factor and encounters per patient depend only on the seed, so a small pilot run
    gives rows per nominal patient, and the real run is scaled from it. `lifetime_epsilon`, if given,
    rewrites the dataset caps in the generated site.toml (benchmark data, not code).
    """
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    if patients is None:
        assert target_rows is not None
        pilot_n = 20_000
        pilot = Path(tempfile.mkdtemp(prefix="pilot-", dir=root))
        synthesize(pilot, sites=1, patients=pilot_n, seed=seed)
        per_patient = (
            pl.scan_parquet(pilot / "north" / "encounters.parquet").select(pl.len()).collect().item()
            / pilot_n
        )
        shutil.rmtree(pilot)
        patients = max(1, round(target_rows / per_patient))
    (config,) = synthesize(root, sites=1, patients=patients, seed=seed)
    if lifetime_epsilon is not None:
        config.write_text(
            config.read_text().replace("lifetime_epsilon = 10.0", f"lifetime_epsilon = {lifetime_epsilon!r}")
        )
    encounters = config.parent / "encounters.parquet"
    rows = int(pl.scan_parquet(encounters).select(pl.len()).collect().item())
    return Cohort(root, config, encounters, rows, patients, time.perf_counter() - start)


# ---------------------------------------------------------------- state databases


@contextmanager
def state_database(directory: Path, database_url: str | None = None) -> Iterator[str]:
    """A fresh, empty state database: a SQLite file in `directory`, or, when `database_url` names a
    PostgreSQL server, a new database on it that is dropped afterwards."""
    if not database_url or database_url.startswith("sqlite"):
        yield f"sqlite:///{directory / f'state-{uuid.uuid4().hex[:8]}.db'}"
        return
    name = f"veil_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield database_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def backend_of(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else url.split(":", 1)[0].split("+", 1)[0]


# ---------------------------------------------------------------- a served site


@dataclass
class BenchSite:
    """A site's catalog and state database with a researcher token (project `bench`) and grants,
    and, once started, its executor process on a free loopback port."""

    catalog: Catalog
    engine: Engine
    database_url: str
    site_config: Path
    token: str
    executor: LocalExecutor | None = None
    extra_tokens: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        assert self.executor is not None
        return self.executor.url

    @property
    def pid(self) -> int:
        assert self.executor is not None and self.executor.process is not None
        return self.executor.process.pid

    def grant(self, dataset: str, epsilon: float, project: str = PROJECT) -> None:
        with write(self.engine) as conn:
            ledger.set_grant(
                conn, self.catalog, project, self.catalog.dataset(dataset), epsilon, by="bench_steward"
            )

    def grant_row(self, dataset: str, project: str = PROJECT) -> dict[str, Any]:
        from veil.executor.store import grants

        with self.engine.connect() as conn:
            row = (
                conn.execute(grants.select().where(grants.c.project == project, grants.c.dataset == dataset))
                .mappings()
                .one()
            )
        return dict(row)

    def token_for(self, project: str) -> str:
        if project not in self.extra_tokens:
            self.extra_tokens[project] = create_token(
                self.engine, f"researcher_{project}", "researcher", project
            )
        return self.extra_tokens[project]

    def start(self, timeout: float = 300.0, workers: int = 1) -> BenchSite:
        log = self.site_config.parent / f"executor-{uuid.uuid4().hex[:6]}.log"
        extra = {"workers": workers} if workers != 1 else {}  # older LocalExecutors take no `workers`
        self.executor = LocalExecutor(self.site_config, self.database_url, log=log, **extra).start(
            timeout=timeout
        )
        return self

    def stop(self) -> None:
        if self.executor is not None:
            self.executor.stop()


@contextmanager
def bench_site(
    site_config: Path, database_url: str, grants: dict[str, float], serve: bool = True, workers: int = 1
) -> Iterator[BenchSite]:
    """Tokens and grants in a fresh state database, then (if `serve`) the executor, stopped on exit."""
    catalog = load_catalog(site_config)
    engine = open_store(database_url)
    token = create_token(engine, "bench_researcher", "researcher", PROJECT)
    site = BenchSite(catalog, engine, database_url, site_config, token)
    try:
        for dataset, epsilon in grants.items():
            site.grant(dataset, epsilon)
        if serve:
            site.start(workers=workers)
        yield site
    finally:
        site.stop()
        engine.dispose()


# ---------------------------------------------------------------- timing and statistics


def now() -> float:
    return time.perf_counter()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else math.nan


def stats_ms(seconds: list[float]) -> dict[str, float]:
    """p50, p95, mean, min and max in milliseconds, and the sample count."""
    ms = [s * 1000.0 for s in seconds]
    return {
        "n": len(ms),
        "p50": percentile(ms, 50),
        "p95": percentile(ms, 95),
        "mean": float(np.mean(ms)) if ms else math.nan,
        "min": min(ms) if ms else math.nan,
        "max": max(ms) if ms else math.nan,
    }


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """(seconds, result) of fn(*args, **kwargs)."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def ratio(a: float, b: float) -> float:
    return a / b if b else math.inf


# ---------------------------------------------------------------- /proc


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) etc. of a process in bytes, from /proc/<pid>/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if key.startswith("Vm") and len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) * 1024
    return out


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (writing 5 to clear_refs, Linux >= 4.0); False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()  # fields from the 3rd (state) on


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (e.g. uvicorn's worker processes), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(_stat(int(entry))[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """User + system CPU seconds used by a process (and, with `tree`, its live descendants), from /proc."""
    total = 0.0
    for p in [pid, *(descendants(pid) if tree else [])]:
        try:
            fields_ = _stat(p)
        except OSError:
            continue
        total += (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")
    return total


def cpu_by_role(pid: int) -> Counter[str]:
    """CPU seconds of `pid`'s process tree by role: "web" (the executor's HTTP processes), "query workers"
    (OpenDP's processes, children of the forkserver) and "forkserver"."""
    tree = [pid, *descendants(pid)]
    roles: dict[int, str] = {}
    for p in tree:
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                roles[p] = "forkserver" if b"forkserver" in f.read() else "web"
        except OSError:
            continue
    out: Counter[str] = Counter()
    for p, role in roles.items():
        try:
            fields_ = _stat(p)
        except OSError:
            continue
        if roles.get(int(fields_[1])) == "forkserver":
            role = "query workers"
        out[role] += (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")
    return out


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


# ---------------------------------------------------------------- output


def fmt(x: Any, digits: int = 1) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        if math.isinf(x):
            return "inf"
        return f"{x:,.{digits}f}"
    return str(x)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (pastes into bench/README.md)."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join(
        [line(headers), "| " + " | ".join("-" * w for w in widths) + " |", *(line(r) for r in cells)]
    )


def environment() -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "python": sys.version.split()[0],
        "polars": version("polars"),
        "opendp": version("opendp"),
        "sqlalchemy": version("sqlalchemy"),
        "uvicorn": version("uvicorn"),
        "cpus": os.cpu_count(),
        "loadavg_at_save": os.getloadavg(),
        "code": code_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def code_version() -> str:
    """The git commit of the code measured, with '+dirty' when tracked files outside bench/ differ from it."""
    import subprocess

    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = [
            line
            for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
            if not line[3:].startswith("bench/")
        ]
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def check_quiet(what: str) -> tuple[float, float, float]:
    """Print the 1-minute load average. Before a run, warn when other work on the machine will skew the
    timings (after a run the load includes the benchmark's own)."""
    load = os.getloadavg()
    cpus = os.cpu_count() or 1
    busy = what == "before" and load[0] >= 0.5 * cpus
    note = "  WARNING: the machine is busy; timings will be noisy" if busy else ""
    code = f", code {code_version()}" if what == "before" else ""
    print(f"{what}: load average {load[0]:.2f} on {cpus} CPUs{code}{note}", flush=True)
    return load


def save(name: str, payload: dict[str, Any]) -> Path:
    """Write results to bench/results/<name>.json (git-ignored)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2, default=str))
    return path


def workdir(keep: bool, prefix: str) -> Path:
    """A temporary directory for data and state (under $TMPDIR), removed at exit unless `keep`."""
    path = Path(tempfile.mkdtemp(prefix=f"veil-{prefix}-"))
    if not keep:
        import atexit

        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
